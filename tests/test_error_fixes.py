"""Every typed error a user can meet through the CLI says how to fix it with an option of the command that
printed it.

The test walks the typed errors of :mod:`wsi_pipeline.errors`: for each class, one or more real scenarios
through the commands that slides, labels, models and encoders reach (``wsi tile``, ``wsi run``,
``wsi extract``, ``wsi info``, ``wsi tme``). In every message printed, each ``--option`` offered as a fix
must be an option of that command; a fix that names another command does so in backticks
(```wsi tile ... --target-mpp 0.5```), and such a quoted command's options must be its own.
"""

from __future__ import annotations

import inspect
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from wsi_pipeline import errors as E

REPO = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
QUOTED = re.compile(r"`wsi ([a-z-]+)([^`]*)`")

# classes a user cannot meet through the CLI with their own input (raised on misuse of the Python API)
NOT_FROM_THE_CLI = {E.RegionOutOfBoundsError}
# `wsi federated` subcommands' errors, walked through that CLI by tests/federated (they need the optional extra
# and Flower processes): MissingExtraError in test_federated_protocol.py, FederatedError in test_federated_faults.py
WALKED_IN_TESTS_FEDERATED = {E.MissingExtraError, E.FederatedError}


def _command_options() -> dict[str, set[str]]:
    import typer

    from wsi_pipeline.cli import build_app

    group = typer.main.get_command(build_app())
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for name, cmd in group.commands.items()}


def _wsi(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    from wsi_pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["wsi", *args])
    with pytest.raises(SystemExit) as ex:
        main()
    out = capsys.readouterr()
    return int(ex.value.code or 0), out.out + out.err


def check_fixes(command: str, text: str, options: dict[str, set[str]]) -> list[str]:
    """The options offered in ``text`` that the command meant does not have."""
    bad = []
    for other, rest in QUOTED.findall(text):
        bad += [f"`wsi {other}` {o}" for o in OPTION.findall(rest) if o not in options.get(other, set())]
    bare = QUOTED.sub("", text)
    bad += [f"wsi {command} {o}" for o in OPTION.findall(bare) if o not in options[command]]
    return bad


def _truncated(src: Path, dst: Path, n: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n])
    return dst


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    return _command_options()


@pytest.fixture
def inputs(tmp_path: Path, cmu_svs: Path, tcga_svs: Path) -> dict[str, Path]:
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(REPO / "data_samples" / "P003_1.svs", one / "P003_1.svs")
    nompp = tmp_path / "nompp"
    nompp.mkdir()
    shutil.copy(tcga_svs, nompp / tcga_svs.name)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    _truncated(cmu_svs, trunc / "trunc.svs", 1_500_000)  # its directories, not its tiles: once read as "no MPP"
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,response\nP003_1,1\nP003_1,0\n")
    bad_tiles = tmp_path / "badrun"
    (bad_tiles / "tiles").mkdir(parents=True)
    (bad_tiles / "tiles" / "x.h5").write_bytes(b"not hdf5")
    other_mpp = tmp_path / "other_mpp"  # features of the demo model's encoder, but at 1 µm/px
    import numpy as np

    from wsi_pipeline.formats import api as F
    from wsi_pipeline.formats.cards import read_model_json

    enc = read_model_json(REPO / "models" / "wsip-demo-mil")["encoder"]
    F.write_features_h5(other_mpp / "features" / enc["name"] / "s1.h5", np.zeros((4, int(enc["embed_dim"])), np.float16),
                        np.zeros((4, 2), np.int64), {F.A_ENCODER: enc["name"], F.A_TARGET_MPP: 1.0,
                                                     F.A_WEIGHTS_SHA256: enc.get("weights_sha256", "")})
    return {"one": one, "nompp": nompp, "other_mpp": other_mpp, "trunc": trunc, "text": text, "labels": labels, "badrun": bad_tiles,
            "empty": tmp_path / "emptyrun", "out": tmp_path / "out"}


