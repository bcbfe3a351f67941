"""Data-parallel MIL training across ``torchrun`` ranks (``wsi train --distribute bags``).

Two ways to use several processes (GPUs or CPU hosts) for ``wsi train``:

* ``folds`` (default): the (variant, fold) trainings are dealt across ranks; each training reads every bag
  of its fold. Results equal a single-process run. Best while there are more trainings than ranks and each
  rank can read the whole cohort.
* ``bags``: every rank takes part in every training, on its share of each step's bags: step ``s`` takes the
  same ``--batch-bags`` slides as a single process would, rank ``r`` reads and forwards ``batch[r::world]``,
  and the gradients are averaged across ranks weighted by each rank's bag count before the optimiser step
  (what ``DistributedDataParallel`` does, done explicitly because a MIL step runs one forward per bag and
  its multi-task heads leave parameters unused on steps without a target's labels). Validation and
  out-of-fold predictions are sharded the same way and gathered. Each rank reads ``1/world`` of the bags,
  so the features read per rank and per epoch, and the bag cache each rank needs, shrink with the number of
  ranks. A survival target's Cox risk set is the rank's share of the step (a smaller risk set than a single
  process); the other losses are per-bag means, so the averaged gradient equals the single-process one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from wsi_pipeline.errors import ConfigError

T = TypeVar("T")

DISTRIBUTE_FOLDS = "folds"
DISTRIBUTE_BAGS = "bags"
DISTRIBUTE_MODES = (DISTRIBUTE_FOLDS, DISTRIBUTE_BAGS)


def check_mode(mode: str) -> str:
    if mode not in DISTRIBUTE_MODES:
        raise ConfigError(f"--distribute must be one of {', '.join(DISTRIBUTE_MODES)} (got {mode!r})")
    return mode


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``torchrun`` ranks and how ``wsi train`` uses them."""

    rank: int = 0
    world: int = 1
    mode: str = DISTRIBUTE_FOLDS

    @property
    def shards_bags(self) -> bool:
        """True when every rank takes part in every training on its share of the bags."""
        return self.world > 1 and self.mode == DISTRIBUTE_BAGS

    def runs_task(self, index: int) -> bool:
        """Whether this rank runs training ``index`` (all of them when bags are sharded)."""
        return self.shards_bags or index % self.world == self.rank

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every ``world``-th from ``rank``; all of them on one rank)."""
        return list(items[self.rank::self.world]) if self.shards_bags else list(items)

    def gather_dict(self, local: dict[str, Any]) -> dict[str, Any]:
        """The union of every rank's ``local`` mapping (itself when bags are not sharded)."""
        if not self.shards_bags:
            return local
        import torch.distributed as dist

        parts: list[dict[str, Any] | None] = [None] * self.world
        dist.all_gather_object(parts, local)
        out: dict[str, Any] = {}
        for p in parts:
            out.update(p or {})
        return out

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums of ``values`` over the ranks."""
        if not self.shards_bags:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t)
        return [float(v) for v in t]

    def average_gradients(self, params: Sequence[Any], weight: float) -> float:
        """Replace each parameter's gradient by the ``weight``-weighted mean over the ranks (a rank without a
        loss on this step contributes weight 0); returns the total weight (0: no rank had a loss)."""
        if not self.shards_bags:
            return weight
        import torch
        import torch.distributed as dist

        flat = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        buf = torch.cat([g.detach().reshape(-1).to(torch.float64) for g in flat] +
                        [torch.tensor([1.0], dtype=torch.float64)]) * float(weight)
        dist.all_reduce(buf)
        total = float(buf[-1])
        if total <= 0:
            return 0.0
        buf = buf[:-1] / total
        i = 0
        for p, g in zip(params, flat, strict=True):
            n = g.numel()
            p.grad = buf[i:i + n].reshape(g.shape).to(p.dtype).to(p.device)
            i += n
        return total
