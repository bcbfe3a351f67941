"""`wsi predictive` and `wsi evolution`: analyses on top of predictions.csv and tme.csv."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("predictive")
    def predictive(
        run: Path = typer.Argument(..., help="RUN folder (predictions.csv / tme.csv are joined on slide_id)."),
        labels: Path = typer.Option(..., "--labels", help="Labels CSV: slide_id, patient_id, arm, outcome, ..."),
        treatment: str = typer.Option(..., "--treatment", help="Treatment-arm column (two values)."),
        outcome: str = typer.Option(..., "--outcome", help="Binary outcome column, or the time column with --event."),
        event: str | None = typer.Option(None, "--event", help="Event column (0/1): survival analysis (Cox)."),
        biomarker: str | None = typer.Option(
            None, "--biomarker",
            help="Column of predictions.csv, tme.csv or labels (prefix pred:/tme:/label: if ambiguous); "
                 "default: the model's predicted probability (or risk) for the outcome."),
        cutoff: str | None = typer.Option(
            None, "--cutoff", help="Dichotomise: a value (0.5), or median-train / q0.67-train (learned on training "
                                   "data only). Default: continuous."),
        train_split: str | None = typer.Option(
            None, "--train-split", help="COL=VALUE marking training patients: the cut-off is learned on them and "
                                        "they are left out of the analysis."),
        positive: str | None = typer.Option(None, "--positive", help="Categorical biomarker: the level coded 1."),
        treated: str | None = typer.Option(None, "--treated", help="Value of the treated arm (default: guessed)."),
        covariates: str | None = typer.Option(None, "--covariates", help="Adjustment covariates, comma-separated."),
        select: list[str] = typer.Option([], "--select", help="Slide filter COL=VALUE (repeatable), "
                                                             "e.g. timepoint=baseline."),
        model: Path | None = typer.Option(None, "--model", help="MIL model DIR (or a shipped model's name): its "
                                                               "oof_predictions.csv is the training subset for a "
                                                               "learned cut-off."),
        scale: str = typer.Option("sd", "--scale", help="Continuous biomarker: interaction per SD (sd) or per unit."),
        json_out: Path | None = typer.Option(None, "--json", help="Also write the result JSON here."),
    ) -> None:
        """Treatment × biomarker interaction (logistic or Cox), subgroup effects and forest plot →
        RUN/analysis/predictive/."""
        from rich.console import Console

        from wsi_pipeline.analysis.config import PredictiveConfig, split_list
        from wsi_pipeline.analysis.predictive import interpretation, run_predictive

        cfg = PredictiveConfig(
            run=str(run), labels=str(labels), treatment=treatment, outcome=outcome, event=event,
            biomarker=biomarker, cutoff=cutoff, train_split=train_split, positive=positive, treated=treated,
            covariates=split_list(covariates), select=list(select), model_dir=str(model) if model else None,
            scale=scale, json_out=str(json_out) if json_out else None,
        )
        result = run_predictive(cfg)
        console = Console()
        console.print(interpretation(result))
        console.print(f"outputs: {result.outputs['markdown']}")

    @app.command("evolution")
    def evolution(
        run: Path = typer.Argument(..., help="RUN folder with tme.csv and/or predictions.csv."),
        labels: Path = typer.Option(..., "--labels", help="Labels CSV: slide_id, patient_id, timepoint, ..."),
        timepoint: str = typer.Option(..., "--timepoint", help="Timepoint column."),
        order: str | None = typer.Option(None, "--order", help="Timepoints in time order, comma-separated "
                                                               "(default: numeric or known names)."),
        response: str | None = typer.Option(None, "--response", help="Binary column: responders vs "
                                                                     "non-responders for the change scores."),
        metrics: str | None = typer.Option(None, "--metrics", help="Numeric read-outs, comma-separated "
                                                                   "(default: TME fractions + model scores)."),
        phenotypes: str | None = typer.Option(None, "--phenotypes", help="Categorical read-outs for the "
                                                                         "transition tables (default: immune "
                                                                         "phenotypes)."),
        select: list[str] = typer.Option([], "--select", help="Slide filter COL=VALUE (repeatable), "
                                                             "e.g. arm=treatment."),
        n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap resamples for the effect-size CIs."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Per-patient trajectories over timepoints, phenotype transitions, change scores by response →
        RUN/analysis/evolution/."""
        from rich.console import Console

        from wsi_pipeline.analysis.config import EvolutionConfig, split_list
        from wsi_pipeline.analysis.evolution import run_evolution

        cfg = EvolutionConfig(run=str(run), labels=str(labels), timepoint=timepoint, order=split_list(order),
                              response=response, metrics=split_list(metrics), phenotypes=split_list(phenotypes),
                              select=list(select), n_boot=n_boot, seed=seed)
        result = run_evolution(cfg)
        console = Console()
        console.print(f"{result.n_patients} patients over {len(result.order)} timepoints "
                      f"({' → '.join(result.order)}); outputs: {result.outputs['markdown']}")
