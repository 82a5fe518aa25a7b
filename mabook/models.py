"""One loader, many DiTs: `load()` gives a pipeline and an `Adapter` that knows its architecture.

The adapter is the only place in mabook that knows how a family lays out its transformer: the
ordered list of blocks, which element of a block's output is the image stream (`hidden_states`)
and which the text stream (`encoder_hidden_states`), the image token grid of a generation, the
attention modules, and the module that builds the AdaLN conditioning (`Family.conditioning`).
Everything else (`mabook.probe`, `mabook.discovery`, the chapters) talks to the adapter, so
supporting a new DiT means adding one `Family` entry below.

Block outputs per family (diffusers 0.42), which is what the probe taps:

==============  ===================================  =============================================
family          block lists                          block output
==============  ===================================  =============================================
organism/flux   transformer_blocks (double-stream),  (encoder_hidden_states, hidden_states):
                single_transformer_blocks            text first. Single blocks concatenate
                                                     [text; image] inside and split again before
                                                     returning, so both lists return two streams.
sd3             transformer_blocks                   (encoder_hidden_states, hidden_states); the
                                                     last block's text output is None.
pixart, sana    transformer_blocks                   hidden_states only (text enters by
                                                     cross-attention and is not a stream).
==============  ===================================  =============================================

What this is not: a model zoo. Hub ids are passed to `DiffusionPipeline.from_pretrained` untouched.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn

from mabook import progress as progress_

SUPPORTED = ("organism", "flux", "sd3", "pixart", "sana")


@dataclass(frozen=True)
class Family:
    """How one DiT family lays out its transformer (plain data, one entry per family)."""

    name: str
    transformer_class: str  # diffusers class name of the denoiser
    block_lists: tuple[str, ...]  # attribute names of the ModuleLists of blocks, in call order
    output_layout: str  # "txt_img": output is (encoder_hidden_states, hidden_states); "img": hidden_states
    guidance_batch: bool  # default pipeline call batches [uncond; cond] in one transformer call
    example: str  # a hub id, for error messages and docs
    # guidance as a second, unconditional transformer call after the conditional one at the same
    # step (FluxPipeline with true_cfg_scale > 1 and a negative prompt), rather than a doubled batch
    separate_uncond_call: bool = False
    # module whose output is the AdaLN conditioning `temb` (timestep + pooled text embedding), read by
    # every block's modulation and the final norm_out; None where it is not one tensor (PixArt, SANA)
    conditioning: str | None = None
    # the image self-/joint-attention: "softmax" (a probability mass over keys: attention sinks apply)
    # or "linear" (SANA: no softmax, so no mass for a sink to hold)
    attention: str = "softmax"
    # the noising path the model was trained on, which `mabook.inversion` puts a reference on: "flow"
    # (rectified flow, x = (1 - sigma) x_0 + sigma eps, a predicted velocity: the ODE inversion runs
    # backwards, `INVERTIBLE`; SANA too, though SanaPipeline samples it with DPM-Solver) or "ddpm"
    # (x = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, predicted noise: PixArt, noising only)
    path: str = "flow"
    # pipeline attribute of the tokenizer whose tokens are the transformer's text keys, padding
    # included (`Adapter.text_tokenizer`); None where the text keys are not one tokenizer's (SD3 joins
    # CLIP and T5) or text enters by cross-attention only (PixArt, SANA)
    text_tokenizer: str | None = None
    # pipeline-call arguments every mabook call gives the family's pipeline (a caller's own win):
    # PixArt and SANA snap a size to their training resolutions unless told not to, and mabook's
    # token grids, inversion and records assume the image is the size asked for
    call_defaults: tuple[tuple[str, object], ...] = ()


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # The organism is a FluxTransformer2DModel behind its own pipeline (pixels, no VAE).
        Family("organism", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "txt_img", True, "organism",
               conditioning="time_text_embed", text_tokenizer="tokenizer"),
        # FLUX.1-dev is guidance-distilled: one call per step, no CFG batch. Its text keys are T5's.
        Family("flux", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"), "txt_img", False,
               "black-forest-labs/FLUX.1-dev", separate_uncond_call=True, conditioning="time_text_embed",
               text_tokenizer="tokenizer_2"),
        Family("sd3", "SD3Transformer2DModel", ("transformer_blocks",), "txt_img", True, "stabilityai/stable-diffusion-3.5-medium",
               conditioning="time_text_embed"),
        Family("pixart", "PixArtTransformer2DModel", ("transformer_blocks",), "img", True, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
               path="ddpm", call_defaults=(("use_resolution_binning", False),)),
        Family("sana", "SanaTransformer2DModel", ("transformer_blocks",), "img", True, "Efficient-Large-Model/Sana_600M_1024px_diffusers",
               attention="linear", call_defaults=(("use_resolution_binning", False),)),
    )
}
# the families `mabook.inversion` can run a reference image backwards in (flow matching, Euler steps)
INVERTIBLE = tuple(f.name for f in FAMILIES.values() if f.path == "flow")


class UnsupportedModelError(ValueError):
    """The model's transformer is not one of the families mabook knows."""


