"""Review for pathologists: heatmaps (PNG + multiscale zarr), tile galleries, QuPath GeoJSON export and a
browser viewer. Pure raster code lives in :mod:`.raster`; :mod:`.heatmap` orchestrates one RUN folder;
:mod:`.server` is the viewer app. Nothing is imported at package import time."""
