"""Tile encoders: the registry, the presets and the :class:`~wsi_pipeline.encoders.base.Encoder` module.

Modules
-------
* ``registry``: every encoder name, ``register_encoder`` (decorator), ``create_encoder``, ``list_encoders``,
  ``get_encoder_meta``, ``default_encoder_name``;
* ``presets``: the public pathology encoders (UNI, Virchow2, ...), registered by decoration;
* ``meta``: ``EncoderMeta`` and the normalisation constants (no torch);
* ``base``: the ``Encoder`` module, ``resolve_device``, ``autocast``, ``prepare_for_inference`` (torch);
* ``project``: project encoder folders (``encoder.json`` + ``model.safetensors``, from ``wsi ssl-train``);
* ``weights``, ``convert``, ``stain``: loading checkpoints, foreign key layouts, stain standardisation.

Usage::

    from wsi_pipeline.encoders.registry import create_encoder, list_encoders
    enc = create_encoder("timm:vit_small_patch16_224")            # random init
    enc = create_encoder("uni", weights="/path/pytorch_model.bin")  # a preset with a local file

In-memory tiles are embedded by :mod:`wsi_pipeline.tiles.embed` (``embed_images``, ``embed_tiles``).

Like every ``__init__`` of the package this one defines and re-exports nothing. Its one import is the
registration, as in timm: the preset module registers its encoders when imported, and importing it here
fills the registry before any submodule is used (it is light: ``presets`` imports neither torch nor timm at
module level).
"""

from wsi_pipeline.encoders import presets  # noqa: F401 - registers the presets (timm style)
