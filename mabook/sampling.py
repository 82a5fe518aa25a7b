"""What a family's pipeline does on its schedule: latents, sigmas, velocity, and a scheduler that walks a given path.

`mabook.inversion` puts a reference image on a denoising trajectory (chapter 5); everything it needs
of a family's pipeline is here, computed as the pipeline itself computes it, on its own schedule
(sigma_0 = 1 > sigma_1 > ... > sigma_N = 0 on the flow path, the scheduler's `sigmas`):

- `encode(adapter, images)`: (B, H, W, 3) in [0, 1] -> the clean latents x_N as the pipeline's
  `latents=` takes them (table below).
- `schedule(adapter, N)`: (timesteps, sigmas) exactly as the pipeline sets them, from a copy of its
  scheduler; `default_guidance_scale(adapter)`: the pipeline's own guidance.
- `velocity(adapter, prompt, batch, guidance_scale)`: v(latents, t), the velocity the pipeline's
  denoising loop computes, guidance included (flow families); its Euler step is
  x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i).
- `sampler(adapter)`: the adapter whose pipeline runs a trajectory, and which scheduler it samples
  with (the loaded one, except SANA on its DPM-Solver: below).
- `at_level`, `level`, `levels`: the points of a family's noising path, x_i = (1 - sigma_i) x_N +
  sigma_i eps on the flow path, sqrt(abar_{t_i}) x_N + sqrt(1 - abar_{t_i}) eps on PixArt's DDPM path.
- `noising_scheduler(adapter, clean, noise)`: inside it the pipeline's scheduler (`NoisingScheduler`,
  or the same walk, `Noising`, on PixArt's DPM-Solver) ignores the model and steps along the
  noising path, so the pipeline walks that path and the probe sees the transformer at every point.

Per family (`Family.path` says which noising path the model was trained on):

========  =================================================================================
organism  flow; pixels in [-1, 1], 4x4-pixel patches (`organism.patchify`): (B, 64, 48); no VAE
flux      flow; VAE encoder (mode of the posterior), (z - shift_factor) * scaling_factor, then 2x2
          latent pixels packed per token (`FluxPipeline._pack_latents`): (B, h/2 * w/2, 4C); its
          own sigmas with the resolution shift
sd3       flow; VAE encoder, (z - shift_factor) * scaling_factor: (B, C, h, w)
sana      flow; DC-AE encoder, z * scaling_factor: (B, C, h, w). SanaPipeline samples SANA's flow
          with DPMSolverMultistepScheduler (2nd-order multistep, use_flow_sigmas), whose steps have
          no one-step inverse; a trajectory instead runs on Euler steps of the same flow:
          FlowMatchEulerDiscreteScheduler(shift = the scheduler's flow_shift), as FLUX and SD3
          sample, in a twin of the loaded pipeline (`sampler`: every module shared, nothing
          copied, the loaded pipeline left as it was). A SanaPipeline already on
          FlowMatchEulerDiscreteScheduler runs as is.
pixart    ddpm; VAE encoder, z * scaling_factor: (B, C, h, w). PixArt-Sigma predicts DDPM noise
          (DPM-Solver): no flow velocity (`velocity` refuses). Step i sits at the noise level of
          the timestep t_i its transformer is given, sqrt(1 - abar_{t_i}) (`levels`, from the
          scheduler's `alphas_cumprod`), and a generation starts there, not at eps (abar_{t_0} > 0).
========  =================================================================================

What this is not: a sampler of its own. The pipelines generate; this reproduces what they compute
so that `mabook.inversion` can run it backwards or walk a given path.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from mabook.models import FAMILIES as FAMILY_TABLE
from mabook.models import INVERTIBLE, Adapter

NOISABLE = tuple(FAMILY_TABLE)  # the families with a noising path here: every family, on its own path (flow or ddpm)


def check_family(adapter: Adapter) -> None:
    """Refuse, in one line, a family without a noising path here, or an adapter without a pipeline."""
    name = adapter.family.name
    if name not in NOISABLE:
        raise ValueError(f"reference trajectories support the families {list(NOISABLE)}; {name} is not one of them")
    if adapter.pipe is None:
        raise ValueError("inversion needs a pipeline; this adapter wraps a bare transformer")


# ---------------------------------------------------------------------------------------------
# 1. Latents and schedule: what the pipeline sets up, per family
# ---------------------------------------------------------------------------------------------


def encode(adapter: Adapter, images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> clean latents as the pipeline's `latents=` takes them (float32; the table above)."""
    from mabook import organism  # deferred: organism pulls in diffusers' pipelines and transformers (~9 s)

    check_family(adapter)
    pipe = adapter.pipe
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1  # (B, 3, H, W)
    if adapter.family.name == "organism":
        return organism.patchify(x, pipe.organism_config.patch_size).to(adapter.transformer.device)
    vae = pipe.vae
    with torch.no_grad():
        out = vae.encode(x.to(vae.device, vae.dtype))
        z = (out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent).float()  # AutoencoderDC: no posterior
    z = (z - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    if adapter.family.name == "flux":
        B, C, h, w = z.shape
        z = pipe._pack_latents(z, B, C, h, w)
    return z.to(adapter.transformer.device)


def _is_flow_dpm(scheduler) -> bool:
    """A DPM-Solver on the flow path (SanaPipeline's scheduler: use_flow_sigmas, flow_prediction)."""
    config = scheduler.config
    return bool(config.get("use_flow_sigmas")) and config.get("prediction_type") == "flow_prediction"


def _copy_scheduler(adapter: Adapter):
    """A fresh scheduler of the kind the trajectory runs on: the pipeline's own (flow: its
    FlowMatchEulerDiscreteScheduler; ddpm: any scheduler with `alphas_cumprod` and a step index), or
    for SANA's flow DPM-Solver the Euler one on the same flow (module docstring)."""
    scheduler, name = adapter.pipe.scheduler, adapter.family.name
    kind = type(scheduler).__name__
    if adapter.family.path == "ddpm":
        if (not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "_init_step_index")
                or float(scheduler.init_noise_sigma) != 1.0 or scheduler.config.get("prediction_type") == "flow_prediction"):
            raise ValueError(f"noising {name} needs a DDPM scheduler with alphas_cumprod, a step index and init_noise_sigma 1 "
                             f"(DPMSolverMultistepScheduler, the pipeline's own); this pipeline has {kind}")
        return type(scheduler).from_config(scheduler.config)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return type(scheduler).from_config(scheduler.config)
    if name == "sana" and isinstance(scheduler, DPMSolverMultistepScheduler) and _is_flow_dpm(scheduler):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler.config.num_train_timesteps,
                                               shift=float(scheduler.config.flow_shift))
    allowed = "FlowMatchEulerDiscreteScheduler" + (", or DPMSolverMultistepScheduler with use_flow_sigmas and "
                                                   "prediction_type='flow_prediction'" if name == "sana" else "")
    raise ValueError(f"a {name} trajectory needs the flow-matching Euler scheduler; this pipeline has {kind}; allowed: {allowed}")


