"""Configuration of `wsi report`."""

from __future__ import annotations

from dataclasses import dataclass

from wsi_pipeline.errors import ConfigError


@dataclass
class ReportConfig:
    run: str
    labels: str | None = None  # labels CSV: enables performance, subgroup and survival sections
    out: str | None = None  # default RUN/report.html
    model: str | None = None  # MIL model DIR (targets, subgroup cut-offs); default: from RUN/configs/predict.yaml
    n_boot: int = 1000  # patient-level bootstrap resamples for metric CIs
    seed: int = 0
    thumb_px: int = 160  # longest side of the inlined thumbnails
    max_slides: int = 2000  # rows of the per-slide table (thumbnails make the file grow)
    title: str = "wsi-pipeline cohort report"

    def validate(self) -> ReportConfig:
        if self.n_boot < 100:
            raise ConfigError(f"--n-boot must be >= 100 (got {self.n_boot})")
        if self.thumb_px < 16:
            raise ConfigError(f"--thumb-px must be >= 16 (got {self.thumb_px})")
        return self
