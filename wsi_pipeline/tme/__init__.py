"""Tumour microenvironment (TME): a tile tissue classifier, spatial metrics and the immune phenotype.

Commands: ``wsi tissue-train`` (:mod:`~wsi_pipeline.tme.train`) and ``wsi tme RUN`` (:mod:`~wsi_pipeline.tme.run`).

Modules
-------
* ``config``: :class:`~wsi_pipeline.tme.config.TMEConfig` (class roles, spatial parameters, rules),
  :class:`~wsi_pipeline.tme.config.TissueTrainConfig`.
* ``classifier``: the classifier folder (``classifier.json`` + ``model.safetensors``), fitting (hard or soft
  targets), scale check, area correction. Tiles are embedded at the classifier's µm/px by
  :mod:`wsi_pipeline.tiles` (resize by scale only).
* ``context``: context windows for training (random mosaics of labelled tiles, windows computed as the dense
  map computes them, class-area fractions as soft labels).
* ``dense``: the dense class-probability map (overlapping field-of-view windows, fully convolutional or one by
  one; what ``--footprint auto`` uses for a classifier validated for it, :func:`wsi_pipeline.tme.run.dense_validated`).
* ``refine``: the map refinement (a small convolutional network over the dense map, or an ensemble of such
  networks, fitted to the true class fractions of mosaic cells; the dense read-out's composition when the
  classifier carries one).
* ``spatial``: tile grid, tumour region, peri-tumoural band, per-slide metrics of a label grid or of the
  dense map (pure).
* ``rules``: the immune-phenotype rule table and fitting its thresholds with cross-validation (pure).
* ``render``: class-map PNG and QuPath GeoJSON (colours: :mod:`wsi_pipeline.tiles.palette`).

Outputs of ``wsi tme RUN``
--------------------------
* ``RUN/tme/<slide_id>.h5``: ``coords`` (N×2, level 0, same order as ``RUN/tiles/<slide_id>.h5``) and
  ``probs`` (N×C; for the dense footprint each RUN tile's mean over its map cells); attrs ``class_names``,
  ``encoder``, ``classifier_mpp``, ``feature_source``. With the dense footprint also ``dense_probs`` (H×W×C,
  float16) and ``dense_area`` (H×W) with the map's level-0 origin, cell size, window size and method
  (:class:`wsi_pipeline.formats.h5.TMEDenseMap`, :func:`wsi_pipeline.formats.h5.read_tme_dense`).
* ``RUN/tme/<slide_id>_classmap.png`` (the map's — or the tiles' — top class over the thumbnail, tumour region
  and margin band outlined, legend with each class's share) and ``RUN/tme/<slide_id>.geojson`` (QuPath; dense:
  one annotation per class, the contours of the cells whose top class it is, plus ``tumour_region`` and
  ``margin_band``; per-tile footprints: one detection square per tile with ``p_<class>`` measurements).
* ``wsi tme RUN --fit-rules --labels CSV``: ``RUN/configs/tme-fit-rules.yaml``, thresholds fitted to the
  labelled slides with cross-validation, for ``wsi tme OTHER_RUN --config`` (never for the slides it was
  fitted on).
* ``RUN/tme.csv``: one row per slide, ``slide_id`` first, then ``immune_phenotype``, ``til_fraction``,
  ``lymph_density_tumour``, ``lymph_density_margin``, ``stromal_til_fraction``, ``tumour_stroma_ratio``,
  ``phenotype_reason``, ``phenotype_margin`` (how far the call lies from flipping: the deciding density's
  relative distance to its threshold, :func:`wsi_pipeline.tme.rules.phenotype_margin`; under
  ``rules.BORDERLINE_MARGIN`` = 0.1 the call is borderline, and the viewer and the HTML report say so), ``area_frac_<class>`` (of tissue tiles), ``nontissue_fraction``, counts and
  areas (see :mod:`wsi_pipeline.tme.spatial` for every definition).

Using the read-out downstream
-----------------------------
``tme.csv`` is keyed by ``slide_id``. ``wsi report`` and the analyses (``wsi predictive``,
``wsi evolution``) read it from the RUN folder. For ``wsi train`` (TME columns as targets or covariates),
join it to the labels: ``wsi tme RUN --labels labels.csv`` writes ``RUN/labels_with_tme.csv`` (every label
row, plus ``tme_<column>``), or in Python ``labels.merge(F.read_tme_csv("RUN/tme.csv").add_prefix("tme_")
.rename(columns={"tme_slide_id": "slide_id"}), on="slide_id", how="left")`` with
``from wsi_pipeline.formats import api as F`` (the reader keeps ``slide_id`` as text).
"""
