"""Multi-task MIL heads, one registry (timm-style): ``register_head``, ``create_head``, ``list_heads``.

Every head maps one bag (N tile embeddings, optionally their level-0 coordinates and a covariate vector)
to a :class:`MILOutput`: one logit vector per target plus per-tile scores per target (for heatmaps) and,
where the head has one, per-tile attention. All heads share the same skeleton: a shared instance
encoder (Linear → ReLU → Dropout), a head-specific aggregation, and one classifier per target. Clinical
covariates are fused late: each target's classifier adds a linear term in the (standardised) covariates.

Heads (registered names):

- ``abmil``: gated attention MIL (Ilse et al. 2018) with one attention branch per target over
  a shared encoder. The classifier is linear, so the slide logit is exactly the attention-weighted mean
  of the per-tile logits (classifier applied to each tile embedding): the tile scores explain the slide.
- ``transmil``: TransMIL (Shao et al. 2021): two Nyström-attention transformer layers (landmarks, no N×N
  matrix) and a PPEG positional convolution that, when coordinates are given, runs on the true tile grid
  of the slide. Per-tile scores: classifier applied to the output tokens; attention: exact attention of
  the class token over the tiles in the last layer.
- ``chowder``: CHOWDER (Courtiol et al. 2018): per-tile scores per output, the top-k and bottom-k scores
  go through a small MLP.
- ``meanpool``: mean of encoded tiles → linear classifier (per-tile logits average to the slide logit).

Memory: a forward pass of a 100k × 384 bag stays well within 2 GB for every head (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from wsi_pipeline.errors import UnknownNameError
from wsi_pipeline.mil.grid import grid_positions

_HEADS: dict[str, type[MILHead]] = {}  # the registry of MIL heads


@dataclass
class MILOutput:
    """What a head returns for one bag.

    ``logits[t]``: (n_out,) slide-level logits (binary/regression/survival: 1; multiclass: C).
    ``instance_scores[t]``: (N, n_out) per-tile scores on the logit scale.
    ``attention[t]``: (N,) attention weights summing to 1; empty dict for heads without attention.
    ``embedding``: the shared slide embedding (heads with per-target pooling: mean over targets).
    """

    logits: dict[str, Tensor]
    instance_scores: dict[str, Tensor]
    attention: dict[str, Tensor] = field(default_factory=dict)
    embedding: Tensor | None = None


def register_head(name: str) -> Callable[[type[MILHead]], type[MILHead]]:
    def deco(cls: type[MILHead]) -> type[MILHead]:
        if name in _HEADS and _HEADS[name] is not cls:
            raise ValueError(f"MIL head {name!r} is already registered")
        _HEADS[name] = cls
        cls.registry_name = name
        return cls

    return deco


def list_heads() -> list[str]:
    return sorted(_HEADS)


def head_class(name: str) -> type[MILHead]:
    if name not in _HEADS:
        raise UnknownNameError(f"unknown MIL head {name!r}; available: {', '.join(list_heads())}")
    return _HEADS[name]


def create_head(name: str, in_dim: int, tasks: Mapping[str, int] | Sequence[Any], **kwargs: Any) -> MILHead:
    """Build head ``name`` for ``in_dim``-dimensional tiles and ``tasks`` (name → number of outputs, or
    a sequence of :class:`~wsi_pipeline.mil.targets.TargetSpec`)."""
    return head_class(name)(in_dim, _task_dims(tasks), **kwargs)


def _task_dims(tasks: Mapping[str, int] | Sequence[Any]) -> dict[str, int]:
    if isinstance(tasks, Mapping):
        return {str(k): int(v) for k, v in tasks.items()}
    return {t.name: int(t.n_outputs) for t in tasks}


class TaskClassifier(nn.Module):
    """Linear classifier of one target with a late-fused linear covariate term."""

    def __init__(self, in_dim: int, n_out: int, cov_dim: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, n_out)
        self.cov = nn.Linear(cov_dim, n_out, bias=False) if cov_dim else None

    def forward(self, z: Tensor, covariates: Tensor | None = None) -> Tensor:
        out = self.lin(z)
        if self.cov is not None:
            if covariates is None:
                raise ValueError("this model was trained with covariates; pass them")
            out = out + self.cov(covariates)
        return out


class ContextInteractionEncoder(nn.Module):
    """Instance encoder for tiles with spatial-context columns ``[x, c]`` (see mil.data): encodes the tile
    (``ReLU(A x)``) and its neighbourhood (``ReLU(B c)``) separately and mixes them together with their
    elementwise product, so "a lymphocyte tile among tumour tiles" is one feature, not a sum of two."""

    def __init__(self, in_dim: int, context_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        if not 0 < context_dim < in_dim:
            raise ValueError(f"context_dim must be in (0, {in_dim}), got {context_dim}")
        self.tile_dim = in_dim - context_dim
        self.tile = nn.Linear(self.tile_dim, hidden)
        self.context = nn.Linear(context_dim, hidden)
        self.mix = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        ht = torch.relu(self.tile(x[:, : self.tile_dim]))
        hc = torch.relu(self.context(x[:, self.tile_dim :]))
        return self.mix(torch.cat([ht, hc, ht * hc], dim=1))


class MILHead(nn.Module):
    """Base of all heads: shared instance encoder and one classifier per target.

    ``encoder``: ``"mlp"`` (Linear → ReLU → Dropout over all input columns) or ``"interact"``
    (:class:`ContextInteractionEncoder`; needs ``context_dim``, the number of trailing context columns).
    ``norm_dim``: width of one embedding block (the encoder's embed_dim; default in_dim). The input is
    standardised per dimension with buffers ``feat_mean``/``feat_std`` (set by the trainer from the training
    tiles, saved with the weights), so heads do not depend on the scale of an encoder's features.
    """

    registry_name = ""
    default_lr = 1e-3  # AdamW learning rate used when TrainConfig.lr is not set
    # state keys that weights saved before they existed may lack; loading keeps their defaults (identity)
    optional_state_keys: tuple[str, ...] = ("feat_mean", "feat_std")

    def __init__(
        self, in_dim: int, tasks: Mapping[str, int], hidden: int = 256, dropout: float = 0.25, cov_dim: int = 0,
        encoder: str = "mlp", context_dim: int = 0, norm_dim: int = 0,
    ) -> None:
        super().__init__()
        self.in_dim, self.tasks, self.hidden, self.cov_dim = in_dim, dict(tasks), hidden, cov_dim
        if encoder == "mlp":
            self.encoder: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        elif encoder == "interact":
            self.encoder = ContextInteractionEncoder(in_dim, context_dim, hidden, dropout)
        else:
            raise ValueError(f"unknown instance encoder {encoder!r}; use 'mlp' or 'interact'")
        self.classifiers = nn.ModuleDict({t: TaskClassifier(hidden, n, cov_dim) for t, n in self.tasks.items()})
        # per-dimension standardisation of the embeddings (statistics of the training tiles; identity until set)
        self.norm_dim = int(norm_dim) or in_dim
        if in_dim % self.norm_dim:
            raise ValueError(f"in_dim {in_dim} is not a multiple of norm_dim {self.norm_dim}")
        self.register_buffer("feat_mean", torch.zeros(self.norm_dim))
        self.register_buffer("feat_std", torch.ones(self.norm_dim))

    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Standardise every embedding block (tile and context rings) with these statistics."""
        self.feat_mean.copy_(torch.as_tensor(mean, dtype=self.feat_mean.dtype))
        self.feat_std.copy_(torch.as_tensor(std, dtype=self.feat_std.dtype).clamp_min(1e-6))

    def normalize(self, x: Tensor) -> Tensor:
        """(x − mean) / std per embedding block; all-zero context blocks (no neighbours) stay zero."""
        n, d = x.shape
        blocks = x.reshape(n, d // self.norm_dim, self.norm_dim)
        z = (blocks - self.feat_mean) / self.feat_std
        if blocks.shape[1] > 1:
            empty = (blocks[:, 1:] == 0).all(dim=2, keepdim=True)
            z = torch.cat([z[:, :1], z[:, 1:].masked_fill(empty, 0.0)], dim=1)
        return z.reshape(n, d)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(self.normalize(x))

    def forward(self, x: Tensor, coords: Tensor | None = None, covariates: Tensor | None = None) -> MILOutput:
        raise NotImplementedError


@register_head("abmil")
class ABMIL(MILHead):
    def __init__(self, in_dim: int, tasks: Mapping[str, int], hidden: int = 256, dropout: float = 0.25,
                 cov_dim: int = 0, att_dim: int = 128, **base_kw: Any) -> None:
        super().__init__(in_dim, tasks, hidden, dropout, cov_dim, **base_kw)
        self.att_v = nn.Linear(hidden, att_dim)
        self.att_u = nn.Linear(hidden, att_dim)
        self.att_w = nn.Linear(att_dim, len(self.tasks))  # one attention branch per target

    def forward(self, x: Tensor, coords: Tensor | None = None, covariates: Tensor | None = None) -> MILOutput:
        h = self.encode(x)  # N×H
        a = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h)))  # N×T
        a = torch.softmax(a, dim=0)
        logits, inst, att, embs = {}, {}, {}, []
        for k, (t, clf) in enumerate(self.classifiers.items()):
            z = a[:, k] @ h  # H
            embs.append(z)
            logits[t] = clf(z, covariates)
            inst[t] = clf(h, None if covariates is None else covariates.expand(h.shape[0], -1))
            att[t] = a[:, k]
        return MILOutput(logits, inst, att, torch.stack(embs).mean(0))


