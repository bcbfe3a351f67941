"""Loading encoder weights: local state-dict files (.safetensors / .pth / .pt / .bin), checkpoints that nest
the state dict (``model`` / ``state_dict`` / ``teacher`` ...) or prefix its keys (``module.``,
``backbone.``), and Hugging Face Hub repositories (tried only when no local file is given)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import WeightsError

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
LOCAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
NEST_KEYS = ("teacher", "model_ema", "state_dict", "model", "module", "model_state_dict", "network")

StateDict = dict[str, Any]  # name -> torch.Tensor
Converter = Callable[[StateDict], StateDict]


@dataclass
class LoadedWeights:
    state: StateDict
    path: str  # local file the weights came from
    sha256: str


def is_hub_id(weights: str) -> bool:
    return weights.startswith(HUB_PREFIX)


def weights_fix_hint(hub_id: str | None = None) -> str:
    where = f" (e.g. from https://huggingface.co/{hub_id})" if hub_id else ""
    return f"download the weights file{where} elsewhere and pass it with --weights /path/to/pytorch_model.bin"


def read_state_dict_file(path: str | Path) -> StateDict:
    """Read a state dict (or a checkpoint containing one) from a local file."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: weights file not found — check the --weights path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{p}: cannot read weights ({type(e).__name__}: {e}); expected a .safetensors file or a torch "
            "state dict saved with torch.save(model.state_dict(), ...)"
        ) from e
    return unwrap_state_dict(obj, p)


def unwrap_state_dict(obj: Any, path: str | Path = "<weights>") -> StateDict:
    """Descend into nested checkpoints (``{'model': {...}}``, ``{'teacher': ...}``) to the tensor mapping."""
    import torch

    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for k in NEST_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
    raise WeightsError(
        f"{path}: no state dict found (top-level keys: {list(obj)[:10] if isinstance(obj, Mapping) else type(obj)})"
        " — save the weights with torch.save(model.state_dict(), path) or safetensors"
    )


def strip_prefixes(state: StateDict, reference_keys: Sequence[str]) -> StateDict:
    """The sub-tree of ``state`` under the wrapper prefix (``module.``, ``backbone.``, ``teacher.backbone.`` ...)
    whose keys best match ``reference_keys``; keys outside it (heads, optimizer state) are dropped."""
    ref = set(reference_keys)
    cands = {""}
    for k in state:
        parts = k.split(".")
        for i in range(1, min(4, len(parts))):
            cands.add(".".join(parts[:i]) + ".")

    def score(pref: str) -> int:
        n = len(pref)
        return sum(1 for k in state if k.startswith(pref) and k[n:] in ref)

    best = max(sorted(cands, key=len), key=score)  # ties: the shortest prefix
    if not best or score(best) <= score(""):
        return state
    return {k[len(best):]: v for k, v in state.items() if k.startswith(best)}


