"""Real shapes, random weights: what probing costs at FLUX.1-dev and SD3.5 widths, and the GPU plan made from it.

`python -m mabook.bench realshape` builds FLUX.1-dev's transformer with 1 double + 1 single block and
SD3.5-medium's with 2 blocks (block 0 with MMDiT-X dual attention, block 1 the last, text-free one) at
their published widths with random weights, and times one forward pass at 512² (on CUDA also 1024²)
token counts in five modes (`MODES`): bare; `probe.collect` (every tap); `attention.capture` (every
layer); `attention.intervene` (each head's top-1 sink, score path, eta = 0); and a record of 16 named
channels at every image tap (`transport.record`'s hook, without a pipeline). Each round runs every
mode once, the order reversed every other round, so the ratios come from one run: of wall time and
of process CPU time (the plan takes the larger on a CPU, where other processes' load bends each).

`plan()` turns the measurements, the parameter counts (every component built on the meta device
from its published config: no weights) and the FLOPs counted from the shapes (`block_flops`) into
the tables of book/real_model.md: which GPU holds which model how, and minutes per chapter, with
every assumption (`GPUS`, `ASSUMPTIONS`) printed beside them.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` during the call minus the allocation before
it; on CPU, the rise of the process's resident-set high-water mark (VmHWM, reset before the call via
/proc/self/clear_refs, after `malloc_trim`) over its resident set before the call. Either way: what
the call added at its worst moment, over the weights and inputs.

What this is not: a measurement of real weights' statistics, nor of a GPU when the JSON says CPU.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import diffusers
import torch
import transformers

from mabook import attention, files, inversion, probe
from mabook.models import FAMILIES, adapter_for

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "bench" / "realshape.json"  # a benchmark: not among the big runs
BOOK_PAGE = ROOT / "book" / "real_model.md"
MODES = ("bare", "probe", "capture", "intervene", "record")
RECORD_CHANNELS = 16  # chapter 4's top-k

# ---------------------------------------------------------------------------------------------
# 1. The models as published (each hub id's transformer/config.json), their FLOPs and parameters
# ---------------------------------------------------------------------------------------------

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = {**SD35_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "pos_embed_max_size": 192,
              "dual_attention_layers": ()}
PIXART_SIGMA = dict(sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                    caption_channels=4096, cross_attention_dim=1152, interpolation_scale=2, use_additional_conditions=False)
SANA_1600M = dict(in_channels=32, num_layers=20, num_attention_heads=70, attention_head_dim=32, num_cross_attention_heads=20,
                  cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=32,
                  patch_size=1)
_KL = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2)
_DC = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
COMPONENTS = {  # text encoders and VAEs: (library, class, config class or None, published config)
    "T5-XXL encoder": ("transformers", "T5EncoderModel", "T5Config", dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                                                          vocab_size=32128, feed_forward_proj="gated-gelu")),
    "CLIP-L": ("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, vocab_size=49408,
        max_position_embeddings=77)),
    "CLIP-G": ("transformers", "CLIPTextModelWithProjection", "CLIPTextConfig", dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, vocab_size=49408,
        max_position_embeddings=77)),
    "Gemma-2 2B": ("transformers", "Gemma2Model", "Gemma2Config", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                                                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                                                       vocab_size=256000)),
    "VAE KL-16": ("diffusers", "AutoencoderKL", None, {**_KL, "latent_channels": 16}),
    "VAE KL-4 (SDXL)": ("diffusers", "AutoencoderKL", None, {**_KL, "latent_channels": 4}),
    "DC-AE f32c32": ("diffusers", "AutoencoderDC", None, dict(encoder_block_types=_DC, decoder_block_types=_DC)),
}
_VAES = ("VAE", "DC-AE")  # components never quantized


@dataclass(frozen=True)
class Model:
    """A real DiT: its transformer config, other components (`COMPONENTS`), text tokens (the pipeline's
    default max_sequence_length), samples per image and step (2 with CFG), pixels per token side."""

    name: str
    hub_id: str
    family: str  # mabook.models.FAMILIES
    config: dict
    components: tuple[str, ...]
    text_tokens: int
    guidance: int
    pixels_per_token: int

    def image_tokens(self, resolution: int) -> int:
        return (resolution // self.pixels_per_token) ** 2


_FLUX_PARTS, _SD3_PARTS = ("T5-XXL encoder", "CLIP-L", "VAE KL-16"), ("CLIP-L", "CLIP-G", "T5-XXL encoder", "VAE KL-16")
MODELS = (
    Model("FLUX.1-dev", "black-forest-labs/FLUX.1-dev", "flux", FLUX_DEV, _FLUX_PARTS, 512, 1, 16),
    Model("FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", "flux", {**FLUX_DEV, "guidance_embeds": False}, _FLUX_PARTS, 512, 1, 16),
    Model("SD3.5 medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", SD35_MEDIUM, _SD3_PARTS, 77 + 256, 2, 16),
    Model("SD3.5 large", "stabilityai/stable-diffusion-3.5-large", "sd3", SD35_LARGE, _SD3_PARTS, 77 + 256, 2, 16),
    Model("PixArt-Σ", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "pixart", PIXART_SIGMA, ("T5-XXL encoder", "VAE KL-4 (SDXL)"), 300, 2, 16),
    Model("SANA 1.6B", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", "sana", SANA_1600M, ("Gemma-2 2B", "DC-AE f32c32"), 300, 2, 32),
)
BY_NAME = {m.name: m for m in MODELS}


def block_flops(model: Model, image_tokens: int, text_tokens: int | None = None) -> list[int]:
    """Matmul FLOPs (2 per multiply-add: linear layers, 1x1 and depthwise convolutions, q k^T and
    probabilities x v) of each transformer block for one sample, in forward order. Elementwise work
    (norms, activations, softmax, RoPE) and the layers outside the blocks (<0.5% here) are left out."""
    c, T = model.config, model.text_tokens if text_tokens is None else text_tokens
    D, I = c["num_attention_heads"] * c["attention_head_dim"], image_tokens
    N = I + T
    if model.family == "flux":  # double: AdaLN 2 x 6D, per stream q k v out + MLP(4D); single: AdaLN 3D, qkv + MLP in, out from 5D
        macs = [12 * D * D + 12 * N * D * D + 2 * N * N * D] * c["num_layers"]
        macs += [3 * D * D + 12 * N * D * D + 2 * N * N * D] * c["num_single_layers"]
    elif model.family == "sd3":  # the last block: AdaLN-continuous 2D, text q k v only; dual attention: AdaLN 9D + image self-attention
        macs = []
        for i in range(c["num_layers"]):
            last, dual = i == c["num_layers"] - 1, i in c.get("dual_attention_layers", ())
            m = (9 if dual else 6) * D * D + (2 if last else 6) * D * D + 12 * I * D * D + (3 if last else 12) * T * D * D + 2 * N * N * D
            macs.append(m + (4 * I * D * D + 2 * I * I * D if dual else 0))
    elif model.family == "pixart":  # self-attention, cross-attention to the text, MLP(4D); AdaLN-single has no per-block linear
        macs = [14 * I * D * D + 2 * T * D * D + 2 * I * I * D + 2 * I * T * D] * c["num_layers"]
    elif model.family == "sana":  # linear attention (values padded with a row of ones), cross-attention, GLUMBConv(mlp_ratio)
        d, h = c["attention_head_dim"], int(c["mlp_ratio"] * D)
        macs = [6 * I * D * D + 2 * T * D * D + 2 * I * D * (d + 1) + 2 * I * T * D + 3 * I * D * h + 18 * I * h] * c["num_layers"]
    else:
        raise ValueError(f"unknown family {model.family!r}; allowed: flux, sd3, pixart, sana")
    return [2 * m for m in macs]


def step_flops(model: Model, resolution: int) -> int:
    """FLOPs of one denoising step of one image: every block, times the guidance batch."""
    return model.guidance * sum(block_flops(model, model.image_tokens(resolution)))


def parameter_counts() -> dict[str, dict]:
    """{component: {"parameters": parameters + buffers, "source"}}: each transformer of `MODELS` and each
    of `COMPONENTS` built on the meta device from its config (no memory, no weights)."""
    count = lambda module: sum(t.numel() for t in [*module.parameters(), *module.buffers()])
    out = {}
    with torch.device("meta"):
        for m in MODELS:
            cls = FAMILIES[m.family].transformer_class
            out[f"{m.name} transformer"] = {"parameters": count(getattr(diffusers, cls)(**m.config)),
                                            "source": f"{cls}(**config), config from {m.hub_id} transformer/config.json"}
        for name, (library, cls, config_cls, config) in COMPONENTS.items():
            lib = transformers if library == "transformers" else diffusers
            module = getattr(lib, cls)(getattr(lib, config_cls)(**config)) if config_cls else getattr(lib, cls)(**config)
            out[name] = {"parameters": count(module), "source": f"{library}.{cls}, published config"}
    return out


# ---------------------------------------------------------------------------------------------
# 2. The bench: a few real-width blocks, five modes, interleaved
# ---------------------------------------------------------------------------------------------

# what the bench builds: the published widths, 1-2 blocks (SD3.5's positional table cropped to SD3's
# default 96 patches a side: 1024² uses 64, and 384 is a 1.7 GB table to build); --quick: tiny widths
BENCH = {"flux": ("FLUX.1-dev", dict(num_layers=1, num_single_layers=1)),
         "sd3.5-medium": ("SD3.5 medium", dict(num_layers=2, dual_attention_layers=(0,), pos_embed_max_size=96))}
TINY = {"flux": dict(in_channels=16, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                     axes_dims_rope=(4, 6, 6)),
        "sd3.5-medium": dict(sample_size=8, in_channels=4, out_channels=4, attention_head_dim=16, num_attention_heads=2,
                             joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)}


def _inputs(model: Model, config: dict, image_tokens: int, device, dtype) -> dict:
    """Random inputs of one sample, as the pipeline hands them to the transformer."""
    side, T, g = math.isqrt(image_tokens), model.text_tokens, torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    kwargs = dict(encoder_hidden_states=rand(1, T, config["joint_attention_dim"]),
                  pooled_projections=rand(1, config["pooled_projection_dim"]))
    if model.family == "flux":
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
        kwargs |= dict(hidden_states=rand(1, image_tokens, config["in_channels"]), timestep=torch.tensor([0.5], device=device),
                       img_ids=img_ids, txt_ids=torch.zeros(T, 3, device=device))
        return kwargs | ({"guidance": torch.tensor([3.5], device=device)} if config["guidance_embeds"] else {})
    p = config["patch_size"]
    return kwargs | dict(hidden_states=rand(1, config["in_channels"], side * p, side * p), timestep=torch.tensor([500.0], device=device))


def _mode(mode: str, adapter):
    """The context manager a mode runs under."""
    if mode in ("bare", "probe", "capture", "intervene"):
        return {"bare": contextlib.nullcontext, "probe": probe.collect, "capture": attention.capture,
                "intervene": lambda a: attention.intervene(a, attention.KeyIntervention("sink", k=1))}[mode](adapter)
    index, kept = torch.arange(min(RECORD_CHANNELS, adapter.width)), []
    hooks = probe.hooks(adapter, lambda tap, step, h: kept.append(h[..., index.to(h.device)].detach().cpu().clone()),
                        taps=probe.taps(adapter, ["img"]), cfg="both")  # transport.record's copy: chosen channels to the host
    hooks.kept = kept
    return hooks


def memory_mark(device: str, start: int | None = None) -> int | None:
    """Before a call (start None): reset the peak and return the baseline; after it: the peak added
    in bytes. None where the OS gives no resettable peak (CPU without Linux's /proc/self/clear_refs)."""
    if device != "cpu":
        torch.cuda.synchronize()
        if start is None:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return torch.cuda.max_memory_allocated() - start

    def vm(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    try:
        if start is not None:
            return vm("VmHWM") - start
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reusing it shows as a rise
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := the current resident set
        return vm("VmRSS")
    except (OSError, StopIteration):
        return None


def measure(key: str, resolution: int, device: str = "cpu", dtype=None, repeats: int = 2, warmup: int = 0,
            quick: bool = False) -> dict:
    """One `BENCH` model at one resolution: every mode `warmup` + `repeats` times, in rounds (A B C D E,
    E D C B A, ...); per-block seconds (median forward / blocks), ratios to bare, peak added, checks."""
    name, blocks = BENCH[key]
    config = {**BY_NAME[name].config, **blocks, **(TINY[key] if quick else {})}
    model = replace(BY_NAME[name], config=config, text_tokens=8 if quick else BY_NAME[name].text_tokens)
    torch.manual_seed(0)
    transformer = getattr(diffusers, FAMILIES[model.family].transformer_class)(**config).eval()
    torch.nn.Module.to(transformer, device, dtype or torch.float32)  # (diffusers' .to warns of float32 modules: there are none)
    adapter, image_tokens = adapter_for(transformer), model.image_tokens(resolution)
    kwargs = _inputs(model, config, image_tokens, device, dtype or torch.float32)
    times, cpu, peaks, last = {m: [] for m in MODES}, {m: [] for m in MODES}, {m: None for m in MODES}, {}
    for r in range(warmup + repeats):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            start, clock, cpu_clock = memory_mark(device), time.perf_counter(), time.process_time()
            with torch.no_grad(), _mode(mode, adapter) as ctx:
                out = transformer(**kwargs, return_dict=False)[0]
            if device != "cpu":
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - clock, time.process_time() - cpu_clock
            added = None if start is None else memory_mark(device, start)
            if r >= warmup:
                times[mode].append(seconds)
                cpu[mode].append(cpu_seconds)
                peaks[mode] = None if added is None else max(added, peaks[mode] or 0)
            last[mode] = (out.float(), ctx)
    n, cap, outs = len(adapter.blocks), last["capture"][1], {m: o for m, (o, _) in last.items()}
    wall = {m: statistics.median(times[m]) / statistics.median(times["bare"]) for m in MODES}
    on_cpu = {m: statistics.median(cpu[m]) / statistics.median(cpu["bare"]) for m in MODES}
    return {"model": name, "bench": key, "blocks": n, "resolution": resolution, "image_tokens": image_tokens,
            "text_tokens": model.text_tokens, "width": adapter.width, "flops_per_forward": sum(block_flops(model, image_tokens)),
            "block_lists": {k: config[k] for k in ("num_layers", "num_single_layers", "dual_attention_layers") if k in blocks},
            "modes": {m: {"seconds": [round(t, 4) for t in times[m]], "cpu_seconds": [round(t, 4) for t in cpu[m]],
                          "per_block_s": statistics.median(times[m]) / n, "wall_ratio": wall[m], "cpu_ratio": on_cpu[m],
                          "peak_bytes": peaks[m]} for m in MODES},
            "checks": {"outputs_finite": all(bool(o.isfinite().all()) for o in outs.values()),
                       **{f"{m}_unchanged": torch.equal(outs[m], outs["bare"]) for m in ("probe", "capture", "record")},
                       "intervention_changed_output": not torch.equal(outs["intervene"], outs["bare"]),
                       "mass_sum_max_error": max(float((cap.mass(*ls).sum(-1) - 1).abs().max()) for ls in cap.captured),
                       "recorded_tensors": len(last["record"][1].kept)}}


def _processor() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run(device: str = "cpu", resolutions=None, repeats: int | None = None, models=tuple(BENCH), quick: bool = False,
        out: Path | str = RESULTS) -> dict:
    """Measure every (model, resolution), print a table for each, write the JSON to `out`."""
    cpu = device == "cpu"
    resolutions = list(resolutions or ((64, 128) if quick else (512,) if cpu else (512, 1024)))
    repeats = (1 if quick else 2 if cpu else 5) if repeats is None else repeats
    for key in models:
        if key not in BENCH:
            raise ValueError(f"unknown bench model {key!r}; allowed: {list(BENCH)}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if any(not isinstance(r, int) or r < 16 or r % 16 for r in resolutions):
        raise ValueError(f"--resolutions must be pixel sizes that are multiples of 16 (e.g. 512 1024), got {resolutions}")
    dtype, began, load, rows = torch.float32 if cpu else torch.bfloat16, time.perf_counter(), os.getloadavg()[0], []
    for key in models:
        for resolution in resolutions:
            rows.append(row := measure(key, resolution, device, dtype, repeats, 0 if cpu else 1, quick))
            print(f"{row['model']} widths{' (tiny: --quick)' if quick else ''}, {row['block_lists']}, {resolution}² px "
                  f"({row['image_tokens']} image + {row['text_tokens']} text tokens), {str(dtype)[6:]}, {device}: "
                  f"{row['flops_per_forward'] / 1e12:.3f} TFLOP per forward")
            print(f"  {'mode':10s} {'per block':>10s} {'x bare':>7s} {'CPU time x':>11s} {'peak added':>11s}")
            for m, v in row["modes"].items():
                peak = "n/a" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**20:.1f} MiB"
                print(f"  {m:10s} {v['per_block_s']:9.3f}s {v['wall_ratio']:7.3f} {v['cpu_ratio']:11.3f} {peak:>11s}")
            print(f"  checks: {row['checks']}  ({time.perf_counter() - began:.0f} s so far)")
    machine = {"platform": platform.platform(), "processor": _processor(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "load_average": {"start": load, "end": os.getloadavg()[0]}, "device": device,
               "gpu": None if cpu else torch.cuda.get_device_name(device)}
    payload = {"what": "per-block time and peak memory of one forward pass at real widths, random weights (mabook.realshape)",
               "peak_memory": ("what the call added at its worst moment, over weights and inputs: on CUDA max_memory_allocated minus "
                               "the allocation before the call; on CPU the resident-set high-water mark (VmHWM, reset before the "
                               "call) minus the resident set before it"),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
               "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
               "settings": {"device": device, "dtype": str(dtype), "repeats": repeats, "warmup": 0 if cpu else 1, "quick": quick,
                            "resolutions": resolutions, "record_channels": RECORD_CHANNELS,
                            "ratio": "each mode's median over bare's, of wall time and of process CPU time; the plan uses the larger "
                                     "on a CPU (other processes' load bends each one way), wall time on CUDA"},
               "seconds": round(time.perf_counter() - began, 1), "runs": rows, "parameters": parameter_counts()}
    files.write_json(out, payload)
    print(f"wrote {out} ({payload['seconds']:.0f} s)")
    return payload


# ---------------------------------------------------------------------------------------------
# 3. The plan: which GPU holds which model how, and minutes per chapter
# ---------------------------------------------------------------------------------------------

GIB = 2**30
# name, memory in MiB as nvidia-smi reports it, dense bfloat16 TFLOPS from the vendor's datasheet (no sparsity;
# the T4 has no bfloat16 tensor cores: its float32 rate; the H100 is the SXM part)
GPUS = (("T4 16 GB", 15360, 8.1), ("L4 24 GB", 23034, 121.0), ("A100 40 GB", 40960, 312.0), ("A100 80 GB", 81920, 312.0),
        ("H100 80 GB", 81559, 989.0))
ASSUMPTIONS = {
    "achieved_fraction": 0.4,  # of the datasheet TFLOPS, reached by a transformer forward at batch 1
    "reserved_gib": 1.0,  # CUDA context and allocator slack, off every GPU's memory
    "host_to_device_gb_per_s": 10.0,  # enable_model_cpu_offload copies every component in once per pipeline call
    "bytes_per_parameter": {"bf16": 2.0, "8-bit": 1.0, "4-bit": 0.5625},  # NF4: 4 bits + a 32-bit scale per 64 weights
    "quantized_slowdown": 1.5,  # 8-/4-bit weights are dequantised on the fly: time x this
    "batch_size": 16,  # images per pipeline call (disruption.run's and sinks.run's default): counts the offload copies
}
FITS = ("bf16", "bf16 + offload", "8-bit + offload", "4-bit + offload", "does not fit")
CHAPTERS = ("01_channel_discovery", "02_disruption", "03_spatial_organization", "04_text_transport", "05_image_transport",
            "06_attention_sinks")


def fit(components: dict[str, int], memory_bytes: float, activation_bytes: float = 0.0) -> str:
    """How a pipeline of `components` ({name: parameters}) runs on a GPU of `memory_bytes` (`FITS`): all
    resident in bfloat16; one component at a time (`enable_model_cpu_offload`); so, with the transformer
    and text encoders in 8-bit or 4-bit (VAEs stay bfloat16); or not at all. The GPU also holds
    `activation_bytes` and `ASSUMPTIONS["reserved_gib"]`."""
    usable, b = memory_bytes - ASSUMPTIONS["reserved_gib"] * GIB - activation_bytes, ASSUMPTIONS["bytes_per_parameter"]
    if b["bf16"] * sum(components.values()) <= usable:
        return FITS[0]
    for verdict, kind in zip(FITS[1:4], ("bf16", "8-bit", "4-bit")):
        if max(b["bf16" if name.startswith(_VAES) else kind] * n for name, n in components.items()) <= usable:
            return verdict
    return FITS[4]


def weight_bytes(components: dict[str, int], verdict: str) -> float:
    """Bytes of all the components at the precision `verdict` runs them in."""
    b, kind = ASSUMPTIONS["bytes_per_parameter"], verdict.split(" ")[0] if "bit" in verdict else "bf16"
    return sum(b["bf16" if name.startswith(_VAES) else kind] * n for name, n in components.items())


def pipeline(model: Model, counts: dict) -> dict[str, int]:
    """{component: parameters} of a model's pipeline, from `parameter_counts()`."""
    return {"transformer": counts[f"{model.name} transformer"]["parameters"], **{c: counts[c]["parameters"] for c in model.components}}


def chapter_parameters(chapter: str, full: bool, notebooks: Path = ROOT / "notebooks") -> dict:
    """A chapter's parameters cell evaluated with FULL = `full` (the names that evaluate from literals
    and each other), plus `real_prompts` (the length of the literal prompt list of its real-model
    branch, cut to N_PROMPTS as the notebook cuts it) and `resolution` (its real-model PIPE_KWARGS, the
    default it gives `env.pipe_kwargs`)."""
    nb = json.loads((notebooks / f"{chapter}.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    values = {"FULL": full}
    for node in ast.parse(next(c for c in cells if "NUM_INFERENCE_STEPS =" in c)).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(Exception):  # env.device, os.environ...: not workload numbers
                code = compile(ast.Expression(node.value), chapter, "eval")
                values[node.targets[0].id] = eval(code, {"__builtins__": {"len": len}}, values)
    for node in ast.walk(ast.parse(next(c for c in cells if "mabook.load(MODEL" in c))):
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        value, limit = node.value, None
        if isinstance(value, ast.Subscript) and isinstance(value.slice, ast.Slice) and isinstance(value.slice.upper, ast.Name):
            value, limit = value.value, values[value.slice.upper.id]
        if node.targets[0].id.endswith("prompts") and isinstance(value, ast.ListComp) and isinstance(value.generators[0].iter, ast.Tuple):
            values["real_prompts"] = min(len(value.generators[0].iter.elts), limit or math.inf)
        if node.targets[0].id == "PIPE_KWARGS" and isinstance(value, ast.Call) and value.args:  # env.pipe_kwargs({...})
            value = value.args[0]
        if node.targets[0].id == "PIPE_KWARGS" and isinstance(value, ast.Dict) and value.keys:
            values["resolution"] = ast.literal_eval(value)["height"]
    return values


def workload(chapter: str, v: dict) -> list[tuple[str, int, int]]:
    """(mode, generations, pipeline calls) of a chapter's real-model path for its parameters `v`
    (`chapter_parameters`), counted from the notebook's cells (not its interactive widgets). Modes:
    `MODES`, "edit" (probe.edit at image taps: timed as a record) and "intervene-1-layer"."""
    P, calls = v["real_prompts"], lambda gens: math.ceil(gens / ASSUMPTIONS["batch_size"])
    U, n = P * len(v.get("SEEDS", (0,))), v.get("N_RANDOM", 0)
    if chapter == "01_channel_discovery":  # one collect per prompt, then every prompt once per further seed
        return [("probe", U, P + len(v["SEEDS"]) - 1)]
    if chapter == "02_disruption":  # baseline; zero: top, 2 bottoms, N random, N energy per k; 3 ops x (top + N random); 9 windows x 2
        conds = len(v["KS"]) * (3 + 2 * n) + 3 * (1 + n) + 18
        return [("probe", U, calls(U)), ("edit", U * conds, conds * calls(U)), ("edit", 1, 1)]
    if chapter == "03_spatial_organization":  # one capture of the hidden states at 3 taps x 3 steps
        return [("record", U, calls(U))]
    if chapter == "04_text_transport":  # discovery; one source record; per strip alpha, the target and the edited target
        return [("probe", P, 1), ("record", 1, 1), ("edit", 2 * len(v["STRIP_ALPHAS"]), 2 * len(v["STRIP_ALPHAS"]))]
    if chapter == "05_image_transport":  # reference; discovery; inversion: at most 1 + fixed_point_iterations calls a step;
        it = inspect.signature(inversion.invert).parameters["fixed_point_iterations"].default  # record; alphas 0, .5, 1 x 2
        return [("bare", 1, 1), ("probe", P, 1), ("bare", 1 + it, 1), ("record", 1, 1), ("edit", 6, 6)]
    if chapter == "06_attention_sinks":  # baseline captured; per window (one layer, all) and k: sink, bottom, N random;
        per = len(v["KS"]) * (2 + n)  # then per eta > 0 sink and random, and 2 value paths x (sink, bottom, N random)
        every = per + 2 * sum(e != 0 for e in v["ETAS"]) + 2 * (2 + n)
        return [("capture", U, calls(U)), ("intervene", U * every, every * calls(U)), ("intervene-1-layer", U * per, per * calls(U))]
    raise ValueError(f"unknown chapter {chapter!r}; allowed: {list(CHAPTERS)}")


def _bench_run(results: dict, model: Model, resolution: int | None = None) -> dict:
    """The measured run standing in for `model`: its family's bench model (SD3.5 medium's for PixArt
    and SANA), at `resolution` if measured there, else at the largest resolution measured."""
    name = "FLUX.1-dev" if model.family == "flux" else "SD3.5 medium"
    runs = sorted((r for r in results["runs"] if r["model"] == name), key=lambda r: r["resolution"])
    if not runs:
        raise ValueError(f"the measurements hold no run of {name!r}; run the bench with --models flux sd3.5-medium")
    return next((r for r in runs if r["resolution"] == resolution), runs[-1])


def ratios(results: dict, model: Model, resolution: int) -> dict[str, float | None]:
    """Time of each mode over a bare forward, measured at `resolution`: wall time, or on a CPU the larger of
    wall and CPU time; below 1 (a mode does bare's work and more) is noise, taken as 1. None: SANA has
    no softmax attention."""
    cpu = results["settings"]["device"] == "cpu"
    r = {m: max(1.0, v["wall_ratio"], v["cpu_ratio"] if cpu else 0) for m, v in _bench_run(results, model, resolution)["modes"].items()}
    c = model.config
    layers = {"flux": c.get("num_layers", 0) + c.get("num_single_layers", 0),
              "sd3": c["num_layers"] + len(c.get("dual_attention_layers", ()))}.get(model.family, c["num_layers"])
    r["edit"], r["intervene-1-layer"] = r["record"], 1 + (r["intervene"] - 1) / layers
    if model.family == "sana":
        r["capture"] = r["intervene"] = r["intervene-1-layer"] = None
    return r


def activation_bytes(results: dict, model: Model, resolution: int = 1024) -> float:
    """Peak a forward adds in its heaviest mode: the stand-in run's, in bfloat16 and scaled to this
    model's (image + text tokens) x width x guidance batch."""
    run, c = _bench_run(results, model), model.config
    per_value = 2 / (4 if "float32" in results["settings"]["dtype"] else 2)
    size = (model.image_tokens(resolution) + model.text_tokens) * c["num_attention_heads"] * c["attention_head_dim"] * model.guidance
    measured = (run["image_tokens"] + run["text_tokens"]) * run["width"]
    return max(m["peak_bytes"] or 0 for m in run["modes"].values()) * per_value * size / measured


def chapter_minutes(model: Model, gpu: tuple, verdict: str, items, rates: dict, resolution: int, steps: int,
                    copy_bytes: float) -> float | None:
    """Minutes of a chapter: FLOPs of every step of every generation x its mode's ratio, at the assumed
    achieved rate (x the quantized slowdown), plus the offload copies, one per pipeline call."""
    if verdict == FITS[-1] or any(rates[mode] is None for mode, _, _ in items):
        return None
    flops = sum(gens * steps * step_flops(model, resolution) * rates[mode] for mode, gens, _ in items)
    compute = flops / (gpu[2] * 1e12 * ASSUMPTIONS["achieved_fraction"]) * (ASSUMPTIONS["quantized_slowdown"] if "bit" in verdict else 1)
    copies = sum(c for _, _, c in items) * copy_bytes / (ASSUMPTIONS["host_to_device_gb_per_s"] * 1e9) if "offload" in verdict else 0
    return (compute + copies) / 60


BEGIN, END = "<!-- realshape:begin -->", "<!-- realshape:end -->"


def _n(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def _min(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 0.05 else "<0.1"


def plan(results: dict, notebooks: Path = ROOT / "notebooks") -> str:
    """The generated section of book/real_model.md (Markdown from `BEGIN` to `END`): the measurements,
    the parameters, which GPU holds which model how, minutes per chapter, and the assumptions' values.
    (What the columns mean is in the page's text around it.)"""
    counts, s, mach = results["parameters"], results["settings"], results["machine"]
    out = [BEGIN, "", "*Generated from `mabook/results/bench/realshape.json` by `mabook.realshape.plan`: do not edit by hand.*", "",
           "#### Measured: real widths, random weights", "",
           f"{mach['gpu'] or mach['processor']} ({mach['device']}, {s['dtype'][6:]}; {mach['cpu_count']} CPU cores, "
           f"{mach['torch_threads']} torch threads, 1-min load average {mach['load_average']['start']:.1f} at the start and "
           f"{mach['load_average']['end']:.1f} at the end), torch {results['versions']['torch']}, "
           f"diffusers {results['versions']['diffusers']}, {results['date'][:10]}: {s['repeats']} round(s) after {s['warmup']} "
           f"warm-up; {results['seconds']:.0f} s in all.", "",
           "Ratios to bare: wall time (process CPU time); the plan uses "
           + ("the larger of the two, at least 1." if s["device"] == "cpu" else "wall time, at least 1."), "",
           "| widths (blocks) | resolution (image + text tokens) | bare, per block | probe | capture | intervene | record "
           "| peak added, MiB: bare / probe / capture / intervene / record |", "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        m, peaks = r["modes"], (r["modes"][k]["peak_bytes"] for k in MODES)
        out.append(f"| {r['model']} ({', '.join(f'{k} {v}' for k, v in r['block_lists'].items())}) | {r['resolution']}² "
                   f"({r['image_tokens']} + {r['text_tokens']}) | {m['bare']['per_block_s']:.2f} s | "
                   + " | ".join(f"×{m[k]['wall_ratio']:.2f} ({m[k]['cpu_ratio']:.2f})" for k in MODES[1:]) + " | "
                   + " / ".join("n/a" if p is None else f"{p / 2**20:.0f}" for p in peaks) + " |")
    checks = [r["checks"] for r in results["runs"]]
    ok = all(c["outputs_finite"] and c["probe_unchanged"] and c["capture_unchanged"] and c["record_unchanged"]
             and c["intervention_changed_output"] for c in checks)
    out += ["", f"Checks, every run: {'passed' if ok else 'FAILED (see the JSON)'} (largest error of a head's mass sum: "
            f"{max(c['mass_sum_max_error'] for c in checks):.1e}).", "", "#### Parameters", "",
            "| model | transformer | text encoders | VAE | all, bf16 | largest component, bf16 | offload copy |", "|---" * 7 + "|"]
    for model in MODELS:
        parts = pipeline(model, counts)
        text = ", ".join(f"{c} {_n(parts[c])}" for c in model.components if not c.startswith(_VAES))
        vae = next(f"{c} {_n(parts[c])}" for c in model.components if c.startswith(_VAES))
        copy = weight_bytes(parts, FITS[1]) / 1e9 / ASSUMPTIONS["host_to_device_gb_per_s"]
        out.append(f"| {model.name} | {_n(parts['transformer'])} | {text} | {vae} | {2 * sum(parts.values()) / GIB:.1f} GiB | "
                   f"{2 * max(parts.values()) / GIB:.1f} GiB | {copy:.1f} s |")
    out += ["", "#### Which GPU holds which model (batch 1, 1024²)", "", "| model | " + " | ".join(g[0] for g in GPUS) + " |",
            "|---|" + "---|" * len(GPUS)]
    verdicts = {m.name: {g[0]: fit(pipeline(m, counts), g[1] * 2**20, activation_bytes(results, m)) for g in GPUS} for m in MODELS}
    out += [f"| {name} | " + " | ".join(v.values()) + " |" for name, v in verdicts.items()]
    settings = {full: {c: chapter_parameters(c, full, notebooks) for c in CHAPTERS} for full in (False, True)}
    out += ["", "#### Minutes per chapter (FULL=0; last column: all six chapters with FULL=1)", "",
            "| model | GPU | runs as | " + " | ".join(c[:2] for c in CHAPTERS) + " | all, FULL=1 |", "|---|---|---|" + "---|" * 7]
    for model in MODELS:
        parts = pipeline(model, counts)
        for g in GPUS:
            verdict = verdicts[model.name][g[0]]
            minutes = {full: [chapter_minutes(model, g, verdict, workload(c, v), ratios(results, model, v["resolution"]), v["resolution"],
                                              v["NUM_INFERENCE_STEPS"], weight_bytes(parts, verdict)) for c, v in settings[full].items()]
                       for full in (False, True)}
            total = None if verdict == FITS[-1] else sum(x for x in minutes[True] if x is not None)
            out.append(f"| {model.name} | {g[0]} | {verdict} | " + " | ".join(map(_min, minutes[False])) + f" | {_min(total)} |")
    out += ["", "#### Workloads, read from the notebooks (generations by mode)", "",
            "| chapter | resolution | steps, FULL=0 / 1 | generations, FULL=0 | FULL=1 |", "|---|---|---|---|---|"]
    for c in CHAPTERS:
        v0, v1 = settings[False][c], settings[True][c]
        show = lambda v: ", ".join(f"{g} {m}" for m, g, _ in workload(c, v))
        out.append(f"| {c} | {v0['resolution']}² | {v0['NUM_INFERENCE_STEPS']} / {v1['NUM_INFERENCE_STEPS']} | {show(v0)} | {show(v1)} |")
    out += ["", "GPUs (memory in MiB, dense bfloat16 TFLOPS): " + "; ".join(f"{g[0]}: {g[1]}, {g[2]:g}" for g in GPUS)
            + ". Assumptions: " + ", ".join(f"{k} = {v}" for k, v in ASSUMPTIONS.items()) + ".", "", END]
    return "\n".join(out)


def write_plan(results_path: Path | str = RESULTS, page: Path | str = BOOK_PAGE) -> Path:
    """Replace the generated section of `page` (between `BEGIN` and `END`; appended if absent) by `plan`."""
    results, page = json.loads(Path(results_path).read_text()), Path(page)
    text, section = page.read_text(), plan(results)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    page.write_text(text)
    return page


def main(args) -> int:
    """`python -m mabook.bench realshape` (its arguments are declared in mabook/bench.py)."""
    if "torch" not in sys.modules:  # before OpenMP starts: idle threads sleep rather than spin, so CPU time is the work's
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if getattr(args, "threads", None) is not None:  # e.g. 1 where other processes load the cores

        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.plan_only:
        run(args.device, args.resolutions, args.repeats, tuple(args.models), args.quick, args.out)
    if args.plan_only or args.md:
        print(f"wrote {write_plan(args.out, args.md or BOOK_PAGE)}")
    return 0
