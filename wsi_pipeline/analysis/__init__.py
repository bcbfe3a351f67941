"""Analyses on top of the MIL predictions and the TME read-out.

- :mod:`wsi_pipeline.analysis.predictive`: treatment × biomarker interaction (is a biomarker *predictive*
  of benefit from the treatment, not merely prognostic?), with subgroup effects and a forest plot.
- :mod:`wsi_pipeline.analysis.evolution`: per-patient trajectories of the TME read-out and model scores
  over timepoints, phenotype transitions and change scores compared between responders and non-responders.
- :mod:`wsi_pipeline.analysis.tables`: joining labels, ``predictions.csv`` and ``tme.csv`` on ``slide_id``
  and aggregating slides to patients.
"""
