"""The resolved configuration of every command, written next to its outputs: RUN/configs/<command>.yaml and
RUN/config.yaml (the last command)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_pipeline._version import __version__
from wsi_pipeline.config import plain
from wsi_pipeline.formats.atomic import write_text_atomic
from wsi_pipeline.runfolder.layout import RunLayout


def save_resolved(run_root: str | Path, command: str, sections: Mapping[str, Any]) -> Path:
    """Write the resolved config of ``command`` to RUN/configs/<command>.yaml and RUN/config.yaml."""
    import yaml

    layout = RunLayout(run_root)
    doc = {"command": command, "wsi_pipeline_version": __version__}
    doc.update({k: plain(v) for k, v in sections.items()})
    text = yaml.safe_dump(doc, sort_keys=False)
    write_text_atomic(layout.command_config_yaml(command), text)
    write_text_atomic(layout.config_yaml, text)
    return layout.config_yaml
