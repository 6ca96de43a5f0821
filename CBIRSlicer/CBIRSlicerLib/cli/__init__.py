"""The ``cbir`` command line: a module per command group, each registering its own parsers (:mod:`program` joins them).

``main`` and ``build_parser`` are the package's names because the console script is ``CBIRSlicerLib.cli:main``.
"""

from .program import build_parser, main

__all__ = ["build_parser", "main"]
