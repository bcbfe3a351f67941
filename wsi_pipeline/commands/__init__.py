"""CLI command modules: each defines ``register(app)``; see :mod:`wsi_pipeline.cli`."""
