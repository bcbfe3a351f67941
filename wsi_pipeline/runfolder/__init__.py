"""The RUN folder: paths (``layout.RunLayout``), the per-slide status table (``status``), batch execution with
isolation and sharding (``batch``), the stage executor (``executor``), resume-key digests (``digest``) and
the resolved config written next to the outputs (``resolved``)."""
