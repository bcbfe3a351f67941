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
_LAB_OFFSET = (-16.0, 0.0, 0.0)
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


def colour_matrices() -> dict[str, torch.Tensor]:
    """The colour-space matrices (float32): sRGB-linear → XYZ/white and back, f → L*a*b* and back."""
    to_xyz_w = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / torch.tensor(_WHITE, dtype=torch.float64)[:, None]
    f_to_lab = torch.tensor(_F_TO_LAB, dtype=torch.float64)
    return {"to_xyz_w": to_xyz_w.float(), "from_xyz_w": torch.linalg.inv(to_xyz_w).float(),
            "f_to_lab": f_to_lab.float(), "lab_to_f": torch.linalg.inv(f_to_lab).float()}


def rgb_to_f(rgb: torch.Tensor, to_xyz_w: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) → f = companded XYZ / white, (N, 3, H·W); L*a*b* is linear in f."""
    lin = _piecewise(rgb, 0.04045, lambda v: _pow(v.add(0.055).div_(1.055), 2.4), lambda v: v / 12.92)
    t = torch.matmul(to_xyz_w, lin.reshape(rgb.shape[0], 3, -1))
    return _piecewise(t, _EPS, lambda v: _pow(v, 1.0 / 3.0), lambda v: v * _KAPPA + 16.0 / 116.0)


def f_to_rgb(f: torch.Tensor, from_xyz_w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_f` (N, 3, H·W) → sRGB in [0, 1] (out-of-gamut values clipped), same shape."""
    f3 = f * f * f
    t = torch.where(f3 > _EPS, f3, (f - 16.0 / 116.0) / _KAPPA) if float(f3.amin()) <= _EPS else f3
    lin = torch.matmul(from_xyz_w, t).clamp_(min=0.0)
    rgb = _piecewise(lin, 0.0031308, lambda v: _pow(v, 1.0 / 2.4).mul_(1.055).sub_(0.055), lambda v: v * 12.92)
    return rgb.clamp_(0.0, 1.0)


