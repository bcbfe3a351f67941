"""Evaluation: metrics vectorised over patient-level bootstrap resamples, CV splits, responder subgroups."""
