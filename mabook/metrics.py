"""Image-quality metrics, computed where the images were made (the device of the model that made them).

Pixel metrics, for every model. `ssim` is the structural similarity of chapter 2's table
(`disruption.unit_metrics`): torchmetrics' formula in float64, as the committed results were
computed, but on the model's device and with the Gaussian window as two 1-D passes -- a 1024x1024
image took 13 s on a CPU with torchmetrics' 2-D float64 convolution, an hour for a default FLUX
`disrupt`. `device_of(adapter)` is where an adapter's images were made.

Perceptual metrics, for real models: the ones the papers report, when their network weights can
be loaded.

- `clip_t(images, prompts, model)`: CLIP-T, the CLIP score of Hessel et al. 2021 as torchmetrics
  defines it, max(100 x cosine(image embedding, prompt embedding), 0), with transformers' CLIP
  (`load_clip`: a hub id, a local directory or a loaded model; default `CLIP_MODEL`, the ViT-B/32
  the sinks paper scores with -- its code reports the bare cosine: divide by 100 to compare).
  Written on transformers directly: torchmetrics' clip_score (1.9) breaks on transformers 5, whose
  get_*_features return output objects rather than tensors.
- `lpips(a, b, net)`: LPIPS v0.1 (Zhang et al. 2018), the perceptual distance the sinks paper's
  "6x" is measured in, with the `lpips` package's defaults (`net` "alex", its linear layers, inputs
  in [-1, 1], full resolution, the mean over pixels; `load_lpips`). Written here on torch alone:
  torchmetrics' LPIPS and the `lpips` package build the backbone with torchvision, whose wheels
  must match the torch build (PyPI's CUDA torchvision does not load beside a CPU torch). The
  backbone's weights are torchvision's ImageNet file, fetched into torch's hub cache on first use;
  the linear layers are the lpips v0.1 weights that torchmetrics ships.

Both score the images as saved (uint8: `images.to_uint8`), as the papers scored PNGs. When weights
cannot be loaded -- offline and not cached -- the loaders raise `MissingWeights`, one line naming
the weights and how to get them.

What this is not: a judge of the organism. On the organism's 32x32 shapes the judge, SSIM and
mean |difference| are the measures (`disruption.unit_metrics`); LPIPS and CLIP-T networks read
photographs, and a pixel metric's ratio is never the paper's LPIPS ratio.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mabook.images import to_uint8

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


# ---------------------------------------------------------------------------------------------
# Perceptual metrics: CLIP-T and LPIPS, when their weights can be loaded
# ---------------------------------------------------------------------------------------------

CLIP_MODEL = "openai/clip-vit-base-patch32"  # the sinks paper's CLIP (ViT-B/32)
LPIPS_NET = "alex"  # the lpips package's default, and the sinks paper's
PERCEPTUAL = ("lpips", "clip-t")  # what `--metrics` may add to the pixel metrics (column names: lpips, clip_t)
PIXEL = ("mse", "mae", "ssim")  # always in the table (columns pixel_mse, pixel_mae, ssim)
METRICS = PIXEL + PERCEPTUAL


class MissingWeights(OSError):
    """A metric's network weights cannot be loaded (offline and not cached, or not a model): one line
    naming the weights and how to get them."""


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _uint8(images, who: str) -> np.ndarray:
    """(N, H, W, 3) uint8: the images as saved (floats in [0, 1] clipped, x255, rounded)."""
    out = to_uint8(images.cpu().numpy() if isinstance(images, torch.Tensor) else images)
    if out.ndim != 4 or out.shape[-1] != 3:
        raise ValueError(f"{who} needs (N, H, W, 3) images (floats in [0, 1] or uint8), got shape {out.shape}")
    return out


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


# CLIP-T ----------------------------------------------------------------------------------------


@dataclass
class Clip:
    """A loaded CLIP: transformers' CLIPModel (eval mode) and its CLIPProcessor, and what it was loaded from."""

    model: torch.nn.Module
    processor: object
    id: str


