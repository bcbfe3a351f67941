"""Federated training of the MIL heads across sites (``wsi federated``), on Flower's deployment runtime.

Bottom to top: :mod:`~wsi_pipeline.federated.protocol` (message types, what may leave a site),
:mod:`~wsi_pipeline.federated.config`, :mod:`~wsi_pipeline.federated.sums` (figures from aggregated sums and
histograms), :mod:`~wsi_pipeline.federated.spec` (the run specification every message carries),
:mod:`~wsi_pipeline.federated.site` (a site's computations), :mod:`~wsi_pipeline.federated.calibrate`
(calibration by federated optimisation), :mod:`~wsi_pipeline.federated.record` (``federated.json``, the
checkpoint and the model folder), :mod:`~wsi_pipeline.federated.coordinator` (the server's protocol),
:mod:`~wsi_pipeline.federated.apps` (Flower's ServerApp and ClientApp; imports ``flwr``) and
:mod:`~wsi_pipeline.federated.launch` (the SuperLink, SuperNode and ``flwr run`` processes).
"""
