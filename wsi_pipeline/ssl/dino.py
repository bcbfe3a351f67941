"""DINO self-distillation pieces (Caron et al. 2021): projection head, loss with centering and
sharpening, KoLeo regulariser (Sablayrolles et al. 2019, as in DINOv2), and the cosine schedules."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP (in → hidden → hidden → bottleneck), L2-normalise, weight-normalised linear to ``out_dim`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 1024, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(n_layers - 1, 0)):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight norm written out (g fixed to 1 when norm_last_layer): no parametrisation needed for resume
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last_v, std=0.02)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        w = self.last_g * F.normalize(self.last_v, dim=1, p=2)
        return F.linear(x, w)


class MultiCropWrapper(nn.Module):
    """Runs ``pre`` (if any) and the backbone once per crop resolution, and the head on all pooled features.

    ``forward(views)`` returns (head logits for all views concatenated, backbone features of the same rows).
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, pre: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pre = pre  # parameter-free input standardisation (e.g. stain), part of the exported encoder

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = []
        start = 0
        sizes = [v.shape[-1] for v in views]
        while start < len(views):  # consecutive views of one size go through the backbone together
            end = start
            while end < len(views) and sizes[end] == sizes[start]:
                end += 1
            x = torch.cat(views[start:end])
            feats.append(self.backbone(self.pre(x) if self.pre is not None else x))
            start = end
        f = torch.cat(feats).float()
        return self.head(f).float(), f


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher outputs on the global views and student outputs on
    all other views; the centre is an EMA of the teacher's batch mean (all-reduced across ranks)."""

    def __init__(self, out_dim: int, n_global: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float,
                n_views: int) -> torch.Tensor:
        s_chunks = (student_out / self.student_temp).chunk(n_views)
        t = F.softmax((teacher_out - self.center) / teacher_temp, dim=-1).detach()
        t_chunks = t.chunk(self.n_global)
        total = torch.zeros((), device=student_out.device)
        n_terms = 0
        for ti, tq in enumerate(t_chunks):
            for si, sq in enumerate(s_chunks):
                if si == ti:
                    continue  # same view
                total = total + torch.sum(-tq * F.log_softmax(sq, dim=-1), dim=-1).mean()
                n_terms += 1
        self.update_center(teacher_out)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_sum = teacher_out.sum(dim=0, keepdim=True)
        n = torch.tensor([teacher_out.shape[0]], dtype=torch.float32, device=teacher_out.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(n)
        self.center.mul_(self.center_momentum).add_(batch_sum / n, alpha=1 - self.center_momentum)


@torch.no_grad()
def teacher_entropy(teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Mean entropy of the centred, sharpened teacher distribution: the DINO loss minus it is the
    KL(teacher ‖ student) part that the student reduces (the loss itself may rise while the centre flattens
    the teacher early in training)."""
    t = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1)
    return -(t * torch.log(t.clamp_min(1e-12))).sum(dim=-1).mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko–Leonenko entropy estimator: −mean log distance to the nearest neighbour (L2-normalised)."""
    x = F.normalize(x.float(), dim=-1, p=2, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    d = (x - x[nn_idx]).norm(dim=-1)
    return -torch.log(d + eps).mean()


def cosine_value(step: int, total: int, start: float, end: float, warmup_steps: int = 0,
                 warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine to ``end``."""
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / max(warmup_steps, 1)
    span = max(total - warmup_steps, 1)
    p = min(max(step - warmup_steps, 0) / span, 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * p))


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Teacher temperature: linear warm-up from ``start`` to ``end``, then constant."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / max(warmup_steps, 1)


def param_groups(module: nn.Module) -> list[dict]:
    """AdamW groups: no weight decay on biases and 1-d parameters (norms)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "wd_scale": 1.0}, {"params": no_decay, "wd_scale": 0.0, "weight_decay": 0.0}]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← m·teacher + (1−m)·student for parameters. Buffers (BN running statistics) stay the
    teacher's own: it runs in train mode, so they track the teacher's weights, as in DINO."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