def load_clip(model=CLIP_MODEL) -> Clip:
    """A `Clip` from a hub id or a local directory (`from_pretrained`: the hub's cache first), a
    (CLIPModel, CLIPProcessor) pair, or a `Clip` (returned as is). `MissingWeights` when it cannot
    be loaded."""
    if isinstance(model, Clip):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        return Clip(model[0].eval(), model[1], getattr(model[0].config, "_name_or_path", "") or type(model[0]).__name__)
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ValueError(f"CLIP model must be a hub id, a local directory, a (CLIPModel, CLIPProcessor) pair or a Clip, "
                         f"got {model!r:.80}")
    from transformers import CLIPModel, CLIPProcessor  # deferred: transformers' CLIP takes seconds to import; only CLIP-T needs it

    name = str(model)
    try:
        loaded = CLIPModel.from_pretrained(name).eval()
        processor = CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise MissingWeights(f"CLIP-T needs the CLIP model {name!r} (transformers' CLIPModel and CLIPProcessor): not "
                             f"loadable here ({_reason(e)}); run once online to fill the Hugging Face cache (`hf download "
                             f"{name}`), or pass a local directory saved with save_pretrained") from None
    return Clip(loaded, processor, name)


def _features(output) -> torch.Tensor:
    """transformers 4 returns the projected embeddings; 5 an output object holding them as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_t(images, prompts: Sequence[str], model=CLIP_MODEL, device=None) -> np.ndarray:
    """Per-image CLIP-T of (N, H, W, 3) images (floats in [0, 1] or uint8) and their N prompts:
    max(100 x cosine(projected image embedding, projected prompt embedding), 0) -- the CLIP score
    (Hessel et al. 2021) as torchmetrics' CLIPScore computes it; the prompt truncated at CLIP's 77
    tokens. `model`: anything `load_clip` takes. On `device` (default the CPU; the model is moved
    there), one image at a time, so a unit's value depends on no other unit."""
    pictures = _uint8(images, "clip_t")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(pictures) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"clip_t needs one prompt (str) per image: {len(pictures)} image(s), got {len(prompts)} prompt(s)")
    clip, device = load_clip(model), _device(device)
    clip.model.to(device)
    out = np.empty(len(pictures), np.float64)
    for n, (picture, prompt) in enumerate(zip(pictures, prompts)):
        inputs = clip.processor(text=[prompt], images=[picture], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            image = _features(clip.model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
            text = _features(clip.model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                          attention_mask=inputs["attention_mask"].to(device)))
        out[n] = float((100 * torch.nn.functional.cosine_similarity(image.float(), text.float())).clamp_min(0))
    return out


# LPIPS -----------------------------------------------------------------------------------------

# torchvision's ImageNet weights (IMAGENET1K_V1, what the lpips package loads): the file, and the
# backbone's `features` layers: ("conv", in, out, kernel, stride, padding), "relu", ("pool", kernel, stride)
_C, _R = "conv", "relu"
BACKBONES = {
    "alex": {"url": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "arch": "AlexNet",
             "layers": [(_C, 3, 64, 11, 4, 2), _R, ("pool", 3, 2), (_C, 64, 192, 5, 1, 2), _R, ("pool", 3, 2),
                        (_C, 192, 384, 3, 1, 1), _R, (_C, 384, 256, 3, 1, 1), _R, (_C, 256, 256, 3, 1, 1), _R],
             "cuts": (2, 5, 8, 10, 12), "min_side": 31},  # the outputs LPIPS compares: relu1 .. relu5; the smallest image
    "vgg": {"url": "https://download.pytorch.org/models/vgg16-397923af.pth", "arch": "VGG16",
            "layers": [(_C, 3, 64, 3, 1, 1), _R, (_C, 64, 64, 3, 1, 1), _R, ("pool", 2, 2),
                       (_C, 64, 128, 3, 1, 1), _R, (_C, 128, 128, 3, 1, 1), _R, ("pool", 2, 2),
                       (_C, 128, 256, 3, 1, 1), _R, (_C, 256, 256, 3, 1, 1), _R, (_C, 256, 256, 3, 1, 1), _R, ("pool", 2, 2),
                       (_C, 256, 512, 3, 1, 1), _R, (_C, 512, 512, 3, 1, 1), _R, (_C, 512, 512, 3, 1, 1), _R, ("pool", 2, 2),
                       (_C, 512, 512, 3, 1, 1), _R, (_C, 512, 512, 3, 1, 1), _R, (_C, 512, 512, 3, 1, 1), _R],
            "cuts": (4, 9, 16, 23, 30), "min_side": 16},  # relu1_2 .. relu5_3
}
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # the lpips package's ScalingLayer: inputs in [-1, 1] to ImageNet statistics
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # the lpips package's normalize_tensor: x / (||x||_channels + eps)


def _layer(spec) -> torch.nn.Module:
    if spec == _R:
        return torch.nn.ReLU()
    if spec[0] == "pool":
        return torch.nn.MaxPool2d(spec[1], spec[2])
    _, c_in, c_out, kernel, stride, padding = spec
    return torch.nn.Conv2d(c_in, c_out, kernel, stride, padding)


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 (`lpips.LPIPS(net=...)` in eval mode, spatial=False): the backbone's five ReLU
    outputs, each unit-normalised over channels, squared differences weighted by a non-negative
    1x1 linear layer, averaged over pixels and summed over layers. `features` has torchvision's
    layer indices (its state dict loads as is); `lins[i].weight` are the lpips linear layers.

    `LPIPS(net)` has random weights (torch's default initialisation): `load_lpips` loads the real
    ones; a test can build a tiny one offline."""

    def __init__(self, net: str = LPIPS_NET, id: str | None = None):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"unknown LPIPS net {net!r}; allowed: {list(BACKBONES)} or a torchvision weights file")
        spec = BACKBONES[net]
        self.net, self.id, self.cuts = net, id or f"lpips-v0.1-{net} (random weights)", spec["cuts"]
        self.features = torch.nn.Sequential(*[_layer(s) for s in spec["layers"]])
        channels = [next(m.out_channels for m in reversed(self.features[:cut]) if isinstance(m, torch.nn.Conv2d))
                    for cut in self.cuts]
        self.lins = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five compared outputs of (N, 3, H, W) images in [-1, 1]."""
        out, h, start = [], (x - self.shift) / self.scale, 0
        for cut in self.cuts:
            h = self.features[start:cut](h)
            out.append(h)
            start = cut
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """(N,) distances between (N, 3, H, W) images in [-1, 1]."""
        total = 0
        for lin, f0, f1 in zip(self.lins, self.activations(x0), self.activations(x1)):
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + LPIPS_EPS)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + LPIPS_EPS)
            total = total + lin((f0 - f1) ** 2).mean((2, 3))
        return total[:, 0]


