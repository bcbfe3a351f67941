"""Build script. Everything but the package list is in pyproject.toml.

The list is here because it mixes discovery with one mapped folder: the top-level ``models/`` (the layout the
project promises) ships inside the wheel as ``wsi_pipeline/models/`` (data only, no ``__init__.py``: it is never
imported; ``wsi_pipeline.encoders.project.models_dir`` finds it with ``importlib.resources``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["wsi_pipeline*"]), "wsi_pipeline.models"],
    package_dir={"wsi_pipeline.models": "models"},
)