def sampler(adapter: Adapter) -> tuple[Adapter, str]:
    """(the adapter whose pipeline runs the trajectory, which scheduler it samples with): the loaded
    adapter, or for SANA on its flow DPM-Solver a twin pipeline (every module shared) on Euler steps."""
    scheduler = adapter.pipe.scheduler
    euler = _copy_scheduler(adapter)
    if type(euler) is type(scheduler):
        return adapter, type(scheduler).__name__
    pipe = type(adapter.pipe)(**{**adapter.pipe.components, "scheduler": euler})  # not from_pipe: it casts to float32
    if hasattr(adapter.pipe, "_progress_bar_config"):
        pipe._progress_bar_config = dict(adapter.pipe._progress_bar_config)
    return (Adapter(adapter.family, adapter.transformer, pipe),
            f"FlowMatchEulerDiscreteScheduler(shift={euler.config.shift:g}) in place of the pipeline's {type(scheduler).__name__}")


def _set_schedule(adapter: Adapter, scheduler, num_inference_steps: int, height=None, width=None) -> None:
    """Call scheduler.set_timesteps as the family's pipeline does (FLUX: its own sigmas and resolution shift)."""
    # deferred: pipeline_flux pulls in transformers (~6 s) and prints two torchvision warnings; only FLUX and SD3 use it
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    device = adapter.transformer.device
    if adapter.family.name == "organism":
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    if adapter.family.name in ("sana", "pixart"):  # SanaPipeline / PixArtSigmaPipeline.__call__, step 4
        retrieve_timesteps(scheduler, num_inference_steps, device)
        return
    h, w = adapter.grid(height, width)
    config = scheduler.config
    if adapter.family.name == "flux":  # FluxPipeline.__call__, step 5
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(h * w, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    else:  # StableDiffusion3Pipeline.__call__, step 5
        kwargs = {}
        if config.get("use_dynamic_shifting"):
            kwargs["mu"] = calculate_shift(h * w, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                           config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)


def schedule(adapter: Adapter, num_inference_steps: int, height: int | None = None,
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (N,), sigmas (N + 1,)) exactly as the pipeline sets them, from a copy of its scheduler
    (SANA on its flow DPM-Solver: of the Euler scheduler its trajectories run on; PixArt: DPM-Solver's
    own sigmas, sqrt((1 - abar) / abar), not a noising trajectory's `sigmas`)."""
    check_family(adapter)
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    scheduler = _copy_scheduler(adapter)
    _set_schedule(adapter, scheduler, num_inference_steps, height, width)
    return scheduler.timesteps, scheduler.sigmas


def default_guidance_scale(adapter: Adapter) -> float:
    """The pipeline's own default `guidance_scale` (organism 4.0, FLUX.1 3.5, SD3 7.0)."""
    return float(inspect.signature(adapter.pipe.__call__).parameters["guidance_scale"].default)


# ---------------------------------------------------------------------------------------------
# 2. Velocity: what the pipeline's denoising loop computes (flow families)
# ---------------------------------------------------------------------------------------------


def velocity(adapter: Adapter, prompt: str, batch: int, guidance_scale: float, height=None, width=None,
              max_sequence_length: int | None = None):
    """v(latents, t): the velocity the pipeline's denoising loop computes for `prompt` at timestep t,
    guidance included (an empty prompt has cond = uncond, so its guidance batch is skipped -- except
    on SANA, whose pipeline prefixes a positive prompt, "" too, with its complex human instruction)."""
    pipe, transformer, family = adapter.pipe, adapter.transformer, adapter.family.name
    if adapter.family.path != "flow":
        raise ValueError(f"{family} predicts DDPM noise, not a flow velocity; allowed families: {list(INVERTIBLE)}")
    device, dtype = transformer.device, transformer.dtype
    cfg = guidance_scale > 1.0 and (prompt != "" or family == "sana") and family != "flux"  # FLUX.1 embeds guidance
    msl = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    with torch.no_grad():
        if family == "organism":
            from mabook import organism  # deferred: organism pulls in diffusers' pipelines and transformers (~9 s)

            embeds, pooled = pipe.encode_prompt([prompt] * batch)
            if cfg:
                neg, neg_pooled = pipe.encode_prompt([""] * batch)
                embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
            grid = pipe.organism_config.grid
            extra = dict(img_ids=organism.image_ids(grid, device).to(dtype),
                         txt_ids=torch.zeros(pipe.organism_config.max_text_length, 3, device=device, dtype=dtype))
            scale_t = 1000.0
        elif family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=[prompt] * batch, prompt_2=None, device=device, **msl)
            h, w = adapter.grid(height, width)
            guidance = (torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
                        if transformer.config.guidance_embeds else None)
            extra = dict(txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(batch, h, w, device, dtype),
                         guidance=guidance)
            scale_t = 1000.0
        elif family == "sd3":
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=[prompt] * batch, prompt_2=None, prompt_3=None,
                                                                 device=device, do_classifier_free_guidance=cfg, **msl)
            if cfg:
                embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
            extra, scale_t = {}, 1.0  # SD3's transformer takes the scheduler's timestep as is
        else:  # sana: SanaPipeline.__call__, steps 3 and 7, with the call's own defaults
            call = inspect.signature(pipe.__call__).parameters
            text = {k: call[k].default for k in ("clean_caption", "complex_human_instruction", "max_sequence_length")}
            text.update(msl)
            embeds, mask, neg, neg_mask = pipe.encode_prompt([prompt] * batch, do_classifier_free_guidance=cfg,
                                                             negative_prompt="", device=device, **text)
            if cfg:
                embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
            embeds, pooled, extra = embeds.to(dtype), None, dict(encoder_attention_mask=mask)
            scale_t = 1.0 / float(transformer.config.timestep_scale)  # the pipeline multiplies t by timestep_scale

    def v(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([latents] * 2) if cfg else latents
        timestep = (t / scale_t).expand(x.shape[0])
        args = dict(hidden_states=x.to(dtype), encoder_hidden_states=embeds, return_dict=False, **extra)
        if family == "sana":  # SANA's pipeline passes the timestep in float32 and has no pooled projection
            args["timestep"] = timestep
        else:
            args.update(timestep=timestep.to(dtype), pooled_projections=pooled)
        with torch.no_grad():
            out = transformer(**args)[0].float()
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        if family == "sana" and transformer.config.out_channels // 2 == transformer.config.in_channels:
            out = out.chunk(2, dim=1)[0]  # a learned sigma: the pipeline keeps the first half
        return out

    return v


# ---------------------------------------------------------------------------------------------
# 3. Noising paths
# ---------------------------------------------------------------------------------------------


def at_level(clean: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The rectified-flow path: (1 - sigma) * clean + sigma * noise (sigma a float or 0-d tensor)."""
    if clean.shape != noise.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and noise {tuple(noise.shape)} differ in shape")
    return (1 - sigma) * clean + sigma * noise


def level(clean: torch.Tensor, eps: torch.Tensor, sigma, path: str = "flow") -> torch.Tensor:
    """A point of a family's noising path with eps's coefficient sigma: "flow", `at_level`;
    "ddpm", sqrt(1 - sigma^2) * clean + sigma * eps (sigma = sqrt(1 - abar_t): DDPM's q(x_t | x_0))."""
    if path == "flow":
        return at_level(clean, eps, sigma)
    if path != "ddpm":
        raise ValueError(f"unknown path {path!r}; allowed: 'flow', 'ddpm'")
    if clean.shape != eps.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and eps {tuple(eps.shape)} differ in shape")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (torch.sqrt(1 - sigma ** 2) * clean.double() + sigma * eps.double()).to(clean.dtype)


def levels(adapter: Adapter, timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(N + 1,) eps's coefficient at each step: flow, the scheduler's sigmas; ddpm, sqrt(1 - abar_{t_i})
    at the timestep the transformer is given (the scheduler's `alphas_cumprod`), then 0."""
    if adapter.family.path == "flow":
        return sigmas.cpu()
    abar = adapter.pipe.scheduler.alphas_cumprod.double().cpu()
    t = timesteps.cpu()
    if (t.is_floating_point() and not torch.equal(t, t.round())) or not ((t >= 0) & (t < len(abar))).all():
        raise ValueError(f"noising {adapter.family.name} needs integer timesteps in 0..{len(abar) - 1}, got {t.tolist()}")
    return torch.cat([torch.sqrt(1 - abar[t.long()]), torch.zeros(1, dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------
# 4. A scheduler that walks a given path
# ---------------------------------------------------------------------------------------------


class Noising:
    """A scheduler whose `step` ignores the model and returns the next point of the noising path
    x_i = level(clean, eps, levels[i], path) (`levels` default: the scheduler's own sigmas, flow):
    the pipeline then walks a noised trajectory (and the probe sees the transformer at every x_i).
    Generations take the rows of `clean` / `noise` in order, one batch after another; each must
    start at its rows' x_0 (checked)."""

    def attach(self, clean: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor | None = None,
               path: str = "flow") -> "Noising":
        self._clean, self._noise, self._levels, self._path, self._row, self._rows = clean, noise, levels, path, 0, None
        return self

    def _point(self, rows: slice, i: int) -> torch.Tensor:
        levels = self.sigmas if self._levels is None else self._levels
        if len(levels) != len(self.timesteps) + 1:
            raise ValueError(f"NoisingScheduler: the trajectory has {len(levels) - 1} steps, the generation "
                             f"{len(self.timesteps)}; pass the trajectory's num_inference_steps")
        return level(self._clean[rows], self._noise[rows], levels[i], self._path)

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index == 0 or self._rows is None:  # a new generation: its batch is the next rows
            rows = slice(self._row, self._row + sample.shape[0])
            start = self._point(rows, self.step_index).to(sample)
            if start.shape != sample.shape or not torch.allclose(start, sample, atol=1e-5):
                raise ValueError(f"NoisingScheduler: the generation does not start at the noised references "
                                 f"{rows.start}..{rows.stop - 1} (batch {tuple(sample.shape)}); pass their noise as latents")
            self._rows, self._row = rows, rows.stop
        prev = self._point(self._rows, self.step_index + 1)
        self._step_index += 1
        prev = prev.to(device=sample.device, dtype=model_output.dtype)
        if self.step_index >= len(self.timesteps):
            self._rows = None
        output = FlowMatchEulerDiscreteSchedulerOutput if isinstance(self, FlowMatchEulerDiscreteScheduler) else SchedulerOutput
        return output(prev_sample=prev) if return_dict else (prev,)


class NoisingScheduler(Noising, FlowMatchEulerDiscreteScheduler):
    """The flow-matching Euler scheduler walking a noising path (`Noising`)."""


@functools.cache
def _noising_class(cls: type) -> type:
    """NoisingScheduler for FlowMatchEulerDiscreteScheduler, else the same walk on `cls` (PixArt's DPM-Solver)."""
    return NoisingScheduler if cls is FlowMatchEulerDiscreteScheduler else type(f"Noising{cls.__name__}", (Noising, cls), {})


@contextlib.contextmanager
def noising_scheduler(adapter: Adapter, clean: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor | None = None):
    """Inside: the pipeline's scheduler walks the noising path of clean / noise (same config); restored after.

    Flow (default): points at_level(clean, noise, sigma_i) on the scheduler's own sigmas, which must be
    a FlowMatchEulerDiscreteScheduler's. `levels` (a Trajectory's `sigmas`, N + 1): eps's coefficient
    per step on the family's path -- PixArt's DDPM path needs them, and noise is then eps."""
    pipe = adapter.pipe
    original = pipe.scheduler
    path = adapter.family.path
    if path == "flow" and not isinstance(original, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"noising needs a FlowMatchEulerDiscreteScheduler, the pipeline has {type(original).__name__}")
    if path == "ddpm":
        _copy_scheduler(adapter)  # refuses a scheduler without alphas_cumprod / step index
        if levels is None:
            raise ValueError(f"noising {adapter.family.name} (DDPM) needs levels: the trajectory's sigmas")
    pipe.scheduler = _noising_class(type(original)).from_config(original.config).attach(clean, noise, levels, path)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original
