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
# v = (f_x − f_y, f_y, f_z − f_y) is L*a*b* channel by channel: (a, L + 16, b) = _V_TO_LAB_SCALE · v
_V_TO_LAB_SCALE = (500.0, 116.0, -200.0)
_V_TO_LAB_OFFSET = (0.0, 16.0, 0.0)
_EPS = 0.008856
_KAPPA = 7.787
_SRGB_KNEE = 0.04045  # sRGB value below which the sRGB curve is linear
_LINEAR_KNEE = 0.0031308  # the same knee in linear RGB
_STRIP_PX = 64  # rows of a 1024-px wide region converted at once on a CPU (see _cache_rows)


def _pow_(x: torch.Tensor, p: float) -> torch.Tensor:
    """x ** p for x > 0, in place, as exp(p · log x): about twice as fast as ``pow`` on CPU."""
    return x.log_().mul_(p).exp_()


def _above(x: torch.Tensor, knee: float) -> bool:
    """True when every value exceeds ``knee``. The linear toe segments of sRGB and L*a*b* only concern
    near-black pixels (a few % of H&E): one min() skips their handling where there are none."""
    return x.numel() == 0 or float(x.amin()) > knee


def _srgb_to_linear_(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] → linear RGB, in place."""
    if _above(rgb, _SRGB_KNEE):
        return _pow_(rgb.add_(0.055).div_(1.055), 2.4)
    above = _pow_(rgb.clamp_min(_SRGB_KNEE).add_(0.055).div_(1.055), 2.4)
    return rgb.copy_(torch.where(rgb > _SRGB_KNEE, above, rgb / 12.92))


def srgb_to_linear_table(device: torch.device | str | None = None) -> torch.Tensor:
    """Linear RGB of the 256 uint8 sRGB codes (float32, computed in float64)."""
    return _srgb_to_linear_(torch.arange(256, dtype=torch.float64) / 255.0).float().to(device)


def _xyz_to_f_(t: torch.Tensor) -> torch.Tensor:
    """XYZ / white → f (the L*a*b* companding), in place."""
    if _above(t, _EPS):
        return _pow_(t, 1.0 / 3.0)
    # the toe κ t + 16/116 meets t^(1/3) at ε: f = max(t, ε)^(1/3) + κ (min(t, ε) − ε)
    toe = t.clamp_max(_EPS).sub_(_EPS)
    return _pow_(t.clamp_min_(_EPS), 1.0 / 3.0).add_(toe, alpha=_KAPPA)


def _f_to_linear(f: torch.Tensor, from_xyz_w: torch.Tensor) -> torch.Tensor:
    """f (N, 3, P) → linear RGB clipped to [0, 1] (a new tensor)."""
    t = f.pow(3)
    if not _above(t, _EPS):  # the toe (f − 16/116) / κ meets f³ at f = ε^(1/3)
        knee = _EPS ** (1.0 / 3.0)
        t = f.clamp_min(knee).pow_(3).add_(f.clamp_max(knee).sub_(knee), alpha=1.0 / _KAPPA)
    return torch.matmul(from_xyz_w, t).clamp_(0.0, 1.0)


def _linear_to_srgb_(lin: torch.Tensor) -> torch.Tensor:
    """Linear RGB in [0, 1] → sRGB in [0, 1], in place."""
    if _above(lin, _LINEAR_KNEE):
        return _pow_(lin, 1.0 / 2.4).mul_(1.055).sub_(0.055).clamp_(0.0, 1.0)
    above = _pow_(lin.clamp_min(_LINEAR_KNEE), 1.0 / 2.4).mul_(1.055).sub_(0.055)
    return lin.copy_(torch.where(lin > _LINEAR_KNEE, above, lin * 12.92)).clamp_(0.0, 1.0)


def colour_matrices() -> dict[str, torch.Tensor]:
    """The colour-space matrices (float32): sRGB-linear → XYZ/white and back, f → L*a*b* and back."""
    to_xyz_w = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / torch.tensor(_WHITE, dtype=torch.float64)[:, None]
    f_to_lab = torch.tensor(_F_TO_LAB, dtype=torch.float64)
    return {"to_xyz_w": to_xyz_w.float(), "from_xyz_w": torch.linalg.inv(to_xyz_w).float(),
            "f_to_lab": f_to_lab.float(), "lab_to_f": torch.linalg.inv(f_to_lab).float()}


def rgb_to_f(rgb: torch.Tensor, to_xyz_w: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (N, 3, H, W) → f = companded XYZ / white, (N, 3, H·W); L*a*b* is linear in f."""
    lin = _srgb_to_linear_(rgb.clone())
    return _xyz_to_f_(torch.matmul(to_xyz_w, lin.reshape(rgb.shape[0], 3, -1)))


