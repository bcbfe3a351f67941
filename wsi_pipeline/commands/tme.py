"""`wsi tissue-train` (tile tissue classifier) and `wsi tme RUN` (TME composition and immune phenotype)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from wsi_pipeline.commands.tiling_options import slide_dir_list, slide_dir_option


def register(app: typer.Typer) -> None:
    @app.command("tissue-train")
    def tissue_train(
        data: Path = typer.Option(..., "--data", help="Tile folder, one sub-folder per class."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder to write the classifier to."),
        encoder: str = typer.Option("", "--encoder", help="Encoder (default: the demo encoder)."),
        weights: str = typer.Option(None, "--weights", help="Local weights for the encoder."),
        mpp: float = typer.Option(0.495, "--mpp", help="µm/px of the tiles in --data (kather16: 0.495)."),
        head: str = typer.Option("linear", "--head", help="linear or mlp."),
        test_fraction: float = typer.Option(0.3, "--test-fraction", help="Held-out share (by source)."),
        seed: int = typer.Option(0, "--seed", help="Split and training seed."),
        epochs: int = typer.Option(300, "--epochs", help="Full-batch training steps of the head."),
        max_per_class: int = typer.Option(0, "--max-per-class", help="Subsample each class (0 = all tiles)."),
        final_fit_all: bool = typer.Option(False, "--final-fit-all",
                                           help="Refit on all tiles after evaluating."),
        feature_cache: Path = typer.Option(None, "--feature-cache",
                                           help="Folder caching the embedded tiles (re-fits are instant)."),
        context_mosaics: int = typer.Option(0, "--context-mosaics",
                                            help="Also fit on windows of this many random mosaics of the training "
                                                 "tiles, labelled with their class-area fractions (for the dense "
                                                 "map of `wsi tme`; 0 = tiles only)."),
        context_windows: int = typer.Option(600, "--context-windows", help="Windows sampled per mosaic."),
        context_weight: float = typer.Option(1.0, "--context-weight",
                                             help="Weight of all context windows relative to all tiles."),
        scale_jitter: float = typer.Option(0.0, "--scale-jitter",
                                           help="Also fit on copies of the training tiles magnified by a random "
                                                "factor in [1 − J, 1 + J] (e.g. 0.1), so the head does not hinge "
                                                "on the exact nucleus size; 0 = off."),
        scale_copies: int = typer.Option(2, "--scale-copies",
                                         help="Magnified copies of each training tile with --scale-jitter."),
        context_scale_jitter: float = typer.Option(0.0, "--context-scale-jitter",
                                                   help="Magnify each context mosaic by a random factor in "
                                                        "[1 − J, 1 + J]; 0 = off."),
        area_correction: bool = typer.Option(False, "--area-correction",
                                             help="Estimate the head's soft confusion matrix (grouped CV on the "
                                                  "training sources) for `wsi tme` to correct class areas."),
        batch_size: int = typer.Option(64, "--batch-size"),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        precision: str = typer.Option("fp32", "--precision", help="bf16, fp16 or fp32."),
    ) -> None:
        """Fit a tissue-class head on frozen encoder features of a labelled tile folder (split by source
        image), at the encoder's µm/px; report held-out balanced accuracy and the confusion matrix."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from wsi_pipeline.tme.classifier import format_confusion
        from wsi_pipeline.tme.config import TissueTrainConfig
        from wsi_pipeline.tme.train import run_tissue_train

        cfg = TissueTrainConfig(
            encoder=encoder, data=str(data), out=str(out), weights=weights, mpp=mpp, head=head,
            test_fraction=test_fraction, seed=seed, epochs=epochs, max_per_class=max_per_class,
            final_fit_all=final_fit_all, batch_size=batch_size, device=device, precision=precision,
            feature_cache=str(feature_cache or ""), context_mosaics=context_mosaics,
            context_windows=context_windows, context_weight=context_weight, area_correction=area_correction,
            scale_jitter=scale_jitter, scale_copies=scale_copies, context_scale_jitter=context_scale_jitter,
        ).validate()
        with Progress(TextColumn("[bold]embed tiles"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as progress:
            task = progress.add_task("", total=None)

            def tick(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            clf = run_tissue_train(cfg, progress=tick)
        c = Console()
        held = clf.metrics["held_out"]
        base = clf.metrics["colour_baseline_held_out"]
        c.print(f"classifier: {out}  (encoder {clf.encoder}, {clf.embed_dim}-d, at {clf.mpp:g} µm/px, "
                f"{clf.n_classes} classes)")
        c.print(f"held-out balanced accuracy: [bold]{held['balanced_accuracy']:.3f}[/bold] "
                f"(accuracy {held['accuracy']:.3f}, n={held['n']}); colour-only baseline "
                f"{base['balanced_accuracy']:.3f}")
        c.print(format_confusion(held), markup=False, highlight=False)
        ctx = clf.metrics.get("held_out_context")
        if ctx:
            c.print(f"held-out context windows: area-fraction MAE per window {ctx['window_mae']:.3f}, per mosaic "
                    f"{ctx['composition_mae']:.3f} ({ctx['n_windows']} windows of {ctx['n_mosaics']} mosaics)")

    @app.command("tme")
    def tme(
        run: Path = typer.Argument(..., help="RUN folder (with tiles/)."),
        classifier: str = typer.Option("", "--classifier", help="Classifier folder (default: shipped)."),
        band_um: float = typer.Option(None, "--band-um", help="Width of the peri-tumoural band, µm [200]."),
        tumour_closing_um: float = typer.Option(None, "--tumour-closing-um",
                                                help="Tumour-region closing radius, µm (default 1 tile)."),
        inflamed_min: float = typer.Option(None, "--inflamed-min",
                                           help="Rule: tumour density ≥ this → inflamed [0.10]."),
        excluded_min: float = typer.Option(None, "--excluded-min",
                                           help="Rule: else margin density ≥ this → excluded [0.07]."),
        min_tumour_tiles: int = typer.Option(None, "--min-tumour-tiles",
                                             help="Fewer tumour tiles → not_evaluable [3]."),
        config: Path = typer.Option(None, "--config",
                                    help="YAML with a `tme:` section (options given here override it)."),
        encoder_weights: str = typer.Option(None, "--encoder-weights",
                                            help="Weights of the classifier's encoder."),
        footprint: str = typer.Option(None, "--footprint",
                                      help="What is classified: auto (the default: dense for a classifier "
                                           "trained on context windows and validated against grid on misaligned "
                                           "mosaics, see its classifier.json footprint_eval; else grid) | dense "
                                           "(overlapping windows of the classifier's field of view, one per 16-µm "
                                           "cell, combined into a class-probability map over the area the RUN "
                                           "tiles cover) | grid (the TME's own grid of field-of-view cells "
                                           "anchored at the tiles' corner) | tile (each whole tile, reusing "
                                           "RUN/features) | classifier (each tile's centre over the field of "
                                           "view)."),
        dense_method: str = typer.Option(None, "--dense-method",
                                         help="How the dense map's windows are computed: auto (as the classifier "
                                              "was trained) | fcn (the encoder's feature map over large regions, "
                                              "CNN encoders) | window (each window embedded on its own)."),
        no_area_correction: bool = typer.Option(False, "--no-area-correction",
                                                help="Report the dense map's raw expected areas, without the "
                                                     "classifier's confusion correction."),
        no_map_refinement: bool = typer.Option(False, "--no-map-refinement",
                                               help="Dense footprint: read the window map as it is, without the "
                                                    "classifier's map refinement (a small network, or an ensemble of "
                                                    "them, reading each map cell with its neighbourhood; "
                                                    "classifier.json "
                                                    "map_refinement; only for maps of the geometry it was fitted "
                                                    "on)."),
        fit_rules: bool = typer.Option(False, "--fit-rules",
                                       help="After the read-out, fit the phenotype thresholds to --labels "
                                            "(column immune_phenotype; 5-fold CV) and write them to "
                                            "RUN/configs/tme-fit-rules.yaml for `wsi tme OTHER_RUN --config`; "
                                            "this RUN's tme.csv keeps the rules it was read with."),
        no_reuse_features: bool = typer.Option(False, "--no-reuse-features",
                                               help="Always embed from the slides (ignore RUN/features)."),
        batch_size: int = typer.Option(64, "--batch-size"),
        device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
        slide_dir: list[Path] = slide_dir_option(),
        num_workers: int = typer.Option(None, "--num-workers",
                                        help="Threads reading the dense map's regions, the next region read "
                                             "while the current one is computed (0 = auto: all cores but one "
                                             "with CUDA, as `wsi extract`; 1 on a CPU). The map is the same "
                                             "whatever it is."),
        precision: str = typer.Option("bf16", "--precision",
                                      help="Autocast of the classifier's encoder: bf16 (default, as `wsi extract`; "
                                           "same read-out as fp32 on the held-out mosaics, 1.5x faster on CPU), "
                                           "fp16 or fp32."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Recompute stored per-tile probabilities."),
        labels: Path = typer.Option(None, "--labels", help="Labels CSV (slide_id) to join the read-out to."),
        labels_out: Path = typer.Option(None, "--labels-out",
                                        help="Write labels + tme_* columns here (for `wsi train`)."),
    ) -> None:
        """Per-tile tissue classes, class maps, QuPath GeoJSON and RUN/tme.csv (composition, TIL fraction,
        intratumoural vs margin lymphocyte density, tumour–stroma ratio, immune phenotype).

        RUN/tme.csv has one row per slide keyed by slide_id: `wsi report` and the analyses read it from the
        RUN; for `wsi train`, --labels/--labels-out writes the labels joined with tme_* columns."""
        import dataclasses

        from rich.console import Console

        from wsi_pipeline.commands.stageview import failure_footer, print_failures, stage_progress
        from wsi_pipeline.config import load_yaml
        from wsi_pipeline.runfolder.layout import RunLayout
        from wsi_pipeline.tme.config import TMEConfig, tme_config_from_dict
        from wsi_pipeline.tme.run import run_tme

        base = tme_config_from_dict(load_yaml(config).get("tme", {}) or {}) if config else TMEConfig()

        def pick(value: Any, default: Any) -> Any:  # an option given on the command line wins
            return default if value is None else value

        cfg = dataclasses.replace(
            base,
            classifier=classifier or base.classifier,
            encoder_weights=encoder_weights or base.encoder_weights,
            spatial=dataclasses.replace(base.spatial, band_um=pick(band_um, base.spatial.band_um),
                                        tumour_closing_um=pick(tumour_closing_um, base.spatial.tumour_closing_um)),
            rules=dataclasses.replace(
                base.rules, min_tumour_tiles=pick(min_tumour_tiles, base.rules.min_tumour_tiles),
                inflamed_min_tumour_density=pick(inflamed_min, base.rules.inflamed_min_tumour_density),
                excluded_min_margin_density=pick(excluded_min, base.rules.excluded_min_margin_density)),
            reuse_features=not no_reuse_features and base.reuse_features,
            footprint=pick(footprint, base.footprint), dense_method=pick(dense_method, base.dense_method),
            area_correction=base.area_correction and not no_area_correction,
            map_refinement=base.map_refinement and not no_map_refinement,
            batch_size=batch_size, device=device, precision=precision, overwrite=overwrite,
            num_workers=pick(num_workers, base.num_workers), slide_dirs=slide_dir_list(slide_dir) or base.slide_dirs,
        ).validate()
        if fit_rules and labels is None:
            raise typer.BadParameter("--fit-rules needs --labels CSV (slide_id, immune_phenotype)")
        with stage_progress() as progress:
            summary = run_tme(run, cfg, progress=progress)
        c = Console(stderr=True)
        n_rows = len(summary.outcomes) - len(summary.failed)
        c.print(f"wrote {summary.figures['csv']} ({n_rows} slides); failed {len(summary.failed)}")
        if labels is not None:
            from wsi_pipeline.tme.run import join_tme_to_labels

            target = labels_out or RunLayout(run).tme_labels_csv
            c.print(f"wrote {join_tme_to_labels(labels, summary.figures['csv'], target)} (labels + tme_* columns)")
        if fit_rules and summary.ok:
            from wsi_pipeline.tme.run import fit_rules_on_run

            path, rep = fit_rules_on_run(run, labels, cfg)
            f = rep["fitted"]
            c.print(f"fitted phenotype rules on {rep['n_slides']} labelled slides: inflamed_min_tumour_density="
                    f"{f['inflamed_min_tumour_density']:g}, excluded_min_margin_density="
                    f"{f['excluded_min_margin_density']:g} (accuracy {rep['accuracy_base_rules']:.3f} with the "
                    f"starting rules, {rep['accuracy_fitted_rules']:.3f} fitted, {rep['cv_accuracy']:.3f} in "
                    f"{rep['folds']}-fold CV); wrote {path} — apply to another RUN with --config {path}")
        print_failures([summary])
        failure_footer([summary], run)
        if not summary.ok:
            raise typer.Exit(1)
