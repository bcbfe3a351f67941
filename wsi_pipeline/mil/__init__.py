"""Slide and patient models: multi-task multiple-instance learning on bags of tile embeddings.

Modules (imported on demand; nothing heavy happens at import):

- :mod:`~wsi_pipeline.mil.targets`: ``TargetSpec``, ``parse_targets("response:binary,os:survival(t,e)")``,
  labels CSV loading (missing labels mask that target's loss only).
- :mod:`~wsi_pipeline.mil.heads`: the head registry: ``register_head``, ``create_head(name, in_dim, tasks,
  **kw)``, ``list_heads()`` → abmil, chowder, meanpool, transmil; typed ``MILOutput``.
- :mod:`~wsi_pipeline.mil.data`: lazy ``BagStore`` over ``RUN/features/<encoder>``, spatial context
  features (``neighbour_context``), tile subsampling.
- :mod:`~wsi_pipeline.mil.losses`: masked per-target losses (BCE, CE, MSE, Cox partial likelihood).
- :mod:`~wsi_pipeline.mil.covariates`: clinical covariates (standardised / one-hot, fitted on training folds).
- :mod:`~wsi_pipeline.mil.cv`: the cross-validation as data: ``Cohort``, ``Variant``, ``FoldResult``.
- :mod:`~wsi_pipeline.mil.train`: ``run_train(TrainConfig)``: patient-level stratified CV, early stopping,
  OOF predictions, fold ensemble, baseline and covariate comparisons, DDP over folds (``wsi train``).
- :mod:`~wsi_pipeline.mil.selection`: ``--head auto``: the head chosen by inner CV within the training
  folds (criterion: mean primary metric over targets), and the check against the mean-pool baseline.
- :mod:`~wsi_pipeline.mil.calibration`: post-hoc calibrators (registry: platt, stacked, temperature, isotonic,
  none), fitted on the OOF predictions, recorded in the model card, applied by the fold ensemble.
- :mod:`~wsi_pipeline.mil.oof`: the OOF predictions calibrated honestly (cross-fitted), cut-offs chosen on
  them, before/after calibration figures.
- :mod:`~wsi_pipeline.mil.predict`: ``run_predict`` (``wsi predict``, a cohort stage on the executor;
  ``predict_run`` is its core) and ``run_evaluate`` (``wsi evaluate``).
- :mod:`~wsi_pipeline.mil.subgroups`: ``run_subgroups`` (``wsi subgroups``).
- :mod:`~wsi_pipeline.mil.model_io`: the model directory (model card, safetensors per fold).
- :mod:`~wsi_pipeline.mil.simulate`: a feature-level synthetic cohort with planted signals (tests, demos).
"""