@register_head("meanpool")
class MeanPool(MILHead):
    def forward(self, x: Tensor, coords: Tensor | None = None, covariates: Tensor | None = None) -> MILOutput:
        h = self.encode(x)
        z = h.mean(0)
        logits, inst = {}, {}
        for t, clf in self.classifiers.items():
            logits[t] = clf(z, covariates)
            inst[t] = clf(h, None if covariates is None else covariates.expand(h.shape[0], -1))
        return MILOutput(logits, inst, {}, z)


@register_head("chowder")
class Chowder(MILHead):
    """Per-tile scores per output; top-k and bottom-k of each through an MLP (shared across the outputs of
    one target). Bags with fewer than k tiles repeat their sorted scores to fill the k slots."""

    def __init__(self, in_dim: int, tasks: Mapping[str, int], hidden: int = 256, dropout: float = 0.25,
                 cov_dim: int = 0, k: int = 5, mlp_dim: int = 32, **base_kw: Any) -> None:
        super().__init__(in_dim, tasks, hidden, dropout, cov_dim, **base_kw)
        self.k = k
        self.scorers = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in self.tasks.items()})
        self.mlps = nn.ModuleDict({
            t: nn.Sequential(nn.Linear(2 * k, mlp_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_dim, 1))
            for t in self.tasks
        })
        self.cov_terms = nn.ModuleDict({t: nn.Linear(cov_dim, n, bias=False) for t, n in self.tasks.items()}) \
            if cov_dim else None
        del self.classifiers  # Chowder scores tiles directly

    def _extremes(self, s: Tensor) -> Tensor:
        n = s.shape[0]
        kk = min(self.k, n)
        top = torch.topk(s, kk, dim=0).values  # kk×C, descending
        bottom = torch.topk(s, kk, dim=0, largest=False).values  # ascending
        if kk < self.k:
            idx = torch.div(torch.arange(self.k, device=s.device) * kk, self.k, rounding_mode="floor")
            top, bottom = top[idx], bottom[idx]
        return torch.cat([top, bottom], dim=0).T  # C×2k

    def forward(self, x: Tensor, coords: Tensor | None = None, covariates: Tensor | None = None) -> MILOutput:
        h = self.encode(x)
        logits, inst = {}, {}
        for t, scorer in self.scorers.items():
            s = scorer(h)  # N×C
            out = self.mlps[t](self._extremes(s)).squeeze(-1)  # C
            if self.cov_terms is not None:
                if covariates is None:
                    raise ValueError("this model was trained with covariates; pass them")
                cov = self.cov_terms[t](covariates)
                out, s = out + cov, s + cov
            logits[t] = out
            inst[t] = s
        return MILOutput(logits, inst, {}, h.mean(0))