def f_to_rgb(f: torch.Tensor, from_xyz_w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_f` (N, 3, H·W) → sRGB in [0, 1] (out-of-gamut values clipped), same shape."""
    return _linear_to_srgb_(_f_to_linear(f, from_xyz_w))


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
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            out = torch.empty(xf.shape, dtype=xf.dtype, device=xf.device,
                              memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            step = _cache_rows(xf.device, xf.shape[0], xf.shape[2] * xf.shape[3])  # images at once
            for i in range(0, xf.shape[0], step):
                self._standardise(xf[i:i + step].contiguous(), out[i:i + step])
        return out.to(x.dtype)

    def _standardise(self, xn: torch.Tensor, out: torch.Tensor) -> None:
        """The standardised ``xn`` (N, 3, H, W, contiguous) into ``out`` (same shape, any memory format)."""
        n = xn.shape[0]
        in_mean, in_std = self.in_mean.view(1, 3, 1, 1), self.in_std.view(1, 3, 1, 1)
        lin = _srgb_to_linear_(torch.addcmul(in_mean, xn, in_std).clamp_(0.0, 1.0))
        f = _xyz_to_f_(torch.matmul(self.to_xyz_w, lin.view(n, 3, -1)))
        lab_mean, lab_std = lab_moments_of_f(f, self.f_to_lab)
        gain = (self.target_std / lab_std.clamp_min(1e-6)).clamp(max=self.max_gain)  # (N, 3)
        # f' = A⁻¹ (diag(g) (A f + c − m) + target − c) = B f + d
        c = torch.tensor(_LAB_OFFSET, dtype=f.dtype, device=f.device)
        b = self.lab_to_f @ (gain[:, :, None] * self.f_to_lab)  # (N, 3, 3)
        d = (gain * (c - lab_mean) + self.target_mean - c) @ self.lab_to_f.T  # (N, 3)
        self._f_to_normalised(torch.baddbmm(d[:, :, None], b, f), out.view(n, 3, -1))

    def _f_to_normalised(self, f: torch.Tensor, out: torch.Tensor) -> None:
        """f (N, 3, …) → the normalised sRGB it encodes, written to ``out`` (same shape, any strides)."""
        lin = _f_to_linear(f.reshape(f.shape[0], 3, -1), self.from_xyz_w).view(out.shape)
        shape = (1, 3) + (1,) * (out.ndim - 2)
        in_mean, in_std = self.in_mean.view(shape), self.in_std.view(shape)
        below = None
        if not _above(lin, _LINEAR_KNEE):  # near-black pixels: the linear toe of the sRGB curve
            below, above = (lin * 12.92 - in_mean) / in_std, lin > _LINEAR_KNEE
            lin.clamp_min_(_LINEAR_KNEE)
        # (1.055 lin^(1/2.4) − 0.055 − mean) / std = exp(log(lin) / 2.4 + log(1.055 / std)) − (0.055 + mean) / std
        torch.add(torch.log(1.055 / in_std), lin.log_(), alpha=1.0 / 2.4, out=lin)
        torch.sub(lin.exp_(), (0.055 + in_mean) / in_std, out=out)
        if below is not None:
            torch.where(above, out, below, out=out)

    def forward_local(self, x: torch.Tensor, window_px: int, block_px: int = 8) -> torch.Tensor:
        """The per-tile standardisation sliding with the pixel, for a feature map computed over a region larger
        than a tile: each pixel is mapped with the L*a*b* moments of the ``window_px`` square centred on it
        (what :meth:`forward` does to a tile of that size). The moments are box-filtered at ``block_px``
        resolution (windows shrink at the region's edge) and the per-pixel gain and offset are interpolated
        bilinearly; ``x`` is a normalised (N, 3, H, W) batch, H and W multiples of ``block_px``."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xn = x.float()
            in_mean, in_std = self.in_mean.view(1, 3, 1, 1), self.in_std.view(1, 3, 1, 1)

            def linear_rows(r0: int, r1: int) -> torch.Tensor:
                return _srgb_to_linear_(torch.addcmul(in_mean, xn[:, :, r0:r1], in_std).clamp_(0.0, 1.0))

            out = self._standardise_local(linear_rows, xn.shape, int(window_px), int(block_px))
        return out.to(x.dtype)

    def forward_local_pixels(self, pixels: torch.Tensor, window_px: int, block_px: int = 8,
                             memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """:meth:`forward_local` of uint8 (N, H, W, 3) RGB pixels, i.e. of the encoder's ``preprocess`` of them,
        read straight from the pixels (the sRGB curve as a 256-entry table, no normalising round trip).
        Returns the normalised float32 (N, 3, H, W) batch in ``memory_format`` (``torch.channels_last`` for a
        CNN trunk)."""
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"forward_local_pixels expects uint8 (N, H, W, 3), got {pixels.dtype} "
                             f"{tuple(pixels.shape)}")
        pixels = pixels.to(self.in_mean.device)
        table = srgb_to_linear_table(pixels.device)

        def linear_rows(r0: int, r1: int) -> torch.Tensor:
            return torch.take(table, pixels[:, r0:r1].permute(0, 3, 1, 2).long())

        n, h, w, _ = pixels.shape
        return self._standardise_local(linear_rows, (n, 3, h, w), int(window_px), int(block_px), memory_format)

    def _standardise_local(self, linear_rows: Callable[[int, int], torch.Tensor], shape: Sequence[int],
                           window_px: int, block_px: int,
                           memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """Both :meth:`forward_local` paths; ``linear_rows(r0, r1)``: linear RGB (N, 3, r1 − r0, W) of those
        rows. Works in strips of rows (:func:`_cache_rows`) so that the per-pixel passes stay in cache, on
        v = (f_x − f_y, f_y, f_z − f_y) = (a / 500, (L + 16) / 116, −b / 200): L*a*b* channel by channel, so
        the transfer is diagonal (v' = g v + q) and the window moments need no 3 × 3 covariance."""
        n, _, h, w = shape
        if h % block_px or w % block_px:
            raise ValueError(f"forward_local: {w}×{h} px is not a multiple of the {block_px}-px block")
        strip = block_px * _cache_rows(self.in_mean.device, h // block_px, n * w * block_px)
        v, moments = self._v_and_block_moments(linear_rows, (n, h, w), block_px, strip)
        params = _width_upsampled(self._local_params(moments, window_px, block_px), w)
        out = torch.empty((n, 3, h, w), dtype=v.dtype, device=v.device, memory_format=memory_format)
        for r0 in range(0, h, strip):
            r1 = min(h, r0 + strip)
            p = _upsampled_rows(params, r0 // block_px, r1 // block_px, block_px)
            f2 = torch.addcmul(p[:, 3:], p[:, :3], v[:, :, r0:r1])  # v'
            f2[:, 0::2] += f2[:, 1:2]
            self._f_to_normalised(f2, out[:, :, r0:r1])
        return out

    def _v_and_block_moments(self, linear_rows: Callable[[int, int], torch.Tensor], nhw: tuple[int, int, int],
                             block_px: int, strip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """v (N, 3, H, W) and per block its mean and variance, (N, 6, H/block, W/block) (the variance of the
        block-centred values: no cancellation where the colour hardly varies)."""
        n, h, w = nhw
        dev = self.to_xyz_w.device
        v = torch.empty((n, 3, h, w), device=dev)
        moments = torch.empty((n, 6, h // block_px, w // block_px), device=dev)
        for r0 in range(0, h, strip):
            r1 = min(h, r0 + strip)
            b0, b1, rows = r0 // block_px, r1 // block_px, r1 - r0
            vr = _xyz_to_f_(torch.matmul(self.to_xyz_w, linear_rows(r0, r1).reshape(n, 3, -1))).view(n, 3, rows, w)
            vr[:, 0::2] -= vr[:, 1:2]
            mean = torch.nn.functional.avg_pool2d(vr, block_px)
            moments[:, :3, b0:b1] = mean
            centred = torch.sub(vr.view(n, 3, b1 - b0, block_px, w),
                                mean.repeat_interleave(block_px, dim=3)[:, :, :, None]).square_().view(n, 3, rows, w)
            moments[:, 3:, b0:b1] = torch.nn.functional.avg_pool2d(centred, block_px)
            v[:, :, r0:r1] = vr
        return v, moments

    def _local_params(self, moments: torch.Tensor, window_px: int, block_px: int) -> torch.Tensor:
        """Block means and variances of v (N, 6, h, w) → per block the gains g and offsets q of v' = g v + q
        for the window centred there, (N, 6, h, w). In float64: few values, and the window variance is the mean
        of the block variances plus the variance of the block means (a difference of near-equal terms)."""
        k = max(1, round(window_px / block_px)) | 1  # odd: centred
        m = moments.to("cpu" if moments.device.type == "mps" else moments.device, torch.float64)  # mps: no float64
        m = torch.cat([m, m[:, :3] * m[:, :3]], dim=1)
        m = _box_mean(m, k)
        mean = m[:, :3]
        var = (m[:, 3:6] + m[:, 6:] - mean * mean).clamp_min(0.0)
        npx = float(window_px * window_px)
        scale = torch.tensor(_V_TO_LAB_SCALE, dtype=m.dtype, device=m.device)
        lab_std = (var * npx / max(npx - 1.0, 1.0)).sqrt() * scale.abs().view(1, 3, 1, 1)
        order = [1, 0, 2]  # the L*a*b* channel of v's (x, y, z)
        target_std = self.target_std[order].to(m).view(1, 3, 1, 1)
        target = (self.target_mean[order].to(m) + torch.tensor(_V_TO_LAB_OFFSET).to(m)) / scale
        gain = (target_std / lab_std.clamp_min(1e-6)).clamp(max=self.max_gain)
        return torch.cat([gain, target.view(1, 3, 1, 1) - gain * mean], dim=1).to(moments)

    def extra_repr(self) -> str:
        return f"target_mean={self.target_mean.tolist()}, target_std={self.target_std.tolist()}, max_gain={self.max_gain}"


def _cache_rows(device: torch.device, n: int, size: int) -> int:
    """How many of ``n`` rows of ``size`` pixels to convert at once: on a CPU about :data:`_STRIP_PX` × 1024
    pixels, so that a chain of element-wise passes stays in cache (twice as fast on a 1024² region); on an
    accelerator all of them (fewer kernel launches)."""
    if device.type != "cpu":
        return n
    return max(1, min(n, _STRIP_PX * 1024 // max(1, size)))


def _box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the k × k window (k odd) centred on each element of (N, C, H, W), windows clipped at the
    edges (``avg_pool2d(x, k, 1, k // 2, count_include_pad=False)``), separably from cumulative sums."""
    r = k // 2
    for dim in (2, 3):
        n = x.shape[dim]
        c = x.cumsum(dim)
        c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim)
        i = torch.arange(n, device=x.device)
        hi, lo = (i + r + 1).clamp(max=n), (i - r).clamp(min=0)
        count = (hi - lo).to(x.dtype).view([n if d == dim else 1 for d in range(x.ndim)])
        x = (c.index_select(dim, hi) - c.index_select(dim, lo)) / count
    return x


def _width_upsampled(params: torch.Tensor, w: int) -> torch.Tensor:
    """(N, C, h, w / block) planes bilinearly upsampled (align_corners=False) along the width to w, with the
    first and last rows repeated: the rows that :func:`_upsampled_rows` blends."""
    up = torch.nn.functional.interpolate(params, size=(params.shape[2], w), mode="bilinear", align_corners=False)
    return torch.cat([up[:, :, :1], up, up[:, :, -1:]], dim=2)


def _upsampled_rows(rows: torch.Tensor, b0: int, b1: int, block_px: int) -> torch.Tensor:
    """Block rows b0:b1 of the bilinear upsampling by ``block_px`` (align_corners=False, the values of
    ``interpolate``) of the planes that ``rows`` (:func:`_width_upsampled`) holds, (N, C, (b1 − b0) · block, W).
    Pixel row r of block j lies (r + ½) / block − ½ rows after block row j: it blends block rows j − 1 and j
    for r < block // 2, j and j + 1 after (the repeated edge rows give the clamp at the edges)."""
    n, c, _, w = rows.shape
    half = block_px // 2
    pos = (torch.arange(block_px, dtype=rows.dtype, device=rows.device) + 0.5) / block_px - 0.5
    out = torch.empty((n, c, b1 - b0, block_px, w), dtype=rows.dtype, device=rows.device)
    prev, cur, nxt = (rows[:, :, b0 + i:b1 + i, None] for i in range(3))
    torch.lerp(prev, cur, (pos[:half] + 1.0).view(-1, 1), out=out[:, :, :, :half])
    torch.lerp(cur, nxt, pos[half:].view(-1, 1), out=out[:, :, :, half:])
    return out.view(n, c, -1, w)


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
