"""``python -m CBIRSlicerLib.cli``: the ``cbir`` program."""

import sys

from .program import main

if __name__ == "__main__":  # importing this module (the layout test imports every module) runs nothing
    sys.exit(main())
