"""Pathology augmentations for self-supervised training, vectorised over a batch of crops (torch).

Every function takes float images (K, 3, S, S) in [0, 1] and a ``torch.Generator`` so a batch is a pure
function of its seed (exact resume, identical on every worker count).

* :func:`multi_crop` — crops at the *training* physical scale: a crop of ``S`` output pixels at
  ``train_mpp`` µm/px covers ``S·train_mpp/src_mpp·z`` source pixels, ``z`` a mild zoom jitter
  (log-uniform in ``zoom``), so a 0.495 µm/px Kather tile and a 0.5 µm/px slide tile give the same
  scale. Uses ``torchvision.ops.roi_align`` (bilinear with adaptive averaging, i.e. antialiased).
* :func:`flip_rot90` — the 8 dihedral symmetries (tissue has no orientation).
* :func:`hed_jitter` — stain augmentation in haematoxylin-eosin-DAB space (Tellez et al. 2018), with the
  colour-deconvolution maths of ``skimage.color.rgb2hed`` / ``hed2rgb`` (Ruifrok & Johnston) in torch.
* :func:`color_jitter` (brightness / contrast / saturation / hue), :func:`random_grayscale`,
  :func:`gaussian_blur`, :func:`solarize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# skimage.color: rgb_from_hed and its inverse (Ruifrok & Johnston 2001)
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_LOG_ADJUST = math.log(1e-6)


@dataclass
class AugmentConfig:
    """Multi-crop and augmentation parameters (sizes in pixels at ``mpp`` µm/px)."""

    global_size: int = 112
    local_size: int = 48
    n_local: int = 6
    mpp: float = 0.5
    zoom_min: float = 0.8  # crop scale jitter around the nominal physical scale
    zoom_max: float = 1.25
    hed_sigma: float = 0.05  # stain multiplicative jitter (per channel, ± uniform)
    hed_bias: float = 0.01  # stain additive jitter in rgb2hed units (tissue values ~0.02–0.2)
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.0  # hue rotation in YIQ space, fraction of a turn (DINO: 0.1)
    color_p: float = 0.8
    gray_p: float = 0.0  # random grayscale (DINO: 0.2)
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 1.5
    blur_p_global1: float = 0.5  # DINO's asymmetric recipe: view 1 often blurred ...
    blur_p_global2: float = 0.1  # ... view 2 rarely blurred but sometimes solarised
    blur_p_local: float = 0.3
    solarize_p_global2: float = 0.2
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _rand(g: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _draw(g: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """U(0, 1) numbers drawn on the CPU generator (the same stream on every device), placed on ``device``."""
    return torch.rand(shape, generator=g).to(device, non_blocking=True)


# ---------------------------------------------------------------- crops
def stack_padded(
    images: Sequence[np.ndarray], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HWC images of any sizes → float (B, 3, Hmax, Wmax) in [0, 1] on ``device`` (zero-padded) and
    sizes (B, 2) = (h, w) on the CPU. The uint8 stack is built on the CPU and converted on the device."""
    hmax = max(im.shape[0] for im in images)
    wmax = max(im.shape[1] for im in images)
    out = np.zeros((len(images), hmax, wmax, 3), dtype=np.uint8)
    sizes = torch.zeros(len(images), 2)
    for i, im in enumerate(images):
        out[i, : im.shape[0], : im.shape[1]] = im
        sizes[i, 0], sizes[i, 1] = im.shape[0], im.shape[1]
    t = torch.from_numpy(out).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return t.contiguous(), sizes


