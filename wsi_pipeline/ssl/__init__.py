"""Self-supervised pretraining (DINO-style) of tile encoders, and encoder evaluation on labelled tiles.

Modules: ``config`` (dataclasses), ``augment`` (pathology multi-crop augmentations), ``data`` (tile
sources: image folders and RUN folders; labelled folders and the source split are in :mod:`wsi_pipeline.tiles`), ``dino`` (heads, loss,
schedules), ``trainer`` (training loop, checkpoints, DDP, export), ``evaluate`` (k-NN / linear probe).
"""
