"""CBIRSlicer core: volumes to model-ready images to vectors to similar cases.

Importing this package is cheap: heavy libraries (torch, faiss, open_clip, monai) are
imported only inside the functions that use them, and nothing here imports Slicer except
:mod:`CBIRSlicerLib.scene.nodes`.
"""

__version__ = "0.1.0"
