"""Tumour microenvironment (TME): a tile tissue classifier, spatial metrics and the immune phenotype.

Commands: ``wsi tissue-train`` (:mod:`~wsi_pipeline.tme.train`) and ``wsi tme RUN`` (:mod:`~wsi_pipeline.tme.run`).

Modules
-------
* ``config``: :class:`~wsi_pipeline.tme.config.TMEConfig` (class roles, spatial parameters, rules),
  :class:`~wsi_pipeline.tme.config.TissueTrainConfig`.
* ``classifier``: the classifier folder (``classifier.json`` + ``model.safetensors``), fitting, scale check.
  Tiles are embedded at the classifier's µm/px by :mod:`wsi_pipeline.tiles` (resize by scale only).
* ``spatial``: tile grid, tumour region, peri-tumoural band, per-slide metrics (pure).
* ``rules``: the immune-phenotype rule table (pure).
* ``render``: class-map PNG and QuPath GeoJSON (colours: :mod:`wsi_pipeline.tiles.palette`).

Outputs of ``wsi tme RUN``
--------------------------
* ``RUN/tme/<slide_id>.h5``: ``coords`` (N×2, level 0, same order as ``RUN/tiles/<slide_id>.h5``) and
  ``probs`` (N×C); attrs ``class_names``, ``encoder``, ``classifier_mpp``, ``feature_source``.
* ``RUN/tme/<slide_id>_classmap.png`` (tiles coloured by class over the thumbnail, legend with shares) and
  ``RUN/tme/<slide_id>.geojson`` (QuPath detections: one square per tile, classified by its top class;
  measurements ``p_<class>``, ``tumour_region``, ``margin_band``, ``distance_to_tumour_um``).
* ``RUN/tme.csv``: one row per slide, ``slide_id`` first, then ``immune_phenotype``, ``til_fraction``,
  ``lymph_density_tumour``, ``lymph_density_margin``, ``stromal_til_fraction``, ``tumour_stroma_ratio``,
  ``phenotype_reason``, ``area_frac_<class>`` (of tissue tiles), ``nontissue_fraction``, counts and
  areas (see :mod:`wsi_pipeline.tme.spatial` for every definition).

Using the read-out downstream
-----------------------------
``tme.csv`` is keyed by ``slide_id``. ``wsi report`` and the analyses (``wsi predictive``,
``wsi evolution``) read it from the RUN folder. For ``wsi train`` (TME columns as targets or covariates),
join it to the labels: ``wsi tme RUN --labels labels.csv`` writes ``RUN/labels_with_tme.csv`` (every label
row, plus ``tme_<column>``), or in Python ``labels.merge(F.read_tme_csv("RUN/tme.csv").add_prefix("tme_")
.rename(columns={"tme_slide_id": "slide_id"}), on="slide_id", how="left")`` with
``from wsi_pipeline import formats as F`` (the reader keeps ``slide_id`` as text).
"""
