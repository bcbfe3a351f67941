"""Helpers of the federated tests: generated sites (``wsi_pipeline.mil.simulate``) and the CLI entry point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wsi_pipeline.mil.simulate import SimSpec, simulate_feature_cohort

SITES = ("A", "B", "C")
ALL_TARGETS = "response:binary,immune_phenotype:multiclass,til_fraction:regression,os:survival(os_months,os_event)"


def make_site(root: Path, name: str, seed: int, n_patients: int = 14, target_mpp: float = 0.5) -> tuple[Path, Path]:
    """One site: ``root/name/run`` (features of the shared simulated encoder) and ``root/name/labels.csv``."""
    spec = SimSpec(n_patients=n_patients, embed_dim=8, grid=6, amplitude=4.0, signal_fraction=0.15, seed=seed,
                   target_mpp=target_mpp, id_prefix=name)
    labels = simulate_feature_cohort(root / name / "run", root / name / "labels.csv", spec)
    return root / name / "run", labels


def site_args(sites: dict[str, tuple[Path, Path]], names: str) -> list[str]:
    out: list[str] = []
    for n in names:
        run, labels = sites[n]
        out += ["--site", f"{n}={run}:{labels}"]
    return out


def wsi_main(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """``wsi ARGS`` through the CLI's entry point: exit code and everything printed."""
    from wsi_pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["wsi", *args])
    with pytest.raises(SystemExit) as ex:
        main()
    out = capsys.readouterr()
    return int(ex.value.code or 0), out.out + out.err


def subcommand_options(name: str) -> set[str]:
    import typer

    from wsi_pipeline.cli import build_app

    cmd = typer.main.get_command(build_app()).commands["federated"].commands[name]
    return {o for p in cmd.params for o in p.opts if o.startswith("--")}
