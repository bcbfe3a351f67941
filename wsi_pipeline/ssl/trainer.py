"""DINO pretraining loop: student/teacher, multi-crop batches, schedules, checkpoints with exact resume,
DistributedDataParallel (``torchrun``; NCCL on GPUs, gloo on CPU) and export of the teacher backbone as a
project encoder (:func:`wsi_pipeline.encoders.project.save_project_encoder`).

Exact resume: the images and augmentations of step ``s`` on rank ``r`` are a pure function of
(seed, s, r) — index order from a per-epoch seeded permutation, augmentation and drop-path randomness
from generators seeded per step — so a run stopped at step K and resumed from its checkpoint (student,
teacher, optimiser, DINO centre, step, RNG states) reproduces the straight run bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from wsi_pipeline.errors import ConfigError, FormatError, WeightsError
from wsi_pipeline.ssl.augment import AugmentConfig, multi_crop
from wsi_pipeline.ssl.config import CONFIG_YAML, SSLConfig
from wsi_pipeline.ssl.data import TileSource, open_tile_source
from wsi_pipeline.ssl.dino import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cosine_value,
    ema_update,
    koleo_loss,
    param_groups,
    teacher_entropy,
    teacher_temperature,
)

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
LOG_COLUMNS = ("step", "loss", "dino", "kl", "teacher_entropy", "koleo", "lr", "wd", "momentum", "teacher_temp", "seconds", "img_per_s")
VIT_PREFIXES = ("vit_", "deit", "eva", "beit")


# ---------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.info("rank %d/%d joined (%s)", rank, world, dist.get_backend())
    return DistInfo(rank, world, local_rank, dev)


def _barrier(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- batches
def _seed_of(*keys: Any) -> int:
    h = hashlib.sha256("|".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class MultiCropBatches:
    """The multi-crop views of step ``s`` on rank ``r``: a pure function of (seed, s, r)."""

    def __init__(self, source: TileSource, aug: AugmentConfig, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if len(source) < 2:
            raise ConfigError(f"{source.description}: need at least 2 tiles to train, found {len(source)}")
        self.source = source
        self.aug = aug
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(_seed_of(self.seed, "epoch", epoch))
            self._perm = (epoch, rng.permutation(len(self.source)))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        n = len(self.source)
        start = (step * self.world + self.rank) * self.batch_size
        out = []
        for p in range(start, start + self.batch_size):
            out.append(int(self._permutation(p // n)[p % n]))
        return out

    def images(self, step: int) -> list[np.ndarray]:
        return [self.source.read(i) for i in self.indices(step)]

    def augment(self, step: int, images: list[np.ndarray], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(_seed_of(self.seed, "augment", step, self.rank))
        return multi_crop(images, self.source.mpp, self.aug, g, device)

    def views(self, step: int) -> list[torch.Tensor]:
        return self.augment(step, self.images(step))


class _StepDataset(torch.utils.data.IterableDataset):
    """Steps [start, end) for DataLoader workers: worker w makes steps ≡ w (mod n), read in order."""

    def __init__(self, batches: MultiCropBatches, start: int, end: int, raw: bool = False) -> None:
        self.batches, self.start, self.end, self.raw = batches, start, end, raw

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        wi = torch.utils.data.get_worker_info()
        wid, nw = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        for s in range(self.start + wid, self.end, nw):
            yield s, (self.batches.images(s) if self.raw else self.batches.views(s))


def iterate_views(
    batches: MultiCropBatches, start: int, end: int, workers: int, augment_device: torch.device | None = None
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Multi-crop views of steps [start, end). With ``augment_device`` the workers only read the tiles and the
    augmentations run on that device (a GPU augments far faster than the CPU workers can)."""
    raw = augment_device is not None
    if workers <= 0:
        for s in range(start, end):
            yield s, (batches.augment(s, batches.images(s), augment_device) if raw else batches.views(s))
        return
    loader = torch.utils.data.DataLoader(
        _StepDataset(batches, start, end, raw), batch_size=None, num_workers=workers, persistent_workers=False,
        prefetch_factor=4 if raw else 2, collate_fn=(lambda b: b) if raw else None,
    )
    for s, item in loader:
        yield s, (batches.augment(s, item, augment_device) if raw else item)


# ---------------------------------------------------------------- models
def backbone_kwargs(cfg: SSLConfig, student: bool) -> dict[str, Any]:
    kw = dict(cfg.timm_kwargs)
    if cfg.arch.startswith(VIT_PREFIXES):
        kw.setdefault("dynamic_img_size", True)
        if student and cfg.drop_path > 0:
            kw.setdefault("drop_path_rate", cfg.drop_path)
    return kw