class ModelNotFoundError(OSError):
    """A model id that is neither the organism, a local directory nor loadable from the hub (or its cache)."""


def _unsupported(what: str) -> UnsupportedModelError:
    listing = ", ".join(f"{f.name} ({f.transformer_class}, e.g. {f.example!r})" for f in FAMILIES.values())
    return UnsupportedModelError(f"unsupported model {what}; supported families: {listing}")


@dataclass(frozen=True)
class Block:
    """One transformer block: its module path (e.g. "single_transformer_blocks.9") and its streams."""

    path: str
    module: nn.Module
    streams: tuple[str, ...]  # ("img", "txt") or ("img",)


def generators(units: Sequence[tuple[str, int]]) -> list[torch.Generator]:
    """One CPU generator per (prompt, seed) unit, seeded with the unit's seed: the noise of every
    mabook generation (CPU noise: the same images on any device)."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for _, seed in units]


class Adapter:
    """Architecture knowledge for one loaded DiT.

    Attributes: `family` (a `Family`), `pipe` (the pipeline, or None when only a transformer was
    loaded), `transformer`, `blocks` (ordered `Block`s, as the forward pass calls them).
    """

    def __init__(self, family: Family, transformer: nn.Module, pipe=None):
        self.family = family
        self.transformer = transformer
        self.pipe = pipe
        streams = ("img", "txt") if family.output_layout == "txt_img" else ("img",)
        self.blocks: list[Block] = [
            Block(f"{name}.{i}", module, streams)
            for name in family.block_lists
            for i, module in enumerate(getattr(transformer, name))
        ]

    def __repr__(self) -> str:
        return f"Adapter(family={self.family.name!r}, blocks={len(self.blocks)}, width={self.width})"

    @property
    def width(self) -> int:
        """Channels of the image stream (inner dim): 3072 for FLUX.1, 128 for the organism."""
        cfg = self.transformer.config
        return int(cfg.num_attention_heads * cfg.attention_head_dim)

    # -- streams --------------------------------------------------------------------------------

    def streams(self, output) -> dict[str, torch.Tensor | None]:
        """A block's forward output -> {"img": (batch, image_tokens, C), "txt": (batch, text_tokens, C) or None}."""
        if self.family.output_layout == "txt_img":
            encoder_hidden_states, hidden_states = output
            return {"img": hidden_states, "txt": encoder_hidden_states}
        return {"img": output}

    def replace(self, output, stream: str, hidden_states: torch.Tensor):
        """A block's output with one stream replaced (same structure as `output`)."""
        if self.family.output_layout == "txt_img":
            encoder_hidden_states, img = output
            return (hidden_states, img) if stream == "txt" else (encoder_hidden_states, hidden_states)
        if stream != "img":
            raise ValueError(f"{self.family.name} blocks have only an 'img' stream, got {stream!r}")
        return hidden_states

    # -- geometry ---------------------------------------------------------------------------------

    def guidance_batch(self, hidden_states: torch.Tensor | None = None) -> bool:
        """Whether a transformer call batches [uncond; cond] (classifier-free guidance).

        Inside a pipeline call, the pipeline says so: its `do_classifier_free_guidance` (a local
        variable of PixArt's `__call__`, a property of SD3's, SANA's and the organism's), else the
        family's fixed behaviour (FLUX never batches guidance). Given the call's input
        `hidden_states`, a guidance batch must also be what diffusers builds, `torch.cat([latents] * 2)`:
        two identical halves -- so two prompts that share one noise seed without guidance are not
        mistaken for one. For direct transformer calls, the halves decide (unless the pipeline's
        flag says False).
        """
        call = self.pipeline_call() if self.pipe is not None else None
        flag = call.get("do_classifier_free_guidance") if call is not None else None
        if not isinstance(flag, bool):
            flag = getattr(self.pipe, "do_classifier_free_guidance", None) if self.pipe is not None else None
            flag = flag if isinstance(flag, bool) else None
        if flag is None and (call is not None or hidden_states is None):
            flag = self.family.guidance_batch
        if hidden_states is None:
            return flag
        B = hidden_states.shape[0]
        halves_equal = B > 0 and B % 2 == 0 and torch.equal(hidden_states[: B // 2], hidden_states[B // 2:])
        return halves_equal and flag is not False

    def pipeline_call(self) -> dict | None:
        """The local variables of this adapter's pipeline `__call__` if one is running (else None):
        what the pipeline was asked for (`prompt`, `guidance_scale`, ...) as the transformer is called."""
        frame = sys._getframe(1)
        for _ in range(64):  # the pipeline's frame is a few module calls up from a forward hook
            if frame is None:
                return None
            if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is self.pipe:
                return frame.f_locals
            frame = frame.f_back
        return None

    def grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Image token grid (h, w) for a generation of height x width pixels (default: the pipeline's)."""
        if self.family.name == "organism":
            h, w = self.pipe.grid
            size = self.pipe.organism_config.image_size
            if (height or size) != size or (width or size) != size:
                raise ValueError(f"the organism generates {size}x{size} images only, got {height}x{width}")
            return h, w
        if self.pipe is None:
            raise ValueError("grid() needs a pipeline (only a transformer was loaded); pass image tokens to the probe instead")
        vae_scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        if self.family.name == "flux":
            default = int(getattr(self.pipe, "default_sample_size", 128)) * vae_scale  # FluxPipeline's: 128
            per_token = vae_scale * 2  # FLUX packs 2x2 latent pixels into one token; its patch_size is 1
        else:
            default = int(self.transformer.config.sample_size) * vae_scale
            per_token = vae_scale * int(self.transformer.config.patch_size)
        height, width = height or default, width or default
        return height // per_token, width // per_token

    def generate(self, units: Sequence[tuple[str, int]], num_inference_steps: int, batch_size: int = 16,
                 progress: bool | None = None, **pipe_kwargs) -> np.ndarray:
        """The one generation loop: (units, H, W, 3) float32 images in [0, 1] for (prompt, seed) units.

        Unit i's noise comes from its own `torch.Generator("cpu").manual_seed(seed)` (diffusers'
        one-generator-per-image convention, `generators`), so an image does not depend on the batch it
        was made in, nor on the units beside it. pipe_kwargs go to the pipeline call (e.g. `latents`,
        `height`). progress: a bar over the batches (when there are several) and the time estimate
        (`mabook.progress`; None: on where someone reads it).
        """
        return np.concatenate(self._loop("generate", units, num_inference_steps, batch_size, progress, "np",
                                         pipe_kwargs)).astype(np.float32)

    def denoise(self, units: Sequence[tuple[str, int]], num_inference_steps: int, batch_size: int = 16,
                progress: bool | None = None, what: str = "denoise", **pipe_kwargs) -> None:
        """`generate`'s loop, for what hooks see on the way: the images are not kept (a diffusers
        pipeline returns latents, skipping the VAE; the organism's decoder is a few pixels' work).
        `what` labels the bar and the time estimate."""
        self._loop(what, units, num_inference_steps, batch_size, progress,
                   "pt" if self.family.name == "organism" else "latent", pipe_kwargs)

    def _loop(self, what, units, num_inference_steps, batch_size, progress, output_type, pipe_kwargs) -> list:
        if self.pipe is None:
            raise ValueError(f"{what} needs a pipeline; this adapter wraps a bare transformer")
        out = []
        with progress_.estimate(what, len(units), num_inference_steps, progress):
            for start in progress_.bar(range(0, len(units), batch_size), what, unit="batch", progress=progress):
                chunk = units[start:start + batch_size]
                with progress_.timed_step(self.transformer, len(chunk)):
                    images = self.pipe([p for p, _ in chunk], num_inference_steps=num_inference_steps,
                                       generator=generators(chunk), output_type=output_type,
                                       **self.call_kwargs(pipe_kwargs)).images
                if output_type == "np":
                    out.append(images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images))
        return out

    def call_kwargs(self, pipe_kwargs: dict) -> dict:
        """The arguments of a pipeline call: the family's `call_defaults`, then the caller's; given
        `latents` in the transformer's dtype (PixArt's pipeline passes them on uncast, and a float32
        trajectory would meet a bfloat16 transformer)."""
        kwargs = {**dict(self.family.call_defaults), **pipe_kwargs}
        latents = kwargs.get("latents")
        if isinstance(latents, torch.Tensor) and latents.is_floating_point() and latents.dtype != self.transformer.dtype:
            kwargs["latents"] = latents.to(self.transformer.dtype)
        return kwargs

    def text_tokenizer(self, call: dict):
        """(tokenizer, max_length): the tokenizer whose tokens are the transformer's text keys in a running
        pipeline call (`call`: its local variables, `pipeline_call()`) and the length they are padded to.
        Only for families with a `Family.text_tokenizer` and a pipeline."""
        if self.pipe is None:
            raise ValueError("text_tokenizer() needs a pipeline; this adapter wraps a bare transformer")
        if self.family.text_tokenizer is None:
            raise ValueError(f"family {self.family.name!r} has no one tokenizer whose tokens are its text keys")
        tokenizer = getattr(self.pipe, self.family.text_tokenizer)
        if self.family.name == "organism":
            return tokenizer, self.pipe.organism_config.max_text_length
        return tokenizer, int(call.get("max_sequence_length") or 512)  # FLUX's T5: padded to max_sequence_length

    def attention_modules(self) -> dict[str, nn.Module]:
        """Module path -> attention module (anything with a diffusers attention processor)."""
        return {
            f"{block.path}.{name}": module
            for block in self.blocks
            for name, module in block.module.named_modules()
            if name and hasattr(module, "set_processor")
        }


# ---------------------------------------------------------------------------------------------
# Recognising a model
# ---------------------------------------------------------------------------------------------


def family_of(transformer: nn.Module, pipe=None) -> Family:
    """The Family of a transformer (and its pipeline: the organism is a FLUX transformer)."""
    from mabook.organism import OrganismPipeline  # deferred: organism pulls in diffusers' pipelines and transformers (~15 s)

    if isinstance(pipe, OrganismPipeline):
        return FAMILIES["organism"]
    name = type(transformer).__name__
    for family in FAMILIES.values():
        if family.name != "organism" and family.transformer_class == name:
            return family
    raise _unsupported(f"with transformer {name}")


def adapter_for(model) -> Adapter:
    """An Adapter for a pipeline (anything with a `.transformer`) or a bare transformer."""
    if isinstance(model, nn.Module) and not hasattr(model, "transformer"):
        return Adapter(family_of(model), model, pipe=None)
    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, nn.Module):
        raise _unsupported(f"{type(model).__name__} (no .transformer module; UNet pipelines are not DiTs)")
    return Adapter(family_of(transformer, model), transformer, pipe=model)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load(
    name_or_path: str | Path = "organism",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    path: str | Path | None = None,
    cpu_offload: bool = False,
    gguf: str | Path | None = None,
    **from_pretrained_kwargs,
):
    """Load a DiT -> (pipe, adapter).

    name_or_path: "organism" (the committed checkpoint, or `path=` another organism checkpoint),
    a hub id or a local directory saved with `save_pretrained`. A directory holding a pipeline
    (model_index.json) loads the pipeline; one holding only a transformer (config.json) loads the
    transformer and returns (None, adapter).
    cpu_offload: diffusers' `enable_model_cpu_offload()` instead of `.to(device)` (big models on
    small GPUs: each component visits the GPU only while it runs).
    gguf: a GGUF file of the transformer's weights (e.g. a Q8_0 FLUX.1-dev): the transformer is
    loaded from it through diffusers' GGUF quantizer (`from_single_file`; the weights stay quantized
    in memory and each layer dequantizes its own to `dtype` when it runs; needs the `gguf` package),
    its config and the other components from name_or_path. Other diffusers quantization backends
    (torchao, bitsandbytes) need no option here: pass `quantization_config=` (a
    `PipelineQuantizationConfig`) or a quantized `transformer=`, which go to `from_pretrained`.
    """
    _check_load_arguments(name_or_path, device, dtype)
    if str(name_or_path) == "organism":
        if gguf is not None:
            raise ValueError("gguf= is for a real model's transformer; the organism has no quantized weights")
        from mabook import organism  # deferred: organism pulls in diffusers' pipelines and transformers (~15 s)

        pipe = organism.load(path, device=device, dtype=dtype)
        return pipe, adapter_for(pipe)
    if path is not None:
        raise ValueError(f"path= is only for the organism; for {name_or_path!r} pass the directory as name_or_path")
    if gguf is not None:
        if "transformer" in from_pretrained_kwargs:
            raise ValueError("pass either gguf= or transformer=, not both: gguf= loads the transformer")
        _check_gguf(gguf)

    if cpu_offload and torch.device(device).type == "cpu":
        raise ValueError(f"cpu_offload=True moves components to an accelerator in turn; device={device!r} has none")

    local = Path(name_or_path)
    if not local.exists() and _looks_like_path(str(name_or_path)):
        raise ModelNotFoundError(f"model directory {str(name_or_path)!r} does not exist ({local.expanduser().resolve()}); "
                                 f"pass {_WHAT_TO_PASS}")
    if local.is_dir() and not (local / "model_index.json").is_file():
        return None, _load_transformer_directory(local, device, dtype, cpu_offload, gguf, from_pretrained_kwargs)

    pipe = _load_pipeline(str(name_or_path), local, dtype, gguf, from_pretrained_kwargs)
    adapter = adapter_for(pipe)  # fail on an unsupported family before moving weights around
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe, adapter


def _check_load_arguments(name_or_path, device, dtype) -> None:
    """`load`'s one-line errors for a name, dtype or device of the wrong kind."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32, torch.bfloat16), got {dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device; allowed: 'cpu', 'cuda', 'cuda:N', 'mps'") from None


def _load_transformer_directory(local: Path, device, dtype: torch.dtype, cpu_offload: bool, gguf,
                                from_pretrained_kwargs: dict) -> Adapter:
    """A directory holding only a transformer (config.json, no model_index.json) -> its Adapter (no pipeline)."""
    config_file = local / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{local} holds neither a pipeline (model_index.json) nor a model (config.json)")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    family = next((f for f in FAMILIES.values() if f.transformer_class == class_name), None)
    if family is None:
        raise _unsupported(f"{local} (transformer class {class_name})")
    if cpu_offload:
        raise ValueError(f"cpu_offload=True offloads a pipeline's components in turn; {str(local)!r} holds a transformer only")
    import diffusers  # deferred: diffusers takes ~6 s to import; every module imports this one, which needs only torch

    if gguf is not None:
        transformer = _gguf_transformer(gguf, class_name, str(local), None, dtype)
    else:
        transformer = getattr(diffusers, class_name).from_pretrained(local, torch_dtype=dtype, **from_pretrained_kwargs)
    transformer = transformer.to(device).eval()
    return Adapter(family, transformer)


def _load_pipeline(name: str, local: Path, dtype: torch.dtype, gguf, from_pretrained_kwargs: dict):
    """`DiffusionPipeline.from_pretrained(name)` (the transformer from `gguf` if given), with a one-line
    `ModelNotFoundError` for a name that is no directory, no reachable repository and no hub id."""
    from diffusers import DiffusionPipeline  # deferred: diffusers' pipelines take ~15 s to import; only a load needs them

    try:
        if gguf is not None:
            class_name = DiffusionPipeline.load_config(name).get("transformer", [None, None])[1]
            from_pretrained_kwargs["transformer"] = _gguf_transformer(gguf, class_name, name, "transformer", dtype)
        return DiffusionPipeline.from_pretrained(name, torch_dtype=dtype, **from_pretrained_kwargs)
    except OSError as e:  # diffusers' "Cannot load model ...": no such directory, repository, cache entry or network
        if local.is_dir():
            raise ModelNotFoundError(f"cannot load the pipeline in directory {str(local)!r}: {_reason(e)}") from e
        raise _not_loadable(name, e) from e
    except ValueError as e:  # huggingface_hub's HFValidationError: not even a well-formed hub id
        if local.exists() or "repo id" not in str(e).lower() and "repo_id" not in str(e):
            raise
        raise ModelNotFoundError(f"model {name!r} is not 'organism', not a local directory and not a valid "
                                 f"hub id (namespace/name): {_reason(e)}; pass {_WHAT_TO_PASS}") from e


def _check_gguf(gguf) -> None:
    """A one-line error for a `gguf=` that cannot load: not a path, no such file, not .gguf, no gguf package."""
    if not isinstance(gguf, (str, Path)):
        raise TypeError(f"gguf must be the path of a .gguf file (str or Path), got {type(gguf).__name__}")
    if Path(gguf).suffix.lower() != ".gguf":
        raise ValueError(f"gguf={str(gguf)!r} is not a .gguf file; pass the path of the transformer's GGUF weights")
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"gguf={str(gguf)!r}: no such file ({Path(gguf).expanduser().resolve()})")
    try:
        import gguf as _  # noqa: F401  (diffusers' GGUF quantizer reads the file with it)
    except ImportError:
        raise ImportError("gguf= needs the gguf package: pip install gguf") from None


def _gguf_transformer(gguf: str | Path, class_name: str | None, config: str, subfolder: str | None, dtype: torch.dtype) -> nn.Module:
    """The transformer of a supported family from one GGUF file, with diffusers' GGUF quantizer; its config
    from `config` (a pipeline's `subfolder`, or a transformer directory)."""
    if not any(f.transformer_class == class_name for f in FAMILIES.values()):
        raise _unsupported(f"{config} (transformer class {class_name}) for gguf=")
    import diffusers  # deferred, as in load()

    return getattr(diffusers, class_name).from_single_file(
        str(gguf), config=config, subfolder=subfolder, torch_dtype=dtype,
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype))


_WHAT_TO_PASS = ("'organism' (the offline model organism), a local directory saved with save_pretrained, or a hub id "
                 f"such as {FAMILIES['flux'].example!r} with network access (and HF_TOKEN for gated models)")


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id ("namespace/name" or "name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def _reason(error: BaseException, limit: int = 160) -> str:
    """The root cause of an error chain, on one short line."""
    root = error
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    text = " ".join(str(root).split()) or type(root).__name__
    return f"{type(root).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _not_loadable(name: str, error: BaseException) -> ModelNotFoundError:
    """One line: what was tried for a hub id (local directory, the cache, the network) and what to pass instead."""
    try:
        offline, cache = bool(constants.HF_HUB_OFFLINE), constants.HF_HUB_CACHE
        cached = isinstance(try_to_load_from_cache(name, "model_index.json"), str)
    except Exception:  # an id the hub client refuses to look up: not cached either
        offline, cache, cached = False, "the Hugging Face cache", False
    where = f"in the Hugging Face cache ({cache}) but incomplete there" if cached else f"not in the Hugging Face cache ({cache})"
    network = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
               else f"the hub did not provide it (no network, no such repository, or a gated one without HF_TOKEN): {_reason(error)}")
    return ModelNotFoundError(f"cannot load model {name!r}: not 'organism', not a local directory (no {Path(name).resolve()}), "
                              f"{where}, and {network}; pass {_WHAT_TO_PASS}")
