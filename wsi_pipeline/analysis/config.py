"""Configuration of the analyses (`wsi predictive`, `wsi evolution`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsi_pipeline.analysis.cutoff import parse_cutoff
from wsi_pipeline.errors import ConfigError


def split_list(text: str | None) -> list[str]:
    """'a, b,c' → ['a', 'b', 'c']; None/'' → []."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


@dataclass
class PredictiveConfig:
    """Treatment × biomarker interaction. ``event`` given → survival (Cox, ``outcome`` is the time column);
    otherwise the outcome is binary (logistic)."""

    run: str
    labels: str
    treatment: str
    outcome: str
    event: str | None = None
    biomarker: str | None = None  # default: the model's predicted probability/risk for the outcome
    cutoff: str | None = None  # None (continuous) | number | median-train | q<p>-train
    train_split: str | None = None  # COL=VALUE: training patients (learn the cut-off; left out of the analysis)
    positive: str | None = None  # for a categorical biomarker: the level coded 1 (e.g. inflamed)
    treated: str | None = None  # the treated arm's value in the treatment column
    covariates: list[str] = field(default_factory=list)
    select: list[str] = field(default_factory=list)  # COL=VALUE slide filters, e.g. timepoint=baseline
    model_dir: str | None = None  # MIL model dir: oof_predictions.csv as the training subset for the cut-off
    scale: str = "sd"  # continuous biomarker: interaction per standard deviation ("sd") or per unit ("unit")
    json_out: str | None = None

    @property
    def survival(self) -> bool:
        return bool(self.event)

    def validate(self) -> PredictiveConfig:
        spec = parse_cutoff(self.cutoff)
        if spec is not None and spec.needs_training and not (self.train_split or self.model_dir):
            raise ConfigError(
                f"--cutoff {self.cutoff} is learned on training data: pass --train-split COL=VALUE (labelled "
                "training patients) or --model DIR (its out-of-fold predictions); never on the test data"
            )
        if self.train_split and "=" not in self.train_split:
            raise ConfigError(f"--train-split '{self.train_split}': expected COL=VALUE, e.g. split=train")
        if self.scale not in ("sd", "unit"):
            raise ConfigError(f"--scale must be 'sd' or 'unit' (got {self.scale!r})")
        if self.biomarker and self.biomarker in (self.treatment, self.outcome):
            raise ConfigError("--biomarker must differ from --treatment and --outcome")
        return self


@dataclass
class EvolutionConfig:
    """Trajectories over timepoints of the TME read-out and model scores."""

    run: str
    labels: str
    timepoint: str
    order: list[str] = field(default_factory=list)  # timepoint values in time order; default: inferred
    response: str | None = None  # binary column: responders vs non-responders for the change scores
    metrics: list[str] = field(default_factory=list)  # numeric read-outs; default: TME fractions + model scores
    phenotypes: list[str] = field(default_factory=list)  # categorical read-outs; default: immune phenotypes
    select: list[str] = field(default_factory=list)  # COL=VALUE slide filters, e.g. arm=treatment
    n_boot: int = 2000
    seed: int = 0

    def validate(self) -> EvolutionConfig:
        if len(set(self.order)) != len(self.order):
            raise ConfigError(f"--order {','.join(self.order)}: a timepoint is listed twice")
        if self.n_boot < 100:
            raise ConfigError(f"--n-boot must be >= 100 (got {self.n_boot})")
        return self