def export_kwargs(cfg: SSLConfig) -> dict[str, Any]:
    """timm kwargs recorded in encoder.json (training-only options such as drop_path_rate removed)."""
    kw = backbone_kwargs(cfg, student=False)
    kw.pop("drop_path_rate", None)
    return kw


def fit_stain_target(cfg: SSLConfig, source: TileSource) -> dict[str, Any] | None:
    """The ``stain_norm`` entry of the encoder: its target fitted on a seeded sample of the training tiles
    (the same on every rank and on resume), or None without ``--stain-norm``."""
    if cfg.stain_norm == "none":
        return None
    from wsi_pipeline.encoders.stain import fit_reinhard_target

    rng = np.random.default_rng(_seed_of(cfg.seed, "stain"))
    n = min(len(source), max(cfg.stain_fit_tiles, 1))
    idx = np.sort(rng.choice(len(source), n, replace=False))
    spec = fit_reinhard_target([source.read(int(i)) for i in idx])
    log.info("stain standardisation %s: target L*a*b* mean %s, std %s (%d tiles)", spec["method"],
             spec["target_mean"], spec["target_std"], n)
    return spec


def init_backbone_weights(backbone: nn.Module, init_from: str, arch: str) -> str:
    """Load ``init_from`` (an encoder folder/name under models/ with the same arch, or a weights file or
    ``hf-hub:`` id) into ``backbone``; returns the checksum of the weights."""
    from wsi_pipeline.encoders.project import load_project_encoder, resolve_project_encoder
    from wsi_pipeline.encoders.weights import load_weights
    from wsi_pipeline.formats.hashing import file_sha256

    folder = resolve_project_encoder(init_from)
    if folder is None:
        return load_weights(init_from, backbone).sha256
    trunk, meta = load_project_encoder(folder)
    if meta["arch"] != arch:
        raise WeightsError(f"--init-from {init_from}: an encoder of arch {meta['arch']!r}, not --arch {arch!r}; "
                           f"pass --arch {meta['arch']}")
    backbone.load_state_dict(trunk.state_dict())
    return file_sha256(meta["weights_source"])


def build_models(cfg: SSLConfig, stain: dict[str, Any] | None = None) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    from wsi_pipeline.encoders.project import build_backbone
    from wsi_pipeline.encoders.stain import build_stain_norm

    torch.manual_seed(_seed_of(cfg.seed, "init"))
    s_backbone = build_backbone(cfg.arch, backbone_kwargs(cfg, student=True))
    if cfg.init_from:
        sha = init_backbone_weights(s_backbone, cfg.init_from, cfg.arch)
        log.info("ssl-train: backbone initialised from %s (sha256 %s…)", cfg.init_from, sha[:12])
    embed_dim = int(s_backbone.num_features)
    a = cfg.augment
    student = MultiCropWrapper(s_backbone, DINOHead(embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim),
                               build_stain_norm(stain, a.mean, a.std))
    t_backbone = build_backbone(cfg.arch, backbone_kwargs(cfg, student=False))
    teacher = MultiCropWrapper(t_backbone, DINOHead(embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim),
                               build_stain_norm(stain, a.mean, a.std))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


# ---------------------------------------------------------------- checkpoints
def checkpoint_path(cfg: SSLConfig) -> Path:
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else Path(cfg.out) / "checkpoints"
    return root / CHECKPOINT_NAME


