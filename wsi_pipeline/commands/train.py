"""`wsi train`, `wsi predict` and `wsi subgroups`: multi-task MIL models with honest evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        run: Path = typer.Argument(..., help="RUN folder with features/<encoder>/*.h5 (from `wsi extract`)."),
        labels: Path = typer.Option(None, "--labels", "-l", help="Labels CSV: slide_id, patient_id, targets."),
        targets: str = typer.Option(None, "--targets", "-t",
                                    help="e.g. response:binary,immune_phenotype:multiclass,til_fraction:regression,"
                                         "os:survival(os_months,os_event)"),
        model_out: Path = typer.Option(None, "--model-out", "-o", help="Output model directory."),
        config: Path = typer.Option(None, "--config", "-c",
                                    help="YAML with any TrainConfig field (targets as a list); options override."),
        head: str = typer.Option(None, "--head",
                                 help="MIL head: auto (default: chosen among --head-candidates by inner CV within "
                                      "the training folds), abmil, transmil, chowder or meanpool."),
        head_candidates: str = typer.Option(None, "--head-candidates",
                                            help="Heads --head auto compares, simplest first (default "
                                                 "meanpool,abmil)."),
        selection_epochs: int = typer.Option(None, "--selection-epochs",
                                             help="Maximum epochs of the --head auto inner-CV trainings "
                                                  "(default 20)."),
        calibration: str = typer.Option(None, "--calibration",
                                        help="Post-hoc calibration fitted on the out-of-fold predictions: auto "
                                             "(default: binary platt, multiclass temperature), platt, stacked "
                                             "(binary targets read the model's other targets' outputs), "
                                             "temperature, isotonic or none."),
        folds: int = typer.Option(None, "--folds", help="Patient-level CV folds (default 5)."),
        group_by: str = typer.Option(None, "--group-by",
                                     help="Labels column (site, hospital, scanner) whose every value falls in one "
                                          "fold, so out-of-fold figures, the calibrator and the head choice come "
                                          "from models that never saw that group; needs at least --folds values."),
        seed: int = typer.Option(None, "--seed", help="Random seed (folds, initialisation, sampling)."),
        encoder: str = typer.Option(None, "--encoder", "-e", help="Features folder (default: the only one)."),
        covariates: str = typer.Option(None, "--covariates",
                                       help="Comma-separated label columns fused late (e.g. age,stage); also "
                                            "trains covariates-only and image-only models for comparison."),
        epochs: int = typer.Option(None, "--epochs", help="Maximum epochs per fold (default 40)."),
        lr: float = typer.Option(None, "--lr", help="AdamW learning rate (default: the head's, 1e-3; TransMIL 2e-4)."),
        context_rings: int = typer.Option(None, "--context-rings",
                                          help="Spatial context: neighbour-mean rings appended to each tile "
                                               "embedding (default 1; 0 = none)."),
        max_tiles: int = typer.Option(None, "--max-tiles",
                                      help="Random tiles per bag per training step (default 4096; 0 = all)."),
        batch_bags: int = typer.Option(None, "--batch-bags",
                                       help="Slides per optimisation step (default 4); also the Cox risk set of a "
                                            "survival target."),
        no_baseline: bool = typer.Option(False, "--no-baseline", help="Skip the mean-pool baseline."),
        n_bootstrap: int = typer.Option(None, "--n-bootstrap", help="Bootstrap resamples for CIs (default 1000)."),
        device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
        threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
        distribute: str = typer.Option(None, "--distribute",
                                       help="Under torchrun: folds (default: the trainings are dealt across "
                                            "ranks) or bags (every rank trains every model on its share of each "
                                            "step's slides; gradients averaged across ranks)."),
        cache_mb: int = typer.Option(None, "--cache-mb",
                                     help="Bag cache per process in MB (default 2048; 0 = read every bag from "
                                          "disk each time): bounds the memory whatever the cohort size."),
    ) -> None:
        """Cross-validate a multi-task MIL model (+ mean-pool baseline): choose the head (--head auto), calibrate
        on the out-of-fold predictions; write weights, calibrators, cut-offs, OOF predictions and metrics with
        patient-level bootstrap CIs (before/after calibration) to --model-out."""
        from wsi_pipeline.config import from_dict, load_yaml
        from wsi_pipeline.mil.config import TrainConfig
        from wsi_pipeline.mil.covariates import parse_covariates
        from wsi_pipeline.mil.train import run_train

        base: dict[str, Any] = load_yaml(config) if config else {}
        overrides = {
            "labels": str(labels) if labels else None, "targets": targets,
            "model_out": str(model_out) if model_out else None, "head": head, "folds": folds, "group_by": group_by,
            "seed": seed,
            "encoder": encoder, "covariates": parse_covariates(covariates) if covariates else None,
            "epochs": epochs, "lr": lr, "context_rings": context_rings, "max_tiles": max_tiles,
            "batch_bags": batch_bags,
            "n_bootstrap": n_bootstrap, "device": device, "threads": threads, "calibration": calibration,
            "distribute": distribute, "cache_mb": cache_mb,
            "head_candidates": [h.strip() for h in head_candidates.split(",") if h.strip()] if head_candidates
            else None, "selection_epochs": selection_epochs,
        }
        data = {**base, **{k: v for k, v in overrides.items() if v is not None}, "run": str(run)}
        if "covariates" in data:
            data["covariates"] = parse_covariates(data["covariates"])
        if no_baseline:
            data["baseline"] = False
        cfg = from_dict(TrainConfig, data).validate()
        result = _with_status("train", lambda cb: run_train(cfg, progress=cb))
        if result is not None:
            typer.echo(result.model_dir.joinpath("metrics.md").read_text())
            typer.echo(f"model written to {result.model_dir} ({result.seconds:.0f}s)")

    @app.command("predict")
    def predict(
        run: Path = typer.Argument(..., help="RUN folder with features of the model's encoder."),
        model: Path = typer.Option(..., "--model", "-m", help="Model directory from `wsi train`, or a shipped model's name."),
        encoder: str = typer.Option(None, "--encoder", "-e", help="Features folder (default: the model's)."),
        labels: Path = typer.Option(None, "--labels", "-l",
                                    help="Optional labels CSV: patient_id (default slide_id) and covariates."),
        variant: str = typer.Option(None, "--variant", help="Which trained model of DIR (default: the main one)."),
        no_scores: bool = typer.Option(False, "--no-scores", help="Skip per-tile score files."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        force: bool = typer.Option(False, "--force", help="Predict even when the tables are up to date."),
        align_features: bool = typer.Option(
            False, "--align-features",
            help="Standardise the features with this RUN's own statistics instead of the training folds' "
                 "(a cohort from another site or scanner; at least 10 slides, case mix like the training cohort's)."),
    ) -> None:
        """Predict every slide: RUN/predictions.csv, RUN/patient_predictions.csv, RUN/scores/<model>/*.h5."""
        from wsi_pipeline.commands.stageview import failure_footer, print_failures
        from wsi_pipeline.mil.config import PredictConfig
        from wsi_pipeline.mil.predict import run_predict

        cfg = PredictConfig(run=str(run), model=str(model), encoder=encoder, labels=str(labels) if labels else None,
                            variant=variant, write_scores=not no_scores, device=device, force=force,
                            align_features=align_features)
        res = _with_status("predict", lambda cb: run_predict(cfg, status=cb))
        f = res.figures
        if res.note == "up to date":
            typer.echo(f"predictions up to date (same model, features, labels and options) → {f['predictions_csv']}; "
                       "--force to redo")
        else:
            typer.echo(f"{len(res.done)} slides → {f['predictions_csv']}, {f['patient_predictions_csv']}"
                       + (f", scores in {f['scores_dir']}" if f["scores_dir"] else "") + f" ({res.seconds:.1f}s)")
        print_failures([res])
        failure_footer([res], run)
        if not res.ok:
            raise typer.Exit(1)

    @app.command("subgroups")
    def subgroups(
        run: Path = typer.Argument(..., help="RUN folder (predicted with `wsi predict`, or the training RUN)."),
        model: Path = typer.Option(..., "--model", "-m", help="Model directory from `wsi train`, or a shipped model's name."),
        labels: Path = typer.Option(..., "--labels", "-l", help="Labels CSV with the observed outcomes."),
        target: str = typer.Option(None, "--target", help="Binary response target (default: the model's)."),
        phenotype: str = typer.Option(None, "--phenotype", help="Multiclass target to cross with."),
        survival: str = typer.Option(None, "--survival", help="Survival target for Kaplan–Meier curves."),
        source: str = typer.Option("auto", "--source",
                                   help="auto (OOF on the training RUN, else predictions), oof or predictions."),
    ) -> None:
        """Responder rate per predicted-response subgroup (cut-offs fixed at training), by TME phenotype;
        Kaplan–Meier curves and log-rank p for a survival target."""
        from wsi_pipeline.mil.config import SubgroupsConfig
        from wsi_pipeline.mil.subgroups import run_subgroups

        cfg = SubgroupsConfig(run=str(run), model=str(model), labels=str(labels), target=target,
                              phenotype=phenotype, survival=survival, source=source)
        res = run_subgroups(cfg)
        typer.echo((res.out_dir / "subgroups.md").read_text())
        typer.echo(f"written to {res.out_dir}")

    _register_evaluate(app)


def _register_evaluate(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        run: Path = typer.Argument(..., help="RUN folder predicted with `wsi predict --model DIR`."),
        model: Path = typer.Option(..., "--model", "-m", help="Model directory from `wsi train`, or a shipped model's name."),
        labels: Path = typer.Option(..., "--labels", "-l", help="Labels CSV of this (held-out) cohort."),
        n_bootstrap: int = typer.Option(1000, "--n-bootstrap", help="Patient-level bootstrap resamples."),
        seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    ) -> None:
        """Held-out metrics with patient-level bootstrap CIs of RUN/predictions.csv against a labels CSV."""
        from wsi_pipeline.mil.config import EvaluateConfig
        from wsi_pipeline.mil.predict import run_evaluate

        out, _ = run_evaluate(EvaluateConfig(run=str(run), model=str(model), labels=str(labels),
                                             n_bootstrap=n_bootstrap, seed=seed))
        typer.echo((out / "metrics.md").read_text())
        typer.echo(f"written to {out}")


def _with_status(name: str, fn: Any) -> Any:
    import os

    from rich.console import Console

    if int(os.environ.get("RANK", "0")) != 0:
        return fn(None)
    console = Console(stderr=True)
    with console.status(f"[bold]{name}[/bold]") as status:
        return fn(lambda msg: status.update(f"[bold]{name}[/bold] {msg}"))
