"""wsi-pipeline: MPP-true whole-slide image pipeline for response and TME prediction.

The stages in Python: ``from wsi_pipeline import api as wsi`` (one function per ``wsi`` command). Importing
this package loads no stage; every subpackage's ``__init__`` is its docstring (see README "Development").
"""

from wsi_pipeline._version import __version__

__all__ = ["__version__"]
