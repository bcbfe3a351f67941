"""Slide I/O, the bottom of the pipeline.

Modules
-------
* ``open``: ``open_slide`` (picks a backend, checks the file, resolves the µm/px), ``find_slides``,
  ``SLIDE_EXTENSIONS``;
* ``base``: the ``Slide`` interface, ``MPPInfo``, ``resize_rgb``, ``slide_id_from_path``;
* ``mpp``: where a slide's µm/px comes from (file metadata, objective power, overrides);
* ``openslide_backend``, ``tiff_backend``: the backends (OpenSlide; tifffile and Pillow);
* ``integrity``: truncated-file checks.

Usage::

    from wsi_pipeline.slide.open import open_slide
    with open_slide("slide.svs") as slide:
        region = slide.read_region_at_mpp(...)
"""