def crop_boxes(
    sizes: torch.Tensor, out_px: int, src_px_per_out_px: torch.Tensor | float, zoom: tuple[float, float],
    g: torch.Generator,
) -> torch.Tensor:
    """Random square boxes (B, 5) = (index, x1, y1, x2, y2) covering ``out_px·ratio·z`` source pixels.

    ``src_px_per_out_px`` = train_mpp / src_mpp (per image or scalar); ``z`` log-uniform in ``zoom``.
    Boxes larger than the image shrink to its shorter side (a slightly coarser scale for tiny images).
    """
    b = sizes.shape[0]
    ratio = torch.as_tensor(src_px_per_out_px, dtype=torch.float32).expand(b)
    z = torch.exp(_rand(g, b, math.log(zoom[0]), math.log(zoom[1])))
    side = torch.minimum(out_px * ratio * z, sizes.min(dim=1).values)
    x1 = _rand(g, b) * (sizes[:, 1] - side)
    y1 = _rand(g, b) * (sizes[:, 0] - side)
    idx = torch.arange(b, dtype=torch.float32)
    return torch.stack([idx, x1, y1, x1 + side, y1 + side], dim=1)


def roi_crop(images: torch.Tensor, boxes: torch.Tensor, out_px: int) -> torch.Tensor:
    """Crop-and-resize ``boxes`` of ``images`` (B, 3, H, W) to (K, 3, out_px, out_px), antialiased."""
    from torchvision.ops import roi_align

    return roi_align(images, boxes.to(images.device), output_size=(out_px, out_px), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ---------------------------------------------------------------- photometric / geometric
def flip_rot90(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random element of the dihedral group D4 per image (square images)."""
    k = torch.randint(0, 4, (x.shape[0],), generator=g)
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    out = x.clone()
    for r in (1, 2, 3):
        idx = torch.nonzero(k == r).flatten()
        if idx.numel():
            idx = idx.to(x.device)
            out[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
    return out


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """(K, 3, H, W) RGB in [0, 1] → HED stain concentrations (skimage.color.rgb2hed maths)."""
    hed_from_rgb = torch.linalg.inv(torch.tensor(RGB_FROM_HED, dtype=torch.float64)).to(x.device, x.dtype)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    return torch.einsum("kchw,cd->kdhw", od, hed_from_rgb).clamp_min(0.0)


def hed_to_rgb(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (skimage.color.hed2rgb maths), clipped to [0, 1]."""
    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=s.dtype, device=s.device)
    log_rgb = torch.einsum("kdhw,dc->kchw", s * _LOG_ADJUST, rgb_from_hed)
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def hed_jitter(x: torch.Tensor, g: torch.Generator, sigma: float, bias: float) -> torch.Tensor:
    """Stain jitter: each of H, E, D scaled by U(1−σ, 1+σ) and shifted by U(−bias, bias), per image."""
    if sigma <= 0 and bias <= 0:
        return x
    k = x.shape[0]
    alpha = (1.0 + (_draw(g, (k, 3), x.device) * 2 - 1) * sigma).view(k, 3, 1, 1)
    beta = ((_draw(g, (k, 3), x.device) * 2 - 1) * bias).view(k, 3, 1, 1)
    s = rgb_to_hed(x)
    return hed_to_rgb((s * alpha + beta).clamp_min(0.0))


_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def hue_rotate(x: torch.Tensor, g: torch.Generator, hue: float, on: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by U(−hue, hue) turns, per image where ``on``."""
    k = x.shape[0]
    theta = (torch.rand(k, generator=g) * 2 - 1) * hue * 2 * math.pi * on.view(-1).cpu()
    t = torch.tensor(_RGB_TO_YIQ, dtype=torch.float32)
    t_inv = torch.linalg.inv(t)
    rot = torch.zeros(k, 3, 3, dtype=torch.float32)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(theta), -torch.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(theta), torch.cos(theta)
    m = (t_inv @ rot @ t).to(x.device, x.dtype)  # (k, 3, 3) acting on RGB
    return torch.einsum("kij,kjhw->kihw", m, x).clamp(0.0, 1.0)


def random_grayscale(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    on = (_draw(g, (x.shape[0],), x.device) < p).view(-1, 1, 1, 1)
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    return torch.where(on, gray, x)


def color_jitter(
    x: torch.Tensor, g: torch.Generator, brightness: float, contrast: float, saturation: float, p: float,
    hue: float = 0.0,
) -> torch.Tensor:
    """Brightness / contrast / saturation jitter (factors U(1−a, 1+a)) and hue rotation on a fraction ``p``
    of images."""
    k = x.shape[0]
    on = (_draw(g, (k,), x.device) < p).float().view(k, 1, 1, 1)

    def factor(a: float) -> torch.Tensor:
        f = 1.0 + (_draw(g, (k,), x.device) * 2 - 1) * a
        return (1.0 + (f.view(k, 1, 1, 1) - 1.0) * on)

    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    x = x * fb
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    mean = gray.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * fc + mean
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - gray) * fs + gray).clamp(0.0, 1.0)
    if hue > 0:
        x = hue_rotate(x, g, hue, on.view(-1) > 0)
    return x


def gaussian_blur(
    x: torch.Tensor, g: torch.Generator, p: float, sigma_min: float, sigma_max: float
) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ ~ U(σmin, σmax) on a fraction ``p`` of images."""
    k, c, h, w = x.shape
    on = torch.rand(k, generator=g) < p
    sigma = _rand(g, k, sigma_min, sigma_max)
    if not on.any():
        return x
    radius = max(1, min(math.ceil(2.5 * sigma_max), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    ker = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.device, x.dtype)) ** 2)
    ker = ker / ker.sum(dim=1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand(k, -1)
    ker = torch.where(on.to(x.device).view(-1, 1), ker, delta)  # (k, 2r+1)
    ker = ker.repeat_interleave(c, dim=0)  # (k*c, 2r+1)
    y = x.reshape(1, k * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, ker.view(k * c, 1, 1, -1), groups=k * c)
    y = F.conv2d(y, ker.view(k * c, 1, -1, 1), groups=k * c)
    return y.view(k, c, h, w)


def solarize(x: torch.Tensor, g: torch.Generator, p: float, threshold: float = 0.5) -> torch.Tensor:
    on = (_draw(g, (x.shape[0],), x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on & (x >= threshold), 1.0 - x, x)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment_view(
    x: torch.Tensor, g: torch.Generator, cfg: AugmentConfig, blur_p: float, solarize_p: float
) -> torch.Tensor:
    x = flip_rot90(x, g)
    x = hed_jitter(x, g, cfg.hed_sigma, cfg.hed_bias)
    x = color_jitter(x, g, cfg.brightness, cfg.contrast, cfg.saturation, cfg.color_p, cfg.hue)
    if cfg.gray_p > 0:
        x = random_grayscale(x, g, cfg.gray_p)
    x = gaussian_blur(x, g, blur_p, cfg.blur_sigma_min, cfg.blur_sigma_max)
    if solarize_p > 0:
        x = solarize(x, g, solarize_p)
    return normalize(x, cfg.mean, cfg.std)


def multi_crop(
    images: Sequence[np.ndarray], src_mpp: float | Sequence[float], cfg: AugmentConfig, g: torch.Generator,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """DINO multi-crop views of ``images`` (uint8 HWC at ``src_mpp`` µm/px): [global1, global2, local1..n],
    each a normalised float tensor (B, 3, S, S) on ``device``. Random draws come from ``g`` on the CPU, so a
    batch is the same (up to float rounding) whether it is augmented on the CPU or on a GPU."""
    batch, sizes = stack_padded(images, device)
    ratio = torch.as_tensor(cfg.mpp, dtype=torch.float32) / torch.as_tensor(src_mpp, dtype=torch.float32)
    zoom = (cfg.zoom_min, cfg.zoom_max)
    views = []
    for v in range(2 + cfg.n_local):
        size = cfg.global_size if v < 2 else cfg.local_size
        crops = roi_crop(batch, crop_boxes(sizes, size, ratio, zoom, g), size).clamp(0.0, 1.0)
        if v == 0:
            blur_p, sol_p = cfg.blur_p_global1, 0.0
        elif v == 1:
            blur_p, sol_p = cfg.blur_p_global2, cfg.solarize_p_global2
        else:
            blur_p, sol_p = cfg.blur_p_local, 0.0
        views.append(augment_view(crops, g, cfg, blur_p, sol_p))
    return views