def lpips_linear(net: str = LPIPS_NET) -> dict[str, torch.Tensor]:
    """The lpips v0.1 linear layers of `net` as `LPIPS.lins`' state dict ("0.weight", ...), from the
    copy torchmetrics ships (else the `lpips` package's); `MissingWeights` if neither is installed."""
    for package, folder in (("torchmetrics", "functional/image/lpips_models"), ("lpips", "weights/v0.1")):
        found = importlib.util.find_spec(package)
        if found is not None and found.submodule_search_locations:
            path = Path(list(found.submodule_search_locations)[0]) / folder / f"{net}.pth"
            if path.is_file():
                state = torch.load(path, map_location="cpu", weights_only=True)
                return {f"{k[3]}.weight": v for k, v in state.items() if k.startswith("lin") and k.endswith(".weight")}
    raise MissingWeights(f"LPIPS ({net}) needs the lpips v0.1 linear layers, which torchmetrics ships: not installed "
                         "here; pip install 'torchmetrics>=1.4' (or mabook[metrics])")


def _backbone_state(net: str) -> tuple[dict, str]:
    """torchvision's ImageNet state dict of `net` from torch's hub cache, fetched there if missing (online)."""
    url = BACKBONES[net]["url"]
    name = url.rsplit("/", 1)[1]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True), name
    except Exception as e:  # offline (URLError), a broken download (RuntimeError), an unreadable cache
        raise MissingWeights(f"LPIPS ({net}) needs torchvision's ImageNet {BACKBONES[net]['arch']} weights {name}: not "
                             f"in {cache} and not fetchable ({_reason(e)}); run once online (mabook fetches them "
                             f"there), or pass a copy of that file as the net (lpips_net=PATH, --lpips-net PATH)") from None


