"""Per-tile stain standardisation that an encoder can carry (Reinhard et al. 2001, in CIE L*a*b*).

H&E colour varies between labs, scanners and even slides of one lab far more than between tissue classes
of one slide, so an encoder fed raw colour learns the *source* as much as the tissue. Reinhard colour
transfer maps each tile's per-channel L*a*b* mean and standard deviation onto a fixed target (the average
of the encoder's training tiles). It is parameter-free, runs on the same device as the encoder (a few
element-wise operations on the batch), and is part of the encoder's definition: an encoder that was
trained with it records ``stain_norm`` in its ``encoder.json`` and applies it in every forward pass
(extraction, evaluation, training of heads), so features are never computed without it.

The gain ``target_std / tile_std`` is capped (``max_gain``) so that near-uniform tiles (background, fat)
are not blown up into noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_pipeline.errors import ConfigError

REINHARD = "reinhard-lab"
STAIN_NORMS = (REINHARD,)
DEFAULT_MAX_GAIN = 4.0

# sRGB (D65) ↔ XYZ, as in scikit-image
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)
_EPS = 0.008856
_KAPPA = 7.787


def _mix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Apply a 3×3 matrix to the channel axis of (N, 3, H, W)."""
    return torch.einsum("ij,njhw->nihw", m, x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) float → CIE L*a*b* (D65), same shape."""
    rgb = rgb.clamp(0.0, 1.0)
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    xyz = _mix(lin, m) / white
    f = torch.where(xyz > _EPS, xyz.clamp_min(1e-12) ** (1.0 / 3.0), _KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65), (N, 3, H, W) → sRGB in [0, 1] (out-of-gamut values clipped)."""
    fy = (lab[:, 0] + 16.0) / 116.0
    fx = lab[:, 1] / 500.0 + fy
    fz = fy - lab[:, 2] / 200.0
    f = torch.stack([fx, fy, fz], dim=1)
    f3 = f**3
    t = torch.where(f3 > _EPS, f3, (f - 16.0 / 116.0) / _KAPPA)
    white = torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    m_inv = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    lin = _mix(t * white, m_inv).clamp_min(0.0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


def lab_moments(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel L*a*b* mean and standard deviation of (N, 3, H, W) sRGB in [0, 1] → (N, 3) each."""
    lab = rgb_to_lab(rgb.float())
    return lab.mean(dim=(2, 3)), lab.std(dim=(2, 3))


class ReinhardStandardize(nn.Module):
    """Map each image's L*a*b* mean/std onto ``target_mean``/``target_std``.

    Input and output are *normalised* batches (``(rgb − mean) / std`` with the encoder's ``mean``/``std``),
    so the module sits in front of any trunk. Computed in float32 whatever the autocast dtype.
    """

    def __init__(self, target_mean: Sequence[float], target_std: Sequence[float],
                 mean: Sequence[float], std: Sequence[float], max_gain: float = DEFAULT_MAX_GAIN) -> None:
        super().__init__()
        if len(target_mean) != 3 or len(target_std) != 3 or min(target_std) <= 0:
            raise ConfigError(f"stain_norm: target_mean/target_std need 3 values, std > 0; got {target_mean}, "
                              f"{target_std}")
        if max_gain <= 0:
            raise ConfigError(f"stain_norm: max_gain must be > 0, got {max_gain}")
        self.max_gain = float(max_gain)
        for name, v in (("target_mean", target_mean), ("target_std", target_std), ("in_mean", mean), ("in_std", std)):
            self.register_buffer(name, torch.tensor([float(a) for a in v], dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            rgb = x.float() * self.in_std + self.in_mean
            lab = rgb_to_lab(rgb)
            m = lab.mean(dim=(2, 3), keepdim=True)
            s = lab.std(dim=(2, 3), keepdim=True)
            gain = (self.target_std / s.clamp_min(1e-6)).clamp(max=self.max_gain)
            out = lab_to_rgb((lab - m) * gain + self.target_mean)
            out = (out - self.in_mean) / self.in_std
        out = out.to(dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return (f"target_mean={self.target_mean.flatten().tolist()}, target_std={self.target_std.flatten().tolist()}, "
                f"max_gain={self.max_gain}")


def fit_reinhard_target(images: Sequence[np.ndarray], batch_size: int = 256) -> dict[str, Any]:
    """The target of :class:`ReinhardStandardize`: the average per-tile L*a*b* mean and std of uint8 RGB
    tiles (e.g. a sample of the encoder's training tiles). Returns the ``stain_norm`` dict for encoder.json."""
    if len(images) == 0:
        raise ConfigError("stain_norm: no tiles to fit the Reinhard target on")
    means, stds = [], []
    for s in range(0, len(images), batch_size):
        for im in images[s : s + batch_size]:
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
            m, sd = lab_moments(x)
            means.append(m[0])
            stds.append(sd[0])
    return {
        "method": REINHARD,
        "target_mean": [round(float(v), 4) for v in torch.stack(means).mean(0)],
        "target_std": [round(float(v), 4) for v in torch.stack(stds).mean(0)],
        "max_gain": DEFAULT_MAX_GAIN,
        "fitted_on_tiles": len(means),
    }


def build_stain_norm(spec: Mapping[str, Any] | None, mean: Sequence[float],
                     std: Sequence[float]) -> ReinhardStandardize | None:
    """The module an encoder's ``stain_norm`` entry describes (None when it has none)."""
    if not spec:
        return None
    method = spec.get("method")
    if method != REINHARD:
        raise ConfigError(f"stain_norm method {method!r} is not known; expected one of {STAIN_NORMS}")
    try:
        return ReinhardStandardize(spec["target_mean"], spec["target_std"], mean, std,
                                   float(spec.get("max_gain", DEFAULT_MAX_GAIN)))
    except KeyError as e:
        raise ConfigError(f"stain_norm entry lacks {e}; re-export the encoder or refit the target") from e
