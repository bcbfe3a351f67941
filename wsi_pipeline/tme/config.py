"""Configuration of the TME stage: class roles, spatial parameters, phenotype rules, classifier training."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wsi_pipeline.errors import ConfigError

# ---- class roles
# The spatial metrics only need to know which classifier classes play which part. A class name is matched
# first exactly against the lists below, then by keyword (case-insensitive), so "01_TUMOR", "tumour" and
# "Tumor epithelium" are all tumour.
ROLE_TUMOUR = "tumour"
ROLE_STROMA = "stroma"
ROLE_LYMPHOCYTES = "lymphocytes"
ROLE_NON_TISSUE = "non_tissue"
ROLE_OTHER = "other"

ROLE_KEYWORDS: dict[str, tuple[str, ...]] = {
    ROLE_TUMOUR: ("tumor", "tumour", "tum"),
    ROLE_STROMA: ("stroma", "complex", "str"),
    ROLE_LYMPHOCYTES: ("lympho", "lym", "immune", "til"),
    ROLE_NON_TISSUE: ("empty", "background", "back", "glass"),
}


@dataclass
class ClassRoles:
    """Which classes are tumour, stroma, lymphocytes and not tissue (exact names; keywords as fallback).

    Tissue tiles are all tiles whose class is not ``non_tissue`` (kather16: everything but 08_EMPTY; debris,
    mucosa and adipose are tissue). Stroma (the TILs-WG denominator) is simple and complex stroma.
    """

    tumour: tuple[str, ...] = ("01_TUMOR",)
    stroma: tuple[str, ...] = ("02_STROMA", "03_COMPLEX")
    lymphocytes: tuple[str, ...] = ("04_LYMPHO",)
    non_tissue: tuple[str, ...] = ("08_EMPTY",)

    def role_of(self, class_name: str) -> str:
        for role in (ROLE_TUMOUR, ROLE_STROMA, ROLE_LYMPHOCYTES, ROLE_NON_TISSUE):
            if class_name in getattr(self, role):
                return role
        words = [w for w in re.split(r"[^a-z]+", class_name.lower()) if w]
        for role, keys in ROLE_KEYWORDS.items():
            if any(w == k or (len(k) > 3 and w.startswith(k)) for w in words for k in keys):
                return role
        return ROLE_OTHER

    def resolve(self, class_names: Sequence[str]) -> dict[str, list[int]]:
        """role → class indices; raises when tumour or lymphocytes are missing (no phenotype without them)."""
        all_roles = (ROLE_TUMOUR, ROLE_STROMA, ROLE_LYMPHOCYTES, ROLE_NON_TISSUE, ROLE_OTHER)
        out: dict[str, list[int]] = {r: [] for r in all_roles}
        for i, name in enumerate(class_names):
            out[self.role_of(name)].append(i)
        for role in (ROLE_TUMOUR, ROLE_LYMPHOCYTES):
            if not out[role]:
                raise ConfigError(
                    f"no classifier class plays the {role} role among {list(class_names)}; "
                    f"name it in the TME config (roles.{role})"
                )
        return out


# ---- phenotype rules
PHENOTYPE_INFLAMED = "inflamed"
PHENOTYPE_EXCLUDED = "excluded"
PHENOTYPE_DESERT = "desert"
PHENOTYPE_NOT_EVALUABLE = "not_evaluable"
PHENOTYPES = (PHENOTYPE_INFLAMED, PHENOTYPE_EXCLUDED, PHENOTYPE_DESERT)


@dataclass
class PhenotypeRules:
    """The immune-phenotype rule table, applied in this order (first match wins):

    1. fewer than ``min_tumour_tiles`` tumour tiles             → ``not_evaluable``
    2. ``lymph_density_tumour`` ≥ ``inflamed_min_tumour_density`` → ``inflamed``
       (lymphocytes inside the tumour region)
    3. ``lymph_density_margin`` ≥ ``excluded_min_margin_density`` → ``excluded``
       (lymphocytes held in the peri-tumoural stroma band, not inside)
    4. otherwise                                                  → ``desert``

    Densities are area fractions (lymphocyte tiles / compartment tiles; see :mod:`wsi_pipeline.tme.spatial`).
    In the spirit of the international TILs working group: lymphocytes are scored against the stromal
    compartment at the invasive margin (stroma denominator, a band of ``band_um`` µm around the tumour).

    The default thresholds were chosen on class maps drawn by the project's synthetic layout generator
    (:func:`wsi_pipeline.synth.layout.make_class_map`, its own seed, with 0–10 % of tiles relabelled at
    random to mimic classifier errors; band 200 µm, closing of one tile): there they call the generator's
    phenotype for 99–100 % of maps. They are not clinically validated; recalibrate them for real cohorts.
    """

    min_tumour_tiles: int = 3
    inflamed_min_tumour_density: float = 0.10
    excluded_min_margin_density: float = 0.07
    # slides these thresholds were fitted on (`wsi tme --fit-rules`); `wsi tme` refuses to report them with it
    fitted_on: tuple[str, ...] = ()

    def validate(self) -> PhenotypeRules:
        if self.min_tumour_tiles < 1:
            raise ConfigError(f"rules.min_tumour_tiles must be >= 1 (got {self.min_tumour_tiles})")
        for name in ("inflamed_min_tumour_density", "excluded_min_margin_density"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"rules.{name} must be in [0, 1] (got {v})")
        return self


@dataclass
class SpatialConfig:
    """Geometry of the compartments, in µm (converted to the tile grid at the tile stride).

    ``band_um``: width of the peri-tumoural (invasive-margin) band: non-tumour tissue tiles whose centre lies
    within this distance of the tumour region's edge. ``tumour_closing_um``: radius of the morphological
    closing that turns tumour tiles into the tumour region; None = one tile stride (a 4-neighbour cross:
    fills one-tile-wide cracks between tumour tiles, e.g. a streak of lymphocyte tiles through a nest),
    0 = no closing. ``fill_holes``: tissue enclosed by the tumour region joins it (lymphocytes inside a nest are
    intratumoural).
    """

    band_um: float = 200.0
    tumour_closing_um: float | None = None
    fill_holes: bool = True

    def validate(self) -> SpatialConfig:
        if self.band_um <= 0:
            raise ConfigError(f"--band-um must be > 0 (got {self.band_um})")
        if self.tumour_closing_um is not None and self.tumour_closing_um < 0:
            raise ConfigError(f"--tumour-closing-um must be >= 0 (got {self.tumour_closing_um})")
        return self


FOOTPRINTS = ("auto", "dense", "tile", "classifier", "grid")
DENSE_METHODS = ("auto", "fcn", "window")  # wsi_pipeline.tme.dense.METHODS


@dataclass
class TMEConfig:
    """``wsi tme RUN``: the classifier, where its features come from, and the metrics and rules."""

    classifier: str = ""  # folder (or name under models/); '' → the shipped default
    encoder_weights: str | None = None  # local weights for the classifier's encoder, if not shipped
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    rules: PhenotypeRules = field(default_factory=PhenotypeRules)
    roles: ClassRoles = field(default_factory=ClassRoles)
    mpp_tolerance: float = 0.05  # relative µm/px difference accepted between classifier and features
    reuse_features: bool = True  # use RUN/features/<encoder>/ when encoder and µm/px match
    # what is classified: "dense" (overlapping windows of the classifier's field of view, one per map cell,
    # over the area the RUN tiles cover, combined into a class-probability map: wsi_pipeline.tme.dense),
    # "tile" (each whole RUN tile; reuses RUN features), "classifier" (each RUN tile's centre over the
    # field of view, read from the slide), "grid" (the TME's own grid of cells one field of view wide,
    # anchored at the RUN tiles' corner), "auto" ("dense" for a classifier validated for it: trained on context
    # windows and at least as good as "grid" on misaligned held-out mosaics, wsi_pipeline.tme.run.dense_validated;
    # else "grid"; "tile" for a classifier without a field of view)
    footprint: str = "auto"
    dense_method: str = "auto"  # fcn (fully convolutional, CNN encoders) | window (each window embedded) | auto
    # correct the dense map's expected class areas for the classifier's confusions (classifier.json
    # "area_correction", estimated by cross-validation on its training sources); no effect without one
    area_correction: bool = True
    # dense footprint: the composition (area_frac_*, til_fraction, tumour_stroma_ratio) from the window map passed
    # through the classifier's map refinement (classifier.json "map_refinement", wsi_pipeline.tme.refine) when it
    # has one, instead of the global area correction; compartments, densities and the phenotype stay the window
    # map's
    map_refinement: bool = True
    device: str = "auto"
    # bf16 as `wsi extract`: on the misaligned held-out mosaics the dense read-out is the same as with fp32
    # (phenotype 0.967 both, TIL Spearman 0.821 vs 0.820, composition MAE 0.031 vs 0.029), 1.5x faster on CPU
    precision: str = "bf16"
    batch_size: int = 64
    # the dense map's reading threads (decoding releases the GIL; with more than one the next region is read
    # while the current one is computed); 0 = auto: all cores but one with CUDA, as `wsi extract`'s reader
    # processes, one on a CPU (wsi_pipeline.tme.dense.reader_threads). The map does not depend on it.
    num_workers: int = 0
    slide_dirs: list[str] = field(default_factory=list)  # where to look for slides moved since tiling (by name)
    overwrite: bool = False
    write_png: bool = True
    write_geojson: bool = True
    thumbnail_max: int = 1024

    def validate(self) -> TMEConfig:
        self.spatial.validate()
        self.rules.validate()
        if not 0 <= self.mpp_tolerance < 0.5:
            raise ConfigError(f"--mpp-tolerance must be in [0, 0.5) (got {self.mpp_tolerance})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.num_workers < 0:
            raise ConfigError(f"tme num_workers must be >= 0 (0 = auto; got {self.num_workers})")
        if self.footprint not in FOOTPRINTS:
            raise ConfigError(f"--footprint must be one of {', '.join(FOOTPRINTS)} (got {self.footprint!r})")
        if self.dense_method not in DENSE_METHODS:
            raise ConfigError(f"--dense-method must be one of {', '.join(DENSE_METHODS)} "
                              f"(got {self.dense_method!r})")
        return self

    def params(self) -> dict[str, Any]:
        """What changes the per-slide probabilities besides the classifier file and the tiles (the resume
        key). The encoder's weights are pinned by the classifier (checksum), so they are not part of it."""
        out = {"precision": self.precision, "footprint": self.footprint}
        if self.footprint in ("auto", "dense"):
            out["dense_method"] = self.dense_method
        return out


