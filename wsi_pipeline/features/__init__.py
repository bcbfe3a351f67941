"""Feature extraction: fast tile reading, the tile dataset, and the resumable, distributed engine.

Modules
-------
* ``config``: :class:`~wsi_pipeline.features.config.ExtractConfig`;
* ``extract``: ``run_extract`` (``wsi extract``, a streaming stage on the executor) and
  ``extract_slide_features`` (one slide, in memory);
* ``reader``: the fast tile reader (``ReadSpec``, ``open_tile_reader``);
* ``dataset``: the tile dataset and the DataLoader that feeds the encoder.

Usage::

    from wsi_pipeline.features.config import ExtractConfig
    from wsi_pipeline.features.extract import run_extract
    summary = run_extract("RUN", ExtractConfig(encoder="timm:resnet18"))
"""
