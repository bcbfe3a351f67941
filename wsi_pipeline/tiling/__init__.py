"""Tissue detection (pure), the tile grid at a physical resolution (pure) and the per-slide runner."""