@dataclass
class TissueTrainConfig:
    """``wsi tissue-train``: a linear / MLP head on frozen encoder features of a labelled tile folder."""

    encoder: str = ""  # '' → the default encoder
    data: str = ""
    out: str = ""
    weights: str | None = None
    mpp: float = 0.495  # µm/px of the tiles in ``data`` (kather16: 0.495)
    head: str = "linear"  # linear | mlp
    test_fraction: float = 0.3
    seed: int = 0
    min_sources: int = 8  # classes with fewer source images are split by tile
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    hidden: int = 256
    batch_size: int = 64
    device: str = "auto"
    precision: str = "fp32"
    max_per_class: int = 0  # 0 = all tiles; else subsample (seeded) for a quick run
    final_fit_all: bool = False  # refit on train+test after the held-out evaluation
    feature_cache: str = ""  # folder for embedded tiles (keyed by encoder weights, scale and files); '' = none
    # context windows (wsi_pipeline.tme.context): windows of random mosaics of the training tiles, computed as
    # `wsi tme` computes its dense map, with their class-area fractions as soft labels; 0 = pure tiles only
    context_mosaics: int = 0
    context_windows: int = 600  # windows sampled per mosaic
    context_weight: float = 1.0  # total weight of the context windows relative to the tiles
    context_grid: tuple[int, int] = (10, 12)  # cells per mosaic
    # scale jitter: ``scale_copies`` extra copies of each training tile magnified by a factor drawn uniformly
    # from [1 − j, 1 + j] before embedding (``context_scale_jitter``: each context mosaic too, one factor per
    # mosaic), so the head does not hinge on the exact nucleus size (held out, a 7 % magnification took the
    # lymphocyte recall of a head trained without it from 0.87 to 0.53); 0 = off
    scale_jitter: float = 0.0
    scale_copies: int = 2
    context_scale_jitter: float = 0.0
    # estimate the head's soft confusion matrix by grouped CV on the training tiles, for `wsi tme` to correct
    # the dense map's class areas (classifier.json "area_correction")
    area_correction: bool = False

    def validate(self) -> TissueTrainConfig:
        if self.head not in ("linear", "mlp"):
            raise ConfigError(f"--head must be linear or mlp (got {self.head!r})")
        if self.mpp <= 0:
            raise ConfigError(f"--mpp must be > 0 (got {self.mpp})")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"--test-fraction must be in (0, 1) (got {self.test_fraction})")
        if not self.data:
            raise ConfigError("--data is required: a folder with one sub-folder of tiles per class")
        if not self.out:
            raise ConfigError("--out is required: the folder to write the classifier to")
        if self.context_mosaics < 0 or self.context_windows < 1 or self.context_weight < 0:
            raise ConfigError("--context-mosaics must be ≥ 0, --context-windows ≥ 1 and --context-weight ≥ 0")
        if not (0 <= self.scale_jitter < 0.5 and 0 <= self.context_scale_jitter < 0.5) or self.scale_copies < 0:
            raise ConfigError(f"--scale-jitter and --context-scale-jitter must lie in [0, 0.5) and --scale-copies be "
                              f"≥ 0 (got {self.scale_jitter}, {self.context_scale_jitter}, {self.scale_copies})")
        if self.final_fit_all and self.context_mosaics:
            raise ConfigError("--final-fit-all refits on pure tiles only: use it without --context-mosaics")
        return self


def tme_config_from_dict(data: dict[str, Any]) -> TMEConfig:
    """A :class:`TMEConfig` from a (YAML) mapping with nested ``spatial``, ``rules`` and ``roles``."""
    from wsi_pipeline.config import from_dict

    data = dict(data)
    nested = {"spatial": SpatialConfig, "rules": PhenotypeRules, "roles": ClassRoles}
    kwargs: dict[str, Any] = {}
    for key, cls in nested.items():
        if key in data:
            sub = dict(data.pop(key) or {})
            if cls is ClassRoles:
                sub = {k: tuple(v) for k, v in sub.items()}
            if cls is PhenotypeRules and "fitted_on" in sub:
                sub["fitted_on"] = tuple(str(v) for v in sub["fitted_on"] or ())
            kwargs[key] = from_dict(cls, sub)
    cfg = from_dict(TMEConfig, data)
    return dataclasses.replace(cfg, **kwargs)
