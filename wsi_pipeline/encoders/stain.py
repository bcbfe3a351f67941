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

from collections.abc import Callable, Mapping, Sequence
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
# L*a*b* = _F_TO_LAB · f + (−16, 0, 0) with f = (f_x, f_y, f_z), the companded XYZ / white
_F_TO_LAB = ((0.0, 116.0, 0.0), (500.0, -500.0, 0.0), (0.0, 200.0, -200.0))
_EPS = 0.008856
_KAPPA = 7.787


def _pow(x: torch.Tensor, p: float) -> torch.Tensor:
    """x ** p for x > 0 as exp(p · log x): about twice as fast as ``pow`` on CPU."""
    return torch.log(x).mul_(p).exp_()


def _piecewise(x: torch.Tensor, knee: float, above: Callable[[torch.Tensor], torch.Tensor],
               below: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``above(x)`` where x > knee, else ``below(x)``. The linear toe segments of sRGB and L*a*b* only concern
    near-black pixels, rare in H&E: one min() over the batch skips the two-branch ``where`` when none are there."""
    if x.numel() and float(x.amin()) > knee:
        return above(x)
    return torch.where(x > knee, above(x.clamp_min(knee)), below(x))


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
        """Equal (to float rounding) to ``lab_to_rgb((lab − m) · gain + target_mean)`` with ``lab = rgb_to_lab(rgb)``
        and per-image moments ``m``, ``s`` (``gain = min(target_std / s, max_gain)``), in fewer passes: L*a*b* is
        linear in f = (XYZ / white)^(1/3), so the per-image affine map folds into one 3×3 matrix and offset on f
        (a batched matmul over channel planes), and powers are exp/log."""
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self._standardise(x.float().contiguous())
        out = out.to(dtype)
        return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
            memory_format=torch.channels_last) and not x.is_contiguous() else out

    def _standardise(self, xn: torch.Tensor) -> torch.Tensor:
        n, _, h, w = xn.shape
        dev = xn.device
        to_xyz_w = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / torch.tensor(_WHITE, dtype=torch.float64)[:, None]
        from_xyz_w = torch.linalg.inv(to_xyz_w)
        a64 = torch.tensor(_F_TO_LAB, dtype=torch.float64)
        a_mat, a_inv = a64.float().to(dev), torch.linalg.inv(a64).float().to(dev)
        c = torch.tensor((-16.0, 0.0, 0.0), dtype=torch.float32, device=dev)

        rgb = (xn * self.in_std + self.in_mean).clamp_(0.0, 1.0)
        lin = _piecewise(rgb, 0.04045, lambda v: _pow(v.add(0.055).div_(1.055), 2.4), lambda v: v / 12.92)
        t = torch.matmul(to_xyz_w.float().to(dev), lin.reshape(n, 3, -1))  # XYZ / white, (N, 3, HW)
        f = _piecewise(t, _EPS, lambda v: _pow(v, 1.0 / 3.0), lambda v: v * _KAPPA + 16.0 / 116.0)
        # L*a*b* = A f + c: its per-image moments from those of f
        f_mean = f.mean(dim=2)  # (N, 3)
        fc = f - f_mean[:, :, None]
        cov = fc @ fc.transpose(1, 2) / max(f.shape[2] - 1, 1)  # (N, 3, 3), unbiased like Tensor.std
        lab_mean = f_mean @ a_mat.T + c
        lab_std = torch.einsum("ij,njk,ik->ni", a_mat, cov, a_mat).clamp_min(0.0).sqrt()
        gain = (self.target_std.view(1, 3) / lab_std.clamp_min(1e-6)).clamp(max=self.max_gain)
        # f' = A⁻¹ (diag(g) (A f + c − m) + target − c) = B f + d
        b = a_inv @ (gain[:, :, None] * a_mat)  # (N, 3, 3)
        d = (gain * (c - lab_mean) + self.target_mean.view(1, 3) - c) @ a_inv.T  # (N, 3)
        f2 = torch.baddbmm(d[:, :, None], b, f)
        f3 = f2 * f2 * f2
        t2 = torch.where(f3 > _EPS, f3, (f2 - 16.0 / 116.0) / _KAPPA) if float(f3.amin()) <= _EPS else f3
        lin2 = torch.matmul(from_xyz_w.float().to(dev), t2).clamp_(min=0.0)
        out = _piecewise(lin2, 0.0031308, lambda v: _pow(v, 1.0 / 2.4).mul_(1.055).sub_(0.055), lambda v: v * 12.92)
        return ((out.clamp_(0.0, 1.0).reshape(n, 3, h, w)) - self.in_mean) / self.in_std

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