def lab_moments_of_f(f: torch.Tensor, f_to_lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L*a*b* mean and (unbiased) standard deviation, (N, 3) each, from f (N, 3, H·W): L*a*b* =
    A f + (−16, 0, 0), so they follow from the mean and covariance of f without converting every pixel."""
    f_mean = f.mean(dim=2)
    fc = f - f_mean[:, :, None]
    cov = fc @ fc.transpose(1, 2) / max(f.shape[2] - 1, 1)
    lab_mean = f_mean @ f_to_lab.T + torch.tensor(_LAB_OFFSET, dtype=f.dtype, device=f.device)
    lab_std = torch.einsum("ij,njk,ik->ni", f_to_lab, cov, f_to_lab).clamp_min(0.0).sqrt()
    return lab_mean, lab_std


def lab_moments(rgb: torch.Tensor, matrices: Mapping[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel L*a*b* mean and standard deviation of (N, 3, H, W) sRGB in [0, 1] → (N, 3) each
    (``matrices``: :func:`colour_matrices`, computed here when not given)."""
    m = matrices or colour_matrices()
    return lab_moments_of_f(rgb_to_f(rgb.float().clamp(0.0, 1.0), m["to_xyz_w"]), m["f_to_lab"])


class ReinhardStandardize(nn.Module):
    """Map each image's L*a*b* mean/std onto ``target_mean``/``target_std``.

    Input and output are *normalised* batches (``(rgb − mean) / std`` with the encoder's ``mean``/``std``),
    so the module sits in front of any trunk. Computed in float32 whatever the autocast dtype. L*a*b* is
    linear in f (:func:`rgb_to_f`), so the per-image affine map folds into one 3×3 matrix and offset on f
    (a batched matmul over channel planes).
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
            self.register_buffer(name, torch.tensor([float(a) for a in v], dtype=torch.float32), persistent=False)
        for name, m in colour_matrices().items():
            self.register_buffer(name, m, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self._standardise(x.float().contiguous())
        out = out.to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _standardise(self, xn: torch.Tensor) -> torch.Tensor:
        in_mean, in_std = self.in_mean.view(1, 3, 1, 1), self.in_std.view(1, 3, 1, 1)
        f = rgb_to_f((xn * in_std + in_mean).clamp_(0.0, 1.0), self.to_xyz_w)
        lab_mean, lab_std = lab_moments_of_f(f, self.f_to_lab)
        gain = (self.target_std / lab_std.clamp_min(1e-6)).clamp(max=self.max_gain)  # (N, 3)
        # f' = A⁻¹ (diag(g) (A f + c − m) + target − c) = B f + d
        c = torch.tensor(_LAB_OFFSET, dtype=f.dtype, device=f.device)
        b = self.lab_to_f @ (gain[:, :, None] * self.f_to_lab)  # (N, 3, 3)
        d = (gain * (c - lab_mean) + self.target_mean - c) @ self.lab_to_f.T  # (N, 3)
        rgb = f_to_rgb(torch.baddbmm(d[:, :, None], b, f), self.from_xyz_w)
        return (rgb.reshape(xn.shape) - in_mean) / in_std

    def forward_local(self, x: torch.Tensor, window_px: int, block_px: int = 8) -> torch.Tensor:
        """The per-tile standardisation sliding with the pixel, for a feature map computed over a region larger
        than a tile: each pixel is mapped with the L*a*b* moments of the ``window_px`` square centred on it
        (what :meth:`forward` does to a tile of that size). The moments are box-filtered at ``block_px``
        resolution (windows shrink at the region's edge) and the per-pixel gain and offset are interpolated
        bilinearly; ``x`` is a normalised (N, 3, H, W) batch, H and W multiples of ``block_px``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self._standardise_local(x.float().contiguous(), int(window_px), int(block_px))
        return out.to(x.dtype)

    def _standardise_local(self, xn: torch.Tensor, window_px: int, block_px: int) -> torch.Tensor:
        n, _, h, w = xn.shape
        if h % block_px or w % block_px:
            raise ValueError(f"forward_local: {w}×{h} px is not a multiple of the {block_px}-px block")
        in_mean, in_std = self.in_mean.view(1, 3, 1, 1), self.in_std.view(1, 3, 1, 1)
        f = rgb_to_f((xn * in_std + in_mean).clamp_(0.0, 1.0), self.to_xyz_w).reshape(n, 3, h, w)
        pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
        prods = torch.stack([f[:, a] * f[:, b] for a, b in pairs], dim=1)
        m = torch.nn.functional.avg_pool2d(torch.cat([f, prods], dim=1), block_px)
        k = max(1, round(window_px / block_px)) | 1  # odd: centred
        m = torch.nn.functional.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
        mean, second = m[:, :3], m[:, 3:]
        cov = torch.empty((n, 3, 3, *m.shape[-2:]), dtype=m.dtype, device=m.device)
        for i, (a, b) in enumerate(pairs):
            cov[:, a, b] = cov[:, b, a] = second[:, i] - mean[:, a] * mean[:, b]
        c = torch.tensor(_LAB_OFFSET, dtype=f.dtype, device=f.device).view(1, 3, 1, 1)
        lab_mean = torch.einsum("ij,njhw->nihw", self.f_to_lab, mean) + c
        npx = float(window_px * window_px)
        lab_var = torch.einsum("ij,njkhw,ik->nihw", self.f_to_lab, cov, self.f_to_lab).clamp_min(0.0)
        lab_std = (lab_var * npx / max(npx - 1.0, 1.0)).sqrt()
        gain = (self.target_std.view(1, 3, 1, 1) / lab_std.clamp_min(1e-6)).clamp(max=self.max_gain)
        offset = gain * (c - lab_mean) + self.target_mean.view(1, 3, 1, 1) - c
        params = torch.nn.functional.interpolate(torch.cat([gain, offset], dim=1), size=(h, w), mode="bilinear",
                                                 align_corners=False)
        lab = torch.einsum("ij,njhw->nihw", self.f_to_lab, f) * params[:, :3] + params[:, 3:]
        f2 = torch.einsum("ij,njhw->nihw", self.lab_to_f, lab).reshape(n, 3, -1)
        return (f_to_rgb(f2, self.from_xyz_w).reshape(n, 3, h, w) - in_mean) / in_std

    def extra_repr(self) -> str:
        return f"target_mean={self.target_mean.tolist()}, target_std={self.target_std.tolist()}, max_gain={self.max_gain}"


def fit_reinhard_target(images: Sequence[np.ndarray]) -> dict[str, Any]:
    """The target of :class:`ReinhardStandardize`: the average per-tile L*a*b* mean and std of uint8 RGB
    tiles (e.g. a sample of the encoder's training tiles; sizes may differ). Returns the ``stain_norm`` dict
    for encoder.json."""
    if len(images) == 0:
        raise ConfigError("stain_norm: no tiles to fit the Reinhard target on")
    m = colour_matrices()
    moments = [lab_moments(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0, m)
               for im in images]
    return {
        "method": REINHARD,
        "target_mean": [round(float(v), 4) for v in torch.cat([m for m, _ in moments]).mean(0)],
        "target_std": [round(float(v), 4) for v in torch.cat([s for _, s in moments]).mean(0)],
        "max_gain": DEFAULT_MAX_GAIN,
        "fitted_on_tiles": len(moments),
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