# (error class, command, arguments built from the inputs); each expects a non-zero exit naming the class
SCENARIOS: list[tuple[type[E.WSIPipelineError], str, Callable[[dict[str, Path]], list[str]]]] = [
    (E.SlideNotFoundError, "tile", lambda i: [str(i["out"] / "nowhere"), "--out", str(i["out"])]),
    (E.SlideNotFoundError, "run", lambda i: [str(i["out"] / "nowhere"), "--out", str(i["out"])]),
    (E.CorruptSlideError, "tile", lambda i: [str(i["trunc"]), "--out", str(i["out"])]),
    (E.CorruptSlideError, "run", lambda i: [str(i["trunc"]), "--out", str(i["out"])]),
    (E.CorruptSlideError, "info", lambda i: [str(i["trunc"] / "trunc.svs")]),
    (E.MissingMPPError, "tile", lambda i: [str(i["nompp"]), "--out", str(i["out"])]),
    (E.MissingMPPError, "run", lambda i: [str(i["nompp"]), "--out", str(i["out"])]),
    (E.UnsupportedFormatError, "tile", lambda i: [str(i["text"]), "--out", str(i["out"])]),
    (E.UnsupportedFormatError, "info", lambda i: [str(i["text"])]),
    (E.ConfigError, "tile", lambda i: [str(i["one"]), "--out", str(i["out"]), "--tile-size", "4"]),
    (E.ConfigError, "run", lambda i: [str(i["one"]), "--out", str(i["out"]), "--target-mpp", "1.0"]),
    (E.ConfigError, "run", lambda i: [str(i["one"]), "--out", str(i["out"]), "--model", "no-such-model"]),
    (E.LabelsError, "run", lambda i: [str(i["one"]), "--out", str(i["out"]), "--labels", str(i["labels"])]),
    (E.UnknownNameError, "run", lambda i: [str(i["one"]), "--out", str(i["out"]), "--encoder", "no-such-encoder"]),
    (E.UnknownNameError, "extract", lambda i: [str(i["empty"]), "--encoder", "no-such-encoder"]),
    (E.WeightsError, "run", lambda i: [str(i["one"]), "--out", str(i["out"]), "--encoder", "uni",
                                       "--weights", str(i["out"] / "missing.bin")]),
    (E.ScaleMismatchError, "predict", lambda i: [str(i["other_mpp"]), "--model", str(REPO / "models" / "wsip-demo-mil")]),
    (E.TilesNotFoundError, "extract", lambda i: [str(i["empty"])]),
    (E.TilesNotFoundError, "tme", lambda i: [str(i["empty"])]),
    (E.FormatError, "extract", lambda i: [str(i["badrun"])]),
]


@pytest.mark.parametrize(("cls", "command", "args"), SCENARIOS,
                         ids=[f"{c.__name__}-{cmd}-{k}" for k, (c, cmd, _) in enumerate(SCENARIOS)])
def test_error_names_its_cause_and_a_fix_the_command_accepts(
    cls: type[E.WSIPipelineError], command: str, args: Callable[[dict[str, Path]], list[str]],
    inputs: dict[str, Path], options: dict[str, set[str]], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs["empty"].mkdir(exist_ok=True)
    rc, text = _wsi(capsys, monkeypatch, command, *args(inputs))
    assert rc != 0, text
    assert cls.__name__ in text, text  # the type, then the message with its fix
    assert check_fixes(command, text, options) == [], text


def test_every_typed_error_is_walked() -> None:
    classes = {c for _, c in inspect.getmembers(E, inspect.isclass)
               if issubclass(c, E.WSIPipelineError) and c.__module__ == E.__name__}
    leaves = {c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)}
    walked = {cls for cls, _, _ in SCENARIOS}
    assert leaves - NOT_FROM_THE_CLI - WALKED_IN_TESTS_FEDERATED - walked == set()


def test_missing_path_creates_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "RUN"
    rc, text = _wsi(capsys, monkeypatch, "run", str(tmp_path / "no" / "slides"), "--out", str(out))
    assert rc == 2 and "no such file or folder" in text and str(tmp_path / "no" / "slides") in text
    assert not out.exists()


def test_truncated_is_damaged_not_missing_mpp(tmp_path: Path, cmu_svs: Path, tcga_svs: Path,
                                              generic_tiff: Path) -> None:
    """Checked before the metadata: whichever byte the copy stopped at, never MissingMPPError."""
    from wsi_pipeline.slide.open import open_slide

    for src in (cmu_svs, tcga_svs, generic_tiff):
        size = src.stat().st_size
        for n in (102_400, size // 2, size - 1000):
            with pytest.raises(E.CorruptSlideError, match="truncated or damaged"):
                open_slide(_truncated(src, tmp_path / f"{n}{src.suffix}", n))
    with open_slide(cmu_svs) as s:  # the whole file still opens
        assert s.mpp == pytest.approx(0.499)


def test_the_checker_finds_unknown_options(options: dict[str, set[str]]) -> None:
    assert check_fixes("run", "pass --slide-mpp 0.25 or --no-such-flag", options) == ["wsi run --no-such-flag"]
    assert check_fixes("run", "re-tile with `wsi tile --target-mpp 0.5`", options) == []
    assert check_fixes("run", "use `wsi extract --nope`", options) == ["`wsi extract` --nope"]