def hub_download(hub_id: str, filenames: Sequence[str] = HUB_FILES) -> Path:
    """Download (or find in the local cache) the first available weights file of a Hub repository."""
    repo = hub_id[len(HUB_PREFIX):] if is_hub_id(hub_id) else hub_id
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:  # pragma: no cover - a dependency
        raise WeightsError(f"huggingface_hub is needed to fetch {hub_id}; pip install huggingface_hub") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    errors = []
    for fname in filenames:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=fname))
        except EntryNotFoundError as e:
            errors.append(f"{fname}: not in repo ({e.__class__.__name__})")
        except Exception as e:  # noqa: BLE001 - offline / gated / network errors all end the same way
            errors.append(f"{fname}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if offline or "Offline" in type(e).__name__ or "LocalEntryNotFound" in type(e).__name__:
                break
    mode = "offline mode (HF_HUB_OFFLINE=1)" if offline else "the Hub is unreachable, gated or lacks the file"
    raise WeightsError(
        f"cannot get weights for hf-hub:{repo}: {mode} [{'; '.join(errors)}] — {weights_fix_hint(repo)}"
    )


def resolve_weights_file(weights: str | Path, hub_files: Sequence[str] = HUB_FILES) -> Path:
    """A local weights file for ``weights``: the file itself, the weights file inside a folder, or the file
    downloaded from (or cached for) an ``hf-hub:`` id."""
    w = str(weights)
    if is_hub_id(w) and not Path(w).exists():
        return hub_download(w, hub_files)
    path = Path(w).expanduser()
    if path.is_dir():
        found = [path / f for f in (*HUB_FILES, "pytorch_model.pth") if (path / f).is_file()]
        if not found:
            raise WeightsError(f"{path}: folder holds none of {HUB_FILES}; pass the weights file itself")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found — check the --weights path")
    if path.suffix not in LOCAL_SUFFIXES:
        log.warning("%s: unusual weights suffix; trying to read it as a torch state dict", path)
    return path


def load_weights(
    weights: str | Path,
    model: Any,
    convert: Converter | None = None,
    ignore_prefixes: Sequence[str] = (),
    hub_files: Sequence[str] = HUB_FILES,
) -> LoadedWeights:
    """Load ``weights`` (local file or ``hf-hub:`` id) into ``model`` (strict on missing keys).

    ``convert`` maps a foreign key layout onto the model's (e.g. Hugging Face ViT → timm);
    unexpected keys starting with ``ignore_prefixes`` are dropped silently, others with a warning.
    A ``model`` built on the ``meta`` device gets the loaded tensors assigned (no initialisation cost).
    """
    from wsi_pipeline.formats.hashing import file_sha256

    path = resolve_weights_file(weights, hub_files)
    state = read_state_dict_file(path)
    load_state_into(model, state, path, convert, ignore_prefixes)
    return LoadedWeights(state={}, path=str(path), sha256=file_sha256(path))


def load_state_into(
    model: Any,
    state: StateDict,
    path: str | Path = "<weights>",
    convert: Converter | None = None,
    ignore_prefixes: Sequence[str] = (),
) -> None:
    """Match ``state`` onto ``model`` (prefix stripping, conversion, dtype cast) and load it."""
    ref = model.state_dict()
    if convert is not None:  # foreign layouts first (they know their own prefixes), then wrapper prefixes
        state = convert(state)
    state = strip_prefixes(state, list(ref))
    unexpected = [k for k in state if k not in ref]
    missing = [k for k in ref if k not in state]
    dropped = [k for k in unexpected if any(k.startswith(p) for p in ignore_prefixes)]
    unexpected = [k for k in unexpected if k not in dropped]
    if missing:
        raise WeightsError(
            f"{path}: {len(missing)} weights missing for this architecture (e.g. {missing[:5]}); "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:5]}) — is this the right --encoder for this file?"
        )
    if unexpected:
        log.warning("%s: ignoring %d unexpected keys (e.g. %s)", path, len(unexpected), unexpected[:5])
    if "pos_embed" in ref and state["pos_embed"].shape != ref["pos_embed"].shape:
        state["pos_embed"] = _resample_pos_embed(model, state["pos_embed"], ref["pos_embed"], path)
    bad_shape = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in ref.items() if state[k].shape != v.shape]
    if bad_shape:
        raise WeightsError(
            f"{path}: shape mismatch for {len(bad_shape)} weights (e.g. {bad_shape[:3]}: file vs model) — "
            "is this the right --encoder for this file?"
        )
    clean = {k: state[k].to(ref[k].dtype) if state[k].is_floating_point() else state[k] for k in ref}
    on_meta = any(t.is_meta for t in ref.values())
    model.load_state_dict(clean, strict=True, assign=on_meta)
    if on_meta and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise WeightsError(f"{path}: the model keeps tensors outside its state dict; build it on CPU to load")


def _resample_pos_embed(model: Any, pos: Any, ref: Any, path: str | Path) -> Any:
    """Interpolate a ViT position embedding to the model's patch grid, keeping the prefix tokens.

    Bicubic without antialiasing, as ``transformers`` Dinov2 and the DINOv2 reference do at run time.
    """
    import math

    import torch

    n_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_src, n_dst = pos.shape[1] - n_prefix, ref.shape[1] - n_prefix
    side_src, side_dst = math.isqrt(n_src), math.isqrt(n_dst)
    if side_src * side_src != n_src or side_dst * side_dst != n_dst or pos.shape[-1] != ref.shape[-1]:
        return pos  # not a square grid: let the shape check report it
    log.warning("%s: resampling the position embedding %dx%d -> %dx%d", path, side_src, side_src, side_dst, side_dst)
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, side_src, side_src, dim).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(side_dst, side_dst), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, side_dst * side_dst, dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)