def _config_dict(cfg: SSLConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# options that may change between a checkpoint and its resumption without changing the result
_RESUME_FREE = {"out", "checkpoint_dir", "resume", "stop_at_step", "checkpoint_every", "log_every", "workers",
                "threads", "device", "description", "licence", "name", "data", "slide_dirs"}


def save_checkpoint(path: Path, step: int, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                    loss_fn: DINOLoss, cfg: SSLConfig) -> None:
    from wsi_pipeline.formats.atomic import atomic_path

    state = {
        "step": step,  # next step to run
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "dino_loss": loss_fn.state_dict(),
        "config": _config_dict(cfg),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer,
                    loss_fn: DINOLoss, cfg: SSLConfig) -> int:
    """Restore everything; returns the next step. Refuses a checkpoint of a different recipe."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise FormatError(path, f"cannot read the checkpoint ({e}); delete it to start over") from e
    old = state.get("config", {})
    new = _config_dict(cfg)
    changed = sorted(k for k in new if k not in _RESUME_FREE and old.get(k) != new[k])
    if changed:
        raise ConfigError(
            f"{path}: checkpoint was made with different settings ({', '.join(changed)}); resume with the same "
            "options, or pass another --out / --checkpoint-dir to start a new run"
        )
    student.load_state_dict(state["student"])
    teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    loss_fn.load_state_dict(state["dino_loss"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(state["step"])


def _append_log(path: Path, rows: list[dict[str, Any]], start_step: int) -> None:
    """Rewrite the log keeping rows of steps before ``start_step`` (a resumed run overwrites the rest)."""
    old: list[dict[str, Any]] = []
    if path.exists():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if int(r["step"]) < start_step]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        w.writeheader()
        w.writerows(old + rows)


# ---------------------------------------------------------------- export
def export_teacher(cfg: SSLConfig, teacher: MultiCropWrapper, step: int, source: TileSource, seconds: float,
                   world: int, last_loss: float | None, stain: dict[str, Any] | None = None) -> Path:
    from wsi_pipeline.encoders.project import save_project_encoder

    a = cfg.augment
    meta = {
        "name": cfg.name or Path(cfg.out).name,
        "arch": cfg.arch,
        "timm_kwargs": export_kwargs(cfg),
        "embed_dim": int(teacher.backbone.num_features),
        "input_size": cfg.input_size,
        "mean": list(a.mean),
        "std": list(a.std),
        "mpp": a.mpp,
        "licence": cfg.licence,
        "description": cfg.description or f"DINO teacher backbone ({cfg.arch}) trained with `wsi ssl-train`",
        "training": {
            "method": "DINO (self-distillation, multi-crop)",
            "steps_done": step,
            "steps_planned": cfg.steps,
            "batch_size_per_rank": cfg.batch_size,
            "world_size": world,
            "data": source.description,
            "data_mpp": source.mpp,
            "train_mpp": a.mpp,
            "global_size": a.global_size,
            "local_size": a.local_size,
            "n_local": a.n_local,
            "koleo": cfg.koleo,
            "seconds": round(seconds, 1),
            "final_loss": None if last_loss is None else round(float(last_loss), 5),
            "init_from": cfg.init_from or None,
            "config": _config_dict(cfg),
        },
    }
    if stain:
        meta["stain_norm"] = stain
    out = save_project_encoder(cfg.out, teacher.backbone, meta)
    write_resolved_config(cfg)
    return out


def write_resolved_config(cfg: SSLConfig) -> Path:
    """``OUT/config.yaml``: the resolved config next to the encoder, in the shape ``--config`` reads back."""
    import yaml

    from wsi_pipeline.config import to_dict
    from wsi_pipeline.formats.atomic import write_text_atomic

    path = Path(cfg.out) / CONFIG_YAML
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# ---------------------------------------------------------------- training
@dataclass
class SSLResult:
    out_dir: Path
    steps_done: int
    completed: bool
    losses: list[float]
    kl: list[float]  # DINO loss minus teacher entropy: KL(teacher ‖ student), what the student reduces
    seconds: float
    checkpoint: Path


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def run_ssl_train(cfg: SSLConfig) -> SSLResult:
    """Train a DINO encoder as configured; checkpoints and exports the teacher backbone to ``cfg.out``."""
    cfg = cfg.resolved()
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        if info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: SSLConfig, info: DistInfo) -> SSLResult:
    from torch.nn.parallel import DistributedDataParallel as DDP

    t0 = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    source = open_tile_source(cfg.data, cfg.data_mpp, cfg.subset, cfg.split_seed, cfg.test_fraction,
                              cfg.max_tiles_per_slide or None, cfg.slide_dirs)
    if info.is_main:
        log.info("ssl-train: %s; %s, %d steps × %d × %d ranks", source.description, cfg.arch, cfg.steps,
                 cfg.batch_size, info.world)
    stain = fit_stain_target(cfg, source)
    student, teacher = build_models(cfg, stain)
    if info.world > 1 and info.device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    channels_last = not hasattr(student.backbone, "patch_embed")  # CNNs: oneDNN / cuDNN prefer NHWC
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student.to(info.device, memory_format=memory_format).train()
    teacher.to(info.device, memory_format=memory_format).train()  # BN: batch statistics, own running averages
    loss_fn = DINOLoss(cfg.out_dim, 2, cfg.student_temp, cfg.center_momentum).to(info.device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, weight_decay=cfg.weight_decay)

    ckpt = checkpoint_path(cfg)
    start = 0
    if cfg.resume:
        if ckpt.exists():
            start = load_checkpoint(ckpt, student, teacher, optimizer, loss_fn, cfg)
            if info.is_main:
                log.info("resumed from %s at step %d", ckpt, start)
        elif info.is_main:
            log.warning("--resume: no checkpoint at %s; starting from step 0", ckpt)
    model: nn.Module = student
    if info.world > 1:
        model = DDP(student, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    batches = MultiCropBatches(source, cfg.augment, cfg.batch_size, cfg.seed, info.rank, info.world)
    global_batch = cfg.batch_size * info.world
    base_lr = cfg.lr * global_batch / 256.0
    end = cfg.steps if cfg.stop_at_step <= 0 else min(cfg.steps, cfg.stop_at_step)
    n_views = 2 + cfg.augment.n_local
    last_layer = [p for n, p in student.named_parameters() if n.startswith("head.last_")]
    rows: list[dict[str, Any]] = []
    losses: list[float] = []
    kls: list[float] = []
    log_path = Path(cfg.out) / LOG_NAME
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    t_last = time.time()
    last_loss: float | None = None
    aug_device = info.device if cfg.augment_on_device and info.device.type != "cpu" else None
    for step, views in iterate_views(batches, start, end, cfg.workers, aug_device):
        lr = cosine_value(step, cfg.steps, base_lr, cfg.min_lr, cfg.warmup_steps)
        wd = cosine_value(step, cfg.steps, cfg.weight_decay, cfg.weight_decay_end)
        mom = cosine_value(step, cfg.steps, cfg.momentum_teacher, cfg.momentum_teacher_end)
        ttemp = teacher_temperature(step, cfg.teacher_temp_warmup_steps, cfg.teacher_temp_start, cfg.teacher_temp)
        for gi, g in enumerate(optimizer.param_groups):
            g["lr"] = lr
            g["weight_decay"] = wd * g.get("wd_scale", 1.0 if gi == 0 else 0.0)
        torch.manual_seed(_seed_of(cfg.seed, "model", step, info.rank))  # drop-path etc.
        views = [v.to(info.device, non_blocking=True, memory_format=memory_format) for v in views]
        with _autocast(info.device, cfg.precision):
            with torch.no_grad():
                t_out, _ = teacher(views[:2])
            s_out, s_feat = model(views)
        t_ent = teacher_entropy(t_out, loss_fn.center, ttemp)
        dino = loss_fn(s_out.float(), t_out.float(), ttemp, n_views)
        kol = koleo_loss(s_feat[: cfg.batch_size]) if cfg.koleo > 0 else torch.zeros((), device=dino.device)
        loss = dino + cfg.koleo * kol
        if not torch.isfinite(loss):
            raise ConfigError(f"ssl-train: the loss diverged ({loss.item()}) at step {step}; lower --lr or "
                              "--clip-grad, or use --precision fp32, and restart")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
        if step < cfg.freeze_last_layer_steps:
            for p in last_layer:
                p.grad = None
        optimizer.step()
        ema_update(teacher, student, mom)
        last_loss = float(loss.item())
        losses.append(last_loss)
        kls.append(float(dino.item()) - float(t_ent.item()))
        done = step + 1
        if info.is_main:
            now = time.time()
            rows.append({
                "step": step, "loss": round(last_loss, 5), "dino": round(float(dino.item()), 5),
                "kl": round(kls[-1], 5), "teacher_entropy": round(float(t_ent.item()), 5),
                "koleo": round(float(kol.item()), 5), "lr": f"{lr:.3g}", "wd": f"{wd:.3g}", "momentum": f"{mom:.5f}",
                "teacher_temp": f"{ttemp:.4f}", "seconds": round(now - t0, 1),
                "img_per_s": round(global_batch / max(now - t_last, 1e-6), 1),
            })
            t_last = now
            if done % max(cfg.log_every, 1) == 0 or done == end:
                log.info("step %d/%d loss %.4f (dino %.4f = teacher entropy %.4f + KL %.4f; koleo %.4f) lr %.2e "
                         "temp %.3f mom %.4f", done, cfg.steps, last_loss, dino.item(), t_ent.item(), kls[-1],
                         kol.item(), lr, ttemp, mom)
        if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == end:
            if info.is_main:
                save_checkpoint(ckpt, done, student, teacher, optimizer, loss_fn, cfg)
                export_teacher(cfg, teacher, done, source, time.time() - t0, info.world, last_loss, stain)
                _append_log(log_path, rows, start)
            _barrier(info)
    if start >= end and info.is_main:
        log.info("nothing to do: checkpoint %s is already at step %d", ckpt, start)
    steps_done = end if end > start else start
    source.close()
    return SSLResult(Path(cfg.out), steps_done, steps_done >= cfg.steps, losses, kls, time.time() - t0, ckpt)