def _net_of(state: dict) -> str:
    """Which backbone a torchvision state dict is (by its first convolution), or ValueError."""
    first = state.get("features.0.weight")
    for net, spec in BACKBONES.items():
        _, c_in, c_out, kernel, _, _ = spec["layers"][0]
        if first is not None and tuple(first.shape) == (c_out, c_in, kernel, kernel):
            return net
    raise ValueError(f"not a torchvision AlexNet or VGG16 state dict (features.0.weight {None if first is None else tuple(first.shape)}); "
                     f"allowed: {[BACKBONES[n]['url'].rsplit('/', 1)[1] for n in BACKBONES]}")


def load_lpips(net=LPIPS_NET, device=None) -> LPIPS:
    """LPIPS with its real weights: `net` "alex" or "vgg" (torchvision's ImageNet file from torch's hub
    cache, fetched on first use), a path to such a file, or a loaded `LPIPS` (returned as is). On
    `device` (default the CPU). `MissingWeights` when the weights cannot be loaded."""
    if isinstance(net, LPIPS):
        return net.to(_device(device))
    if isinstance(net, (str, Path)) and str(net) in BACKBONES:
        state, source = _backbone_state(str(net))
        net = str(net)
    elif isinstance(net, (str, Path)) and Path(net).is_file():
        try:
            state = torch.load(net, map_location="cpu", weights_only=True)
            net, source = _net_of(state), str(net)
        except Exception as e:
            raise MissingWeights(f"LPIPS net {str(net)!r} is not a torchvision AlexNet or VGG16 weights file "
                                 f"({_reason(e)}); allowed: 'alex', 'vgg' or such a file") from None
    else:
        raise ValueError(f"unknown LPIPS net {net!r}; allowed: {list(BACKBONES)}, a torchvision weights file "
                         "(alexnet-owt-7be5be79.pth, vgg16-397923af.pth) or a loaded mabook.metrics.LPIPS")
    model = LPIPS(net, id=f"lpips-v0.1-{net} ({source})")
    model.features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    model.lins.load_state_dict(lpips_linear(net))
    return model.to(_device(device))


def lpips(a, b, net=LPIPS_NET, device=None) -> np.ndarray:
    """Per-image LPIPS between two (N, H, W, 3) image arrays of one shape (floats in [0, 1] or
    uint8), scored as saved (uint8 / 127.5 - 1, as the papers' code reads PNGs), at full resolution.
    `net`: anything `load_lpips` takes. On `device` (default the CPU), one pair at a time."""
    x, y = _uint8(a, "lpips"), _uint8(b, "lpips")
    if x.shape != y.shape:
        raise ValueError(f"lpips needs two image arrays of one shape, got {x.shape} and {y.shape}")
    model, device = load_lpips(net, device), _device(device)
    side = BACKBONES[model.net]["min_side"]
    if min(x.shape[1:3]) < side:
        raise ValueError(f"LPIPS ({model.net}) needs images of at least {side}x{side} pixels (its backbone's pooling), got "
                         f"{x.shape[1]}x{x.shape[2]}")
    out = np.empty(len(x), np.float64)
    for n in range(len(x)):
        pair = [torch.as_tensor(img[n], device=device).permute(2, 0, 1)[None].float() / 127.5 - 1 for img in (x, y)]
        with torch.no_grad():
            out[n] = float(model(*pair)[0])
    return out


def metric_names(values) -> list[str]:
    """`--metrics` values (names, or comma-separated lists of them; "clip_t" as "clip-t") as names of
    METRICS, in order and once each; ValueError naming an unknown one."""
    if isinstance(values, str):
        values = [values]
    names = []
    for value in values:
        for name in str(value).split(","):
            name = name.strip().lower().replace("_", "-")
            if name and name not in METRICS:
                raise ValueError(f"unknown metric {name!r}; allowed: {list(METRICS)} (mse, mae and ssim are always "
                                 "in the table; lpips and clip-t add columns on real models)")
            if name and name not in names:
                names.append(name)
    return names
