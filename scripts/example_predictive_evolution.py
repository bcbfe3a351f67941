#!/usr/bin/env python
"""End-to-end example of `wsi predictive` and `wsi evolution` on generated slides: two arms, two timepoints.

1. **Cohort.** The project's generator (``wsi_pipeline.synth.cohort``) draws patients randomised 1:1 to
   ``control`` / ``treatment`` (permuted blocks of two), one ``baseline`` slide each and, for a share of
   them, an ``on_treatment`` slide whose microenvironment shifts with arm and response. The response
   depends on the slide's image score (TIL fraction and immune phenotype) **in the treated arm only**
   (``image_effect_control = 0``): a true treatment × biomarker interaction. Slides are small
   (2240×1792 px at 0.5 µm/px, ≈ 45 tiles of 224 px) Aperio-style .svs pyramids.
2. **Pipeline.** ``wsi run SLIDES --out RUN --labels labels.csv``: tiling, features with the shipped
   encoder, predictions of the shipped MIL model ``wsip-demo-mil`` (response, immune phenotype, TIL
   fraction), TME read-out, heatmaps (unless ``--fast``) and the report.
3. **Analyses.**
   ``wsi predictive RUN --labels labels.csv --treatment arm --outcome response
   --biomarker pred:til_fraction_pred --select timepoint=baseline --json RUN/predictive_example.json``
   (the MIL model's slide-level TIL estimate on the pre-treatment slides as the biomarker; the TME
   read-out's ``til_fraction`` would be the other choice, but the shipped tissue classifier, trained on
   kather16 photographs, finds no lymphocytes in these procedural drawings), then
   ``wsi evolution RUN --labels labels.csv --timepoint timepoint --response response``, then
   ``wsi report RUN --labels labels.csv`` (adds the *Predictive biomarker* and *Tumour evolution* sections).
4. **Print** the interaction figures, the subgroup effects, the evolution markdown and the output files
   (``--summary FILE`` also writes them as markdown).

The default seed was chosen (from the labels alone, before any slide was rendered) so that both arms
contain responders and non-responders whose biomarker values overlap — a 12- or 24-patient logistic
interaction model is otherwise easily separated — and so that the first 12 patients (the CI-sized
prefix, ``--patients 12``) have 4 patients with both timepoints, 2 responders and 2 non-responders.
:func:`check_design` verifies this before rendering. With so few patients the interaction test has little
power; ``scripts/sim_predictive.py`` shows the calibration and power of the test itself.

Examples:
    nice python scripts/example_predictive_evolution.py --out /tmp/example_e2e            # 24 patients
    nice python scripts/example_predictive_evolution.py --out /tmp/ci --patients 12 --fast   # CI size
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_pipeline.formats.tables import read_labels_csv
from wsi_pipeline.synth.cohort import CohortParams, OutcomeModel, WriteOptions, labels_frame, plan_cohort, write_cohort

SEED = 319
SIZE = (2240, 1792)
TIMEPOINT_FRACTION = 0.4
BIOMARKER = "pred:til_fraction_pred"  # the MIL model's slide-level TIL fraction (predictions.csv)
MIN_PATIENTS = 10  # `wsi predictive` needs at least 10 analysable patients
JSON_NAME = "predictive_example.json"


def cohort_params(n_patients: int, seed: int = SEED, size: tuple[int, int] = SIZE,
                  timepoint_fraction: float = TIMEPOINT_FRACTION) -> CohortParams:
    """The example cohort: two arms in permuted blocks, baseline + on-treatment slides, response driven
    by the image score in the treated arm only. Patient i is the same for every ``n_patients`` ≥ i."""
    outcome = OutcomeModel(image_effect_control=0.0, image_effect_treatment=1.0)
    return CohortParams(n_patients=n_patients, seed=seed, size_l0=size, two_arms=True, arm_assignment="blocks",
                        timepoint_fraction=timepoint_fraction, multi_slide_fraction=0.0, outcome=outcome)


def check_design(labels: pd.DataFrame) -> list[str]:
    """Why this drawn cohort cannot show the analyses (empty list: it can)."""
    problems = []
    base = labels[labels["timepoint"] == "baseline"]
    if base["patient_id"].nunique() < MIN_PATIENTS:
        problems.append(f"{base['patient_id'].nunique()} patients; `wsi predictive` needs >= {MIN_PATIENTS}")
    for arm, d in base.groupby("arm"):
        n_r, n_nr = int(d["response"].sum()), int((1 - d["response"]).sum())
        if n_r < 2 or n_nr < 2:
            problems.append(f"arm {arm}: {n_r} responders / {n_nr} non-responders (need >= 2 of each)")
    if base["arm"].nunique() != 2:
        problems.append("only one arm drawn")
    tps = labels.groupby("patient_id")["timepoint"].nunique()
    longitudinal = tps[tps >= 2].index
    resp = base.set_index("patient_id").loc[longitudinal, "response"]
    if resp.sum() < 2 or (1 - resp).sum() < 2:
        problems.append(f"{len(longitudinal)} patients with two timepoints, {int(resp.sum())} responders among "
                        "them (need >= 2 responders and >= 2 non-responders for the change-score test)")
    return problems


def same_cohort(slides: Path, planned: pd.DataFrame) -> bool:
    """``slides`` already holds this cohort: the same labels.csv and every slide file."""
    path = slides / "labels.csv"
    if not path.exists():
        return False
    have = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    want = pd.read_csv(io.StringIO(planned.to_csv(index=False)), dtype={"slide_id": str, "patient_id": str})
    return have.equals(want) and all((slides / f"{sid}.svs").is_file() for sid in want["slide_id"])


def wsi(*args: str) -> subprocess.CompletedProcess:
    """Run one `wsi` command (``python -m wsi_pipeline``), echo it, fail loudly."""
    cmd = [sys.executable, "-m", "wsi_pipeline", *args]
    print("$ wsi " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"`wsi {args[0]}` failed with exit code {res.returncode}")
    print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return res


def demote(markdown: str, levels: int = 2) -> str:
    """Headings one or more levels down (to nest a command's markdown in the summary)."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def _num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def predictive_figures(doc: dict[str, Any]) -> str:
    """The headline figures of the `wsi predictive` JSON, as markdown."""
    short = "HR" if doc["model"] == "cox" else "OR"
    lines = [f"- interaction ({doc['interaction_term']}, {doc['interaction_scale']}, biomarker "
             f"`{doc['biomarker']['name']}` {doc['biomarker']['scale']}): **{short} "
             f"{_num(doc['interaction_estimate'])} (95% CI {_num(doc['interaction_ci_low'])}–"
             f"{_num(doc['interaction_ci_high'])}), p = {_num(doc['interaction_p'])}**",
             f"- `{doc['formula']}`, {doc['n_patients']} patients, {doc['n_events']} responders; counts "
             f"{doc['counts']}", "",
             "| group | n | responders control | responders treated | risk difference (95% CI) | OR (95% CI) |",
             "|---|---|---|---|---|---|"]
    for g in [*doc["subgroup_effects"], *([doc["overall_effect"]] if doc.get("overall_effect") else [])]:
        lines.append(f"| {g['group']} | {g['n']} | {g['events_control']}/{g['n_control']} | "
                     f"{g['events_treated']}/{g['n_treated']} | {_num(g['risk_difference'], 2)} "
                     f"({_num(g['risk_difference_ci_low'], 2)} to {_num(g['risk_difference_ci_high'], 2)}) | "
                     f"{_num(g['effect'], 3)} ({_num(g['effect_ci_low'], 3)}–{_num(g['effect_ci_high'], 3)}) |")
    if doc.get("warnings"):
        lines += ["", *(f"- fit warning: {w}" for w in doc["warnings"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="working folder: slides/, RUN/ (created)")
    ap.add_argument("--patients", type=int, default=24, help="patients (the first N of the example cohort)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--size", type=int, nargs=2, default=SIZE, metavar=("W", "H"), help="level-0 size in px")
    ap.add_argument("--timepoint-fraction", type=float, default=TIMEPOINT_FRACTION,
                    help="share of patients who also have an on_treatment slide")
    ap.add_argument("--fast", action="store_true",
                    help="CI mode: `wsi run --no-heatmaps --no-report --workers 0` (stages in-process)")
    ap.add_argument("--workers", type=int, default=1, help="`wsi run --workers` (without --fast)")
    ap.add_argument("--n-boot", type=int, default=1000, help="`wsi evolution --n-boot`")
    ap.add_argument("--summary", type=Path, default=None, help="also write the printed outputs as markdown here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t_start = time.perf_counter()

    params = cohort_params(a.patients, a.seed, tuple(a.size), a.timepoint_fraction)
    planned = labels_frame(plan_cohort(params))
    problems = check_design(planned)
    if problems:
        raise SystemExit("the drawn cohort cannot show the analyses: " + "; ".join(problems)
                         + " — try another --seed or more --patients")
    slides, run = a.out / "slides", a.out / "RUN"
    labels_csv = slides / "labels.csv"
    t0 = time.perf_counter()
    reuse = same_cohort(slides, planned)  # a re-run: the slides are deterministic; `wsi run` resumes too
    if reuse:
        labels = read_labels_csv(labels_csv, numeric=True)
    else:
        labels = write_cohort(slides, params, WriteOptions(truth_dir=""))
    n_long = int((labels.groupby("patient_id")["timepoint"].nunique() >= 2).sum())
    print(f"cohort: {labels['patient_id'].nunique()} patients "
          f"({', '.join(f'{k} {v}' for k, v in labels.drop_duplicates('patient_id')['arm'].value_counts().items())}), "
          f"{len(labels)} slides ({n_long} patients with baseline + on_treatment); "
          + (f"reused from {slides}" if reuse else f"written in {time.perf_counter() - t0:.1f} s to {slides}"),
          flush=True)

    run_args = ["run", str(slides), "--out", str(run), "--labels", str(labels_csv)]
    # --fast: no heatmaps, stages in this process, and no report yet (`wsi report` below writes it)
    run_args += ["--no-heatmaps", "--no-report", "--workers", "0"] if a.fast else ["--workers", str(a.workers)]
    wsi(*run_args)
    json_out = run / JSON_NAME
    pred = wsi("predictive", str(run), "--labels", str(labels_csv), "--treatment", "arm", "--outcome", "response",
               "--biomarker", BIOMARKER, "--select", "timepoint=baseline", "--json", str(json_out))
    evo = wsi("evolution", str(run), "--labels", str(labels_csv), "--timepoint", "timepoint",
              "--response", "response", "--n-boot", str(a.n_boot))
    rep = wsi("report", str(run), "--labels", str(labels_csv))

    doc = json.loads(json_out.read_text())
    evo_md = (run / "analysis" / "evolution" / "evolution.md").read_text()
    outputs = sorted(str(p.relative_to(run)) for p in (run / "analysis").rglob("*") if p.is_file())
    sections = [("labels (first rows)", "```\n" + labels[["slide_id", "patient_id", "arm", "timepoint", "response",
                                                           "immune_phenotype", "til_fraction"]].head(8).to_string(
                                                               index=False) + "\n```"),
                ("wsi predictive (console)", "```\n" + " ".join(pred.stdout.split()) + "\n```"),
                (f"wsi predictive --json {JSON_NAME}", predictive_figures(doc)),
                ("wsi evolution (console)", "```\n" + " ".join(evo.stdout.split()) + "\n```"),
                ("wsi evolution: RUN/analysis/evolution/evolution.md", demote(evo_md)),
                ("wsi report (console)", "```\n" + " ".join(rep.stdout.split()) + "\n```"),
                ("files under RUN/analysis/", "\n".join(f"- `{o}`" for o in outputs))]
    text = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    print("\n" + text)
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s; RUN folder {run}; report {run / 'report.html'}")
    if a.summary:
        header = (f"# End-to-end example: `wsi predictive` and `wsi evolution` on generated slides\n\n"
                  f"`python scripts/example_predictive_evolution.py --out OUT --patients {a.patients} --seed {a.seed}"
                  f"{' --fast' if a.fast else ''}` ({time.perf_counter() - t_start:.0f} s on this machine)\n\n")
        a.summary.write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
