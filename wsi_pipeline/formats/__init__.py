"""Every on-disk format, defined once: names, format version, one reader and one writer each.

The submodules, each the one owner of its formats:

- :mod:`~wsi_pipeline.formats.atomic`: atomic writes (a file under its final name is complete);
- :mod:`~wsi_pipeline.formats.hashing`: resume keys (``params_hash``) and file hashes;
- :mod:`~wsi_pipeline.formats.h5`: tiles, features, per-tile scores and TME probabilities (HDF5);
- :mod:`~wsi_pipeline.formats.tables`: the labels CSV, ``predictions.csv``, ``patient_predictions.csv``,
  ``tme.csv``, the status table ``slides.csv`` and ``oof_predictions.csv``;
- :mod:`~wsi_pipeline.formats.journal`: the status journals ``RUN/status/slides.<writer>.jsonl`` (one per
  writing process, JSON lines) that ``slides.csv`` is compacted from;
- :mod:`~wsi_pipeline.formats.cards`: ``model.json``, ``encoder.json``, ``classifier.json`` and the stage
  records (JSON, each with a ``format_version`` key);
- :mod:`~wsi_pipeline.formats.federated`: ``federated.json`` (record and checkpoint of a federated run),
  a site's status file and its message audit log (JSON lines);
- :mod:`~wsi_pipeline.formats.geojson`: QuPath-compatible GeoJSON (feature builders, tile grids, reader,
  writer, validation).

:mod:`~wsi_pipeline.formats.api` gathers their public names in one namespace (add a new public name there
too): ``from wsi_pipeline.formats import api as F``, then ``F.read_model_json(...)``.

This package is a low layer: it imports nothing of wsi_pipeline but ``errors`` and ``_version``, and
importing it loads no pandas or h5py (those are imported inside the functions that need them).
"""
