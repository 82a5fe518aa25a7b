"""Image metrics computed where the images were made (the device of the model that made them).

`ssim` is the structural similarity of chapter 2's table (`disruption.unit_metrics`): torchmetrics'
formula in float64, as the committed results were computed, but on the model's device and with
the Gaussian window as two 1-D passes -- a 1024x1024 image took 13 s on a CPU with torchmetrics'
2-D float64 convolution, an hour for a default FLUX `disrupt`. `device_of(adapter)` is where an
adapter's images were made.

What this is not: a perceptual metric (LPIPS, CLIP-T need network weights; CLIP-T is in
`mabook.disruption`).
"""

from __future__ import annotations

import numpy as np
import torch

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004, as torchmetrics' defaults


def ssim(a: np.ndarray, b: np.ndarray, device="cpu") -> np.ndarray:
    """Per-image SSIM of (N, H, W, 3) images in [0, 1], by torchmetrics' formula (Gaussian window
    11 x 11 of sigma 1.5, K1 0.01, K2 0.03, data range 1, variances clamped at 0, the mean over every
    pixel and channel with the image mirrored at its border where a window reaches outside).

    On `device`, the one that made the images (MPS, which has no float64: the CPU), in float64 and
    with the Gaussian window applied as two 1-D passes: float32 is off by up to ~2e-5 on the
    organism's flat backgrounds (E[x^2] - E[x]^2 cancels, and 1/K2^2 ~ 1e3 amplifies it), as large
    as 1 - SSIM itself after a small edit; torchmetrics' float64 2-D convolution took 13 s per
    1024x1024 image on a CPU. One image at a time, so that a unit's value depends on no other unit
    (`disruption.unit_metrics`)."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"ssim needs two (N, H, W, 3) image arrays of one shape, got {a.shape} and {b.shape}")
    device = torch.device(device)
    device = torch.device("cpu") if device.type == "mps" else device
    i = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-0.5 * (i / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    c1, c2, pad = SSIM_K1 ** 2, SSIM_K2 ** 2, SSIM_WINDOW // 2
    out = np.empty(len(a), np.float64)
    for n in range(len(a)):
        x, y = (torch.as_tensor(np.ascontiguousarray(img[n]), device=device).permute(2, 0, 1).double() for img in (a, b))
        z = torch.nn.functional.pad(torch.stack([x, y, x * x, y * y, x * y]).reshape(15, 1, *x.shape[1:]),
                                    (pad, pad, pad, pad), mode="reflect")
        z = torch.nn.functional.conv2d(torch.nn.functional.conv2d(z, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
        mx, my, xx, yy, xy = z.reshape(5, *x.shape)
        var_x, var_y, cov = (xx - mx * mx).clamp_min(0), (yy - my * my).clamp_min(0), xy - mx * my
        ssim_map = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
        out[n] = float(ssim_map.mean())
    return out


def device_of(adapter) -> torch.device:
    """Where an adapter's images were made: the pipeline's execution device (it follows
    `enable_model_cpu_offload`), else the transformer's; the CPU for anything else."""
    pipe = getattr(adapter, "pipe", None)
    device = getattr(pipe, "_execution_device", None) if pipe is not None else None
    if not isinstance(device, torch.device):
        param = next(iter(getattr(adapter, "transformer", torch.nn.Module()).parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    return device if device.type in ("cuda", "mps", "cpu") else torch.device("cpu")