# ---------------------------------------------------------------- TransMIL
def _pinv_iter(x: Tensor, iters: int = 6) -> Tensor:
    """Moore–Penrose pseudo-inverse by Newton iterations (Nyströmformer)."""
    abs_x = torch.abs(x)
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (torch.max(col) * torch.max(row))
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention (Xiong et al. 2021) over one sequence (N×dim), O(N·m) memory.

    Queries are processed in chunks so the N×m landmark-attention matrix never exists in full.
    """

    def __init__(self, dim: int, heads: int = 4, landmarks: int = 128, pinv_iters: int = 6,
                 dropout: float = 0.1, chunk: int = 16384, residual_kernel: int = 33) -> None:
        super().__init__()
        self.heads, self.dh, self.m, self.pinv_iters, self.chunk = heads, dim // heads, landmarks, pinv_iters, chunk
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)  # weights only; applied in chunks

    def forward(self, x: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.dh).permute(1, 2, 0, 3)  # each heads×n×dh
        q = q * self.dh**-0.5
        m = min(self.m, n)
        # landmarks: means of m contiguous segments of the sequence (front-padded to a multiple of m)
        seg = -(-n // m)
        seg_id = (torch.arange(n, device=x.device) + (m * seg - n)) // seg
        q_l = q.new_zeros(self.heads, m, self.dh).index_add_(1, seg_id, q) / seg
        k_l = k.new_zeros(self.heads, m, self.dh).index_add_(1, seg_id, k) / seg
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # h×m×m
        mid = _pinv_iter(kernel_2, self.pinv_iters) @ self._landmark_context(q_l, k, v)  # h×m×dh
        pieces = []
        for s in range(0, n, self.chunk):
            e = min(n, s + self.chunk)
            k1 = torch.softmax(q[:, s:e] @ k_l.transpose(-1, -2), dim=-1)  # h×c×m
            pieces.append((k1 @ mid + self._res_conv(v, s, e)).permute(1, 0, 2).reshape(e - s, dim))
        y = self.out(torch.cat(pieces, 0) if len(pieces) > 1 else pieces[0])
        att = None
        if cls_attention:  # exact attention of token 0 (the class token) over all tokens, mean over heads
            att = torch.softmax(q[:, :1] @ k.transpose(-1, -2), dim=-1).mean(0).squeeze(0)
        return y, att

    def _res_conv(self, v: Tensor, s: int, e: int) -> Tensor:
        """Depthwise residual convolution of the values along the sequence, for positions [s, e) only."""
        n, pad = v.shape[1], self.res_conv.kernel_size[0] // 2
        lo, hi = max(0, s - pad), min(n, e + pad)
        piece = F.pad(v[:, lo:hi].unsqueeze(0), (0, 0, pad - (s - lo), pad - (hi - e)))
        return F.conv2d(piece, self.res_conv.weight, groups=self.heads).squeeze(0)

    def _landmark_context(self, q_l: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q_l·kᵀ, over all n keys) @ v, streamed over chunks of keys (log-sum-exp in two passes)."""
        n = k.shape[1]
        if n <= self.chunk:
            return torch.softmax(q_l @ k.transpose(-1, -2), dim=-1) @ v
        lse = torch.cat([torch.logsumexp(q_l @ k[:, s : s + self.chunk].transpose(-1, -2), dim=-1, keepdim=True)
                         for s in range(0, n, self.chunk)], dim=-1)
        lse = torch.logsumexp(lse, dim=-1, keepdim=True)  # h×m×1
        acc = q_l.new_zeros(q_l.shape)
        for s in range(0, n, self.chunk):
            acc = acc + torch.exp(q_l @ k[:, s : s + self.chunk].transpose(-1, -2) - lse) @ v[:, s : s + self.chunk]
        return acc


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, landmarks=landmarks, dropout=dropout)

    def forward(self, x: Tensor, cls_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        y, att = self.attn(self.norm(x), cls_attention)
        return x + y, att


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions over the tiles laid out on a grid
    (the slide's tile grid when coordinates are given, else the sequence folded into a square).

    The grid is processed in bands of rows (with a 3-row halo), so memory stays bounded for huge slides.
    """

    halo = 3

    def __init__(self, dim: int, band_elems: int = 1 << 24) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3)])
        self.band_elems = band_elems

    def forward(self, tokens: Tensor, grid: tuple[Tensor, int, int] | None) -> Tensor:
        n, dim = tokens.shape
        if grid is None:
            side = max(1, math.ceil(math.sqrt(n)))
            pos = torch.arange(n, device=tokens.device)
            rc, h, w = torch.stack([pos // side, pos % side], 1), side, side
        else:
            rc, h, w = grid
        order = torch.argsort(rc[:, 0], stable=True)
        rows = rc[order, 0].contiguous()
        band = max(8, self.band_elems // max(1, dim * w))
        outs = []
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            lo, ilo, ihi, hi = (int(torch.searchsorted(rows, v)) for v in
                                (r0 - self.halo, r0, r1, r1 + self.halo))
            if ihi == ilo:
                continue
            idx = order[lo:hi]
            base = max(0, r0 - self.halo)
            bh = min(h, r1 + self.halo) - base
            flat = (rc[idx, 0] - base) * w + rc[idx, 1]
            img = tokens.new_zeros(dim, bh * w).index_copy(1, flat, tokens[idx].T).view(1, dim, bh, w)
            mixed = img
            for conv in self.convs:
                mixed = mixed + conv(img)
            outs.append(mixed.view(dim, bh * w)[:, flat[ilo - lo : ihi - lo]].T)
        out_sorted = torch.cat(outs, 0)
        return out_sorted[torch.argsort(order)]


@register_head("transmil")
class TransMIL(MILHead):
    default_lr = 2e-4  # transformers need a smaller step than the pooling heads (tested on kather mosaics)

    def __init__(self, in_dim: int, tasks: Mapping[str, int], hidden: int = 256, dropout: float = 0.25,
                 cov_dim: int = 0, heads: int = 4, landmarks: int = 128, **base_kw: Any) -> None:
        super().__init__(in_dim, tasks, hidden, dropout, cov_dim, **base_kw)
        self.cls_token = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.layer1 = TransLayer(hidden, heads, landmarks, 0.1)
        self.ppeg = PPEG(hidden)
        self.layer2 = TransLayer(hidden, heads, landmarks, 0.1)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, coords: Tensor | None = None, covariates: Tensor | None = None) -> MILOutput:
        h = self.encode(x)
        grid = None
        if coords is not None:
            rc, gh, gw = grid_positions(coords.detach().cpu().numpy())
            grid = (torch.as_tensor(rc, device=h.device), gh, gw)
        t, _ = self.layer1(torch.cat([self.cls_token, h], 0))
        t = torch.cat([t[:1], self.ppeg(t[1:], grid)], 0)
        t, att = self.layer2(t, cls_attention=True)
        t = self.norm(t)
        cls, tok = t[0], t[1:]
        tile_att = att[1:] / att[1:].sum().clamp_min(1e-12)  # type: ignore[index]
        logits, inst, atts = {}, {}, {}
        for name, clf in self.classifiers.items():
            logits[name] = clf(cls, covariates)
            inst[name] = clf(tok, None if covariates is None else covariates.expand(tok.shape[0], -1))
            atts[name] = tile_att
        return MILOutput(logits, inst, atts, cls)
