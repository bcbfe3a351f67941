"""`wsi ssl-train --config`: a YAML of SSLConfig fields (``augment:`` a section), options given on the
command line override it, unknown keys name the file, and the resolved config lands next to the encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from wsi_pipeline.cli import build_app
from wsi_pipeline.config import to_dict
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.ssl.config import SSLConfig, ssl_config_from_dict


def test_every_option_default_is_the_dataclass_default() -> None:
    """So a field missing from both the file and the command line means the same either way."""
    from wsi_pipeline.commands.ssl import _ssl_fields

    command = typer.main.get_command(build_app()).commands["ssl-train"]
    fields = _ssl_fields({p.name: p.default for p in command.params if p.name != "config"})
    ref = to_dict(SSLConfig(data="d", out="o"))
    assert set(fields["augment"]) < set(ref["augment"]) and len(fields) > 30
    assert {k: v for k, v in fields["augment"].items()} == {k: ref["augment"][k] for k in fields["augment"]}
    assert {k: v for k, v in fields.items() if k not in ("data", "out", "augment")} == \
        {k: ref[k] for k in fields if k not in ("data", "out", "augment")}


def test_unknown_keys_and_missing_paths_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown SSLConfig option\(s\): \['stepz'\]"):
        ssl_config_from_dict({"data": "d", "out": "o", "stepz": 3}, tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown AugmentConfig option\(s\): \['zoom'\]"):
        ssl_config_from_dict({"data": "d", "out": "o", "augment": {"zoom": 2}}, tmp_path / "cfg.yaml")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: no out: give --out"):
        ssl_config_from_dict({"data": "d"}, tmp_path / "cfg.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: d\nout: o\nlearning_rate: 0.1\n")
    r = CliRunner().invoke(build_app(), ["ssl-train", "--config", str(bad)])
    assert r.exit_code != 0
    assert isinstance(r.exception, ConfigError) and str(bad) in str(r.exception)
    assert "learning_rate" in str(r.exception)


def test_config_file_options_override_and_resolved_config(kather_dir: Path, tmp_path: Path) -> None:
    tiles = tmp_path / "tiles"
    for cdir in sorted(p for p in kather_dir.iterdir() if p.is_dir())[:4]:
        (tiles / cdir.name).mkdir(parents=True)
        for f in sorted(cdir.iterdir())[:2]:
            shutil.copy(f, tiles / cdir.name / f.name)
    out = tmp_path / "enc"
    cfg_file = tmp_path / "ssl.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "data": str(tiles), "out": str(out), "arch": "resnet10t", "steps": 5, "batch_size": 4, "out_dim": 32,
        "hidden_dim": 32, "bottleneck_dim": 16, "data_mpp": 0.495, "threads": 1, "checkpoint_every": 0,
        "augment": {"global_size": 40, "local_size": 16, "n_local": 1, "hue": 0.05},
    }))
    r = CliRunner().invoke(build_app(), ["ssl-train", "--config", str(cfg_file), "--steps", "2", "--n-local", "2",
                                         "--mpp", "0.5"])
    assert r.exit_code == 0, r.output
    assert "done at step 2/2" in r.output  # --steps wins over the file's 5

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["steps"] == 2 and resolved["data_mpp"] == 0.5 and resolved["augment"]["n_local"] == 2
    assert resolved["arch"] == "resnet10t" and resolved["out_dim"] == 32  # from the file
    assert resolved["augment"]["global_size"] == 40 and resolved["augment"]["hue"] == 0.05
    assert resolved["augment"]["zoom_min"] == 0.8  # neither: the default
    assert resolved["warmup_steps"] == 1  # resolved from --steps (10 %, at least 1)
    back = ssl_config_from_dict(resolved, out / "config.yaml")  # the written file reads back as --config
    assert to_dict(back) == resolved
