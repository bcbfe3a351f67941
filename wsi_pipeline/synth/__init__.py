"""Synthetic H&E-like slides, cohorts and mosaics for samples, tests and benchmarks.

Modules (import what you need; nothing heavy happens at import time):

- ``layout``: class maps (ground-truth tissue layout on a grid of tile-sized cells) with the immune
  phenotype defined by geometry; truth read-outs (``class_map_truth``, ``lymph_geometry``).
- ``tissue``: ``TissuePainter``, vectorised procedural H&E rendering at physical scale.
- ``slides``: ``SlideSpec``, ``make_slide_spec``, ``write_slide`` (Aperio-style pyramid), ``save_truth``.
- ``cohort``: the documented generative model of patients, labels, arms and timepoints;
  ``plan_cohort``, ``write_cohort``.
- ``bench``: ``make_bench_slide`` (cached 40000×30000, 0.25-µm/px benchmark pyramid).
- ``kather``: kather16 source-image split and mosaic cohorts (``build_kather_mosaic_cohort``;
  ``write_kather_cohort``: the cohort model with real tiles, the design of ``data_samples/``).
- ``pyramid``: ``write_pyramid_tiff``, the tile-by-tile pyramid writer used by all of the above.
- ``run_tables``: ``run_tables_from_truth``, the ``predictions.csv``/``tme.csv`` a pipeline would write for a
  labelled synthetic cohort (tests of the analyses).
"""
