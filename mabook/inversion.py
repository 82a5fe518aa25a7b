"""Bring a reference image onto a denoising trajectory, so its channels can be transported (chapter 5).

Image-conditioned transport (arXiv 2605.13974's second use) needs a *source trajectory* for an
image that no prompt generated. Two ways to make one, both on the pipeline's own schedule
(sigma_0 = 1 > sigma_1 > ... > sigma_N = 0, the scheduler's `sigmas`; the latents, schedule and
velocity are the pipeline's own, computed in `mabook.sampling`):

1. `invert(adapter, images)`: flow-matching inversion. The pipeline's Euler step is
   x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i); run backwards from the clean latents x_N it
   gives x_i = x_{i+1} - (sigma_{i+1} - sigma_i) v(x_i, t_i), implicit in x_i. The plain inversion
   evaluates v at x_{i+1} instead (`fixed_point_iterations=0`); otherwise a relaxed fixed-point
   iteration solves the implicit equation, keeping per reference the iterate whose forward Euler
   step lands closest to x_{i+1} (its relative *residual*, kept in `Trajectory.residuals`) and
   stopping once every residual is below `tolerance`. Solved, regenerating from the inverted noise
   x_0 retraces the reference's path and ends on it (`regenerate`, `pixel_error`); on the organism
   the plain inversion does not (chapter 5 measures both).
2. `noise(adapter, images, seeds)`: no model in the loop: step i sits at
   x_i = (1 - sigma_i) x_N + sigma_i eps with one fixed eps per reference (`sampling.at_level`; PixArt's
   DDPM path in the table below, `sampling.level`, `Trajectory.point`). Exact
   at every step, but a trajectory the model itself would not follow (`path_residuals` says how far
   its own Euler step misses the next point).

`record(trajectory, ...)` then records the reference's channels along it with `mabook.transport.record`
(the pipeline regenerates from the inverted noise; for noising, a `sampling.NoisingScheduler` swapped in for
the call makes the pipeline step along x_i instead of its own prediction), and
`mabook.transport.transport(rec, target_prompts, ...)` moves them into a new prompt's generation,
which starts from the same noise (the record's `latents`). Chapter 5's table on shapes-world pairs
(trajectories x methods x alphas) is `mabook.image_transport`.

Per family (`Family.path` says which noising path the model was trained on; how each family's
latents, schedule and velocity are computed: the table in `mabook.sampling`):

========  =================================================================================
organism  flow; invert and noise
flux      flow; invert and noise
sd3       flow; invert and noise
sana      flow; invert and noise. SanaPipeline samples SANA's flow with DPMSolverMultistepScheduler,
          whose steps have no one-step inverse; the trajectory instead runs on Euler steps of the
          same flow (`sampling.sampler`). `Trajectory.adapter` is then a twin of the loaded pipeline
          (every module shared, nothing copied, the loaded pipeline left as it was) with that
          scheduler, so `regenerate`, `record` and `transport.transport` (through the record's
          adapter) all generate with it; `Trajectory.sampler` says so. A SanaPipeline already on
          FlowMatchEulerDiscreteScheduler runs as is.
pixart    ddpm; noise only: PixArt-Sigma predicts DDPM noise (DPM-Solver), so there is no flow ODE to
          run backwards (`invert` refuses, naming `trajectory="noise"`). Step i sits at the noise
          level of the timestep t_i its transformer is given, x_i = sqrt(abar_{t_i}) x_N +
          sqrt(1 - abar_{t_i}) eps (the scheduler's `add_noise`; `Trajectory.sigmas` holds
          sqrt(1 - abar_{t_i}), `sampling.levels`), and the generation starts at x_0, not at eps
          (abar_{t_0} > 0): `Trajectory.noise` is x_0, `Trajectory.eps` the eps.
========  =================================================================================

`default_method(adapter)` is "invert" where the family can invert, else "noise".

References are (H, W, 3) RGB images (PIL images, paths, uint8 arrays or floats in [0, 1]) of the
generation's size; anything else is refused with what is allowed, and resized or converted only
with `resize=True`. The default prompt is the empty (unconditional) one: a reference needs no caption.

What this is not: an editing method with tuned inversion tricks (no null-text optimisation, no
RF-Inversion controller, no inversion of DPM-Solver's multistep updates), nor an inversion of
PixArt's DDPM sampler (DDIM inversion would be one; noising is what it gets here).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mabook import sampling, transport
from mabook.images import to_uint8
from mabook.models import INVERTIBLE, Adapter
from mabook.sampling import NOISABLE

METHODS = ("invert", "noise")
FAMILIES = INVERTIBLE  # the families `invert` supports: trained on the flow path (the Family table says which)
PIPE_KWARGS = ("height", "width", "guidance_scale", "max_sequence_length",  # what invert/noise pass on
               "use_resolution_binning")  # PixArt / SANA: for the regenerations' pipeline calls
_PIPELINE_MULTIPLE = {"sana": 32, "pixart": 8}  # what SanaPipeline / PixArtSigmaPipeline.check_inputs demand of a size


# ---------------------------------------------------------------------------------------------
# 1. Reference images: checked, never silently fixed
# ---------------------------------------------------------------------------------------------


def _check_family(adapter: Adapter, method: str = "noise") -> None:
    """Refuse, in one line, a family `method` does not support, or an adapter without a pipeline
    (`sampling.check_family`; `noise` supports every family, `NOISABLE`)."""
    name = adapter.family.name
    if method == "invert" and name in NOISABLE and name not in FAMILIES:
        raise ValueError(f"{name} cannot be inverted: inversion runs a flow-matching ODE backwards, and {name} predicts "
                         f"DDPM noise; noising works (trajectory 'noise': --trajectory noise, inversion.noise); "
                         f"invertible families: {list(FAMILIES)}")
    sampling.check_family(adapter)


def default_method(adapter: Adapter) -> str:
    """The trajectory a reference gets by default: "invert" where the family can invert, else "noise" (PixArt)."""
    _check_family(adapter)
    return "invert" if adapter.family.name in FAMILIES else "noise"


def image_size(adapter: Adapter, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels of a generation: the organism's 32 x 32, else the pipeline's default
    (or the given) size, which must be a multiple of the pixels per token."""
    _check_family(adapter)
    pipe = adapter.pipe
    if adapter.family.name == "organism":
        adapter.grid(height, width)  # raises on anything but the organism's size
        size = pipe.organism_config.image_size
        return size, size
    name, scale = adapter.family.name, int(pipe.vae_scale_factor)
    per_token = scale * (2 if name == "flux" else int(adapter.transformer.config.patch_size))
    multiple = math.lcm(per_token, _PIPELINE_MULTIPLE.get(name, 1))
    if name in ("flux", "sd3"):
        default = int(pipe.default_sample_size) * scale
    else:  # PixArt: the transformer's sample_size; SANA's call says 1024 (its own default, when it is one)
        given = inspect.signature(pipe.__call__).parameters.get("height")
        default = (given.default if given is not None and isinstance(given.default, int)
                   else int(adapter.transformer.config.sample_size) * scale)
    height, width = height or default, width or default
    if height % multiple or width % multiple:
        what = "one token" if multiple == per_token else f"one token, and {type(pipe).__name__} needs multiples of " \
                                                         f"{_PIPELINE_MULTIPLE[name]}"
        raise ValueError(f"height and width must be multiples of {multiple} pixels ({what}), got {height}x{width}")
    return height, width


def _as_array(image, index: int, size: tuple[int, int], resize: bool) -> np.ndarray:
    """One reference -> (H, W, 3) float32 in [0, 1]."""
    H, W = size
    what = f"reference image {index}"
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
        image = Image.open(path)
        image.load()
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            if not resize:
                raise ValueError(f"{what} has mode {image.mode!r}; allowed: 'RGB' (pass resize=True to convert it)")
            image = image.convert("RGB")
        array = np.asarray(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if array.ndim != 3 or array.shape[-1] != 3:
            if not resize or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 4)):
                raise ValueError(f"{what} has shape {array.shape}; allowed: (height, width, 3) RGB"
                                 + (" (pass resize=True to convert gray or RGBA)" if array.ndim in (2, 3) else ""))
            array = np.asarray(Image.fromarray(_to_uint8(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1
                                                         else array, what)).convert("RGB"))
    else:
        raise TypeError(f"{what} must be a PIL image, a path or an (H, W, 3) array, got {type(image).__name__}")
    if array.shape[:2] != (H, W):
        if not resize:
            raise ValueError(f"{what} is {array.shape[1]}x{array.shape[0]} (width x height); allowed: {W}x{H} for this "
                             "generation (pass resize=True to resize it)")
        array = np.asarray(Image.fromarray(_to_uint8(array, what)).resize((W, H), Image.BICUBIC))
    return _to_unit(array, what)


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; floats checked to lie in [0, 1] (`_to_unit`), then `images.to_uint8`."""
    return to_uint8(array if array.dtype == np.uint8 else _to_unit(array, what))


def _to_unit(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} has dtype {array.dtype}; allowed: uint8, or floats in [0, 1]")
    if array.size and (np.nanmin(array) < 0 or np.nanmax(array) > 1 or np.isnan(array).any()):
        raise ValueError(f"{what} has values in [{np.nanmin(array):.3g}, {np.nanmax(array):.3g}]; float images must lie in [0, 1]")
    return array.astype(np.float32)


def check_references(adapter: Adapter, images, resize: bool = False, height: int | None = None,
                     width: int | None = None) -> np.ndarray:
    """References -> (B, H, W, 3) float32 in [0, 1] at the generation's size.

    images: one image or a list; an image is a PIL image, a path, an (H, W, 3) uint8 array or floats
    in [0, 1] (a (B, H, W, 3) array is a batch). Wrong size or mode is an error unless resize=True."""
    size = image_size(adapter, height, width)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no reference images given")
    return np.stack([_as_array(im, i, size, resize) for i, im in enumerate(images)])


# ---------------------------------------------------------------------------------------------
# 2. Trajectories: inversion and noising
# ---------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """References on the pipeline's schedule: clean latents x_N and the start x_0.

    `noise` is what the pipeline's `latents=` takes to (re)start the trajectory: the inverted noise,
    or noising's start x_0 (the flow path: its eps, sigma_0 = 1; PixArt's: `sampling.level(clean, eps, sigmas[0])`).
    images: the references (B, H, W, 3) in [0, 1]. adapter: the one whose pipeline runs the trajectory
    (SANA on its DPM-Solver: the Euler twin, `sampler`)."""

    adapter: Adapter
    method: str  # "invert" or "noise"
    images: np.ndarray
    clean: torch.Tensor  # (B, *latent shape) float32: the references' latents
    noise: torch.Tensor  # (B, *latent shape) float32
    prompt: str
    num_inference_steps: int
    sigmas: torch.Tensor  # (N + 1,) eps's coefficient at each step (flow: the scheduler's sigmas), sigma_N = 0
    seeds: list[int]  # noising: eps's seed per reference; inversion: 0 (unused)
    pipe_kwargs: dict = field(default_factory=dict)
    residuals: np.ndarray | None = None  # inversion: (N, B) relative forward residual per step (NaN: plain)
    evaluations: int = 0  # transformer calls the inversion made (per batch of references, summed)
    eps: torch.Tensor | None = None  # noising: (B, *latent shape) the fixed eps; inversion: None
    timesteps: torch.Tensor | None = None  # (N,) the timestep each step's transformer call is given
    sampler: str = ""  # the scheduler the trajectory runs on (and says when it is not the pipeline's own)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def path(self) -> str:
        """"flow" or "ddpm": the family's noising path (`Family.path`), what `sigmas` are coefficients of."""
        return self.adapter.family.path

    def point(self, step: int) -> torch.Tensor:
        """Noising: x_step, (B, *latent shape), for step in 0..N (N: the clean latents)."""
        if self.method != "noise":
            raise ValueError(f"point() is the noising path; this trajectory is {self.method!r} (its points are the "
                             "regeneration's)")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= self.num_inference_steps:
            raise ValueError(f"step must be an int in 0..{self.num_inference_steps}, got {step!r}")
        return sampling.level(self.clean, self.eps, self.sigmas[int(step)], self.path)


def _check_common(adapter: Adapter, images, prompt, num_inference_steps, resize, pipe_kwargs, method: str):
    _check_family(adapter, method)
    unknown = sorted(set(pipe_kwargs) - set(PIPE_KWARGS))
    if unknown:
        raise ValueError(f"unknown pipeline argument(s) {unknown}; allowed: {list(PIPE_KWARGS)}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str ('' = unconditional), got {type(prompt).__name__}")
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    return check_references(adapter, images, resize, pipe_kwargs.get("height"), pipe_kwargs.get("width"))


def _invert_step(v, x: torch.Tensor, t, dt, iterations: int, relaxation: float, tolerance: float):
    """x_i from x_{i+1} = x: (x_i, relative residual per sample, transformer calls)."""
    B = x.shape[0]
    scale = x.reshape(B, -1).norm(dim=1).clamp_min(1e-12)
    guess = x - dt * v(x, t)  # the plain inversion: v at x_{i+1}
    if iterations == 0:
        return guess, torch.full((B,), float("nan")), 1
    best, best_r = guess, torch.full((B,), float("inf"), device=x.device)
    calls = 1
    for _ in range(iterations):
        new = x - dt * v(guess, t)
        calls += 1
        r = (new - guess).reshape(B, -1).norm(dim=1) / scale  # = |guess + dt v(guess) - x| / |x|: forward miss
        better = r < best_r
        best = torch.where(better.reshape(B, *[1] * (x.dim() - 1)), guess, best)
        best_r = torch.where(better, r, best_r)
        done = best_r < tolerance
        if bool(done.all()):
            break
        # a solved sample keeps its guess while the others iterate: its result does not depend on its batch-mates
        guess = torch.where(done.reshape(B, *[1] * (x.dim() - 1)), guess, guess + relaxation * (new - guess))
    return best, best_r.cpu(), calls


def invert(adapter: Adapter, images, prompt: str = "", num_inference_steps: int = 20, fixed_point_iterations: int = 20,
           relaxation: float = 0.3, tolerance: float = 1e-3, batch_size: int = 16, resize: bool = False,
           **pipe_kwargs) -> Trajectory:
    """Euler inversion of the references on the pipeline's schedule -> Trajectory(method="invert").

    Flow families only (organism, FLUX, SD3, SANA -- SANA on Euler steps of its flow, module
    docstring); PixArt is refused, naming `noise`. prompt: '' (default, unconditional) or a caption;
    guidance as the pipeline's default (or guidance_scale=). fixed_point_iterations: at most this
    many relaxed fixed-point iterations per step (0: the plain inversion); relaxation: the step of
    each (undamped iterations cycle at high noise on the organism); tolerance: stop once every
    reference's relative forward residual is below it (a solved reference keeps its solution while
    the rest of its batch iterates, so its result does not depend on its batch-mates). pipe_kwargs: height, width, guidance_scale,
    max_sequence_length. Cost: between 2 and 1 + fixed_point_iterations transformer calls per step
    and batch (`Trajectory.evaluations`)."""
    refs = _check_common(adapter, images, prompt, num_inference_steps, resize, pipe_kwargs, "invert")
    if not isinstance(fixed_point_iterations, int) or isinstance(fixed_point_iterations, bool) or fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations must be an int >= 0, got {fixed_point_iterations!r}")
    if isinstance(relaxation, bool) or not isinstance(relaxation, (int, float)) or not 0 < relaxation <= 1:
        raise ValueError(f"relaxation must be a number in (0, 1], got {relaxation!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    sampler, which = sampling.sampler(adapter)
    height, width = pipe_kwargs.get("height"), pipe_kwargs.get("width")
    guidance = float(pipe_kwargs.get("guidance_scale", sampling.default_guidance_scale(sampler)))
    timesteps, sigmas = sampling.schedule(sampler, num_inference_steps, height, width)
    clean = sampling.encode(sampler, refs)
    noise, residuals, calls = [], np.full((num_inference_steps, len(refs)), np.nan), 0
    for start in range(0, len(refs), batch_size):
        x = clean[start:start + batch_size]
        v = sampling.velocity(sampler, prompt, len(x), guidance, height, width, pipe_kwargs.get("max_sequence_length"))
        for i in reversed(range(num_inference_steps)):  # from sigma_N = 0 back to sigma_0 = 1
            dt = sigmas[i + 1] - sigmas[i]  # < 0, as in the scheduler's step
            x, r, n = _invert_step(v, x, timesteps[i], dt, fixed_point_iterations, float(relaxation), float(tolerance))
            residuals[i, start:start + len(x)] = r.numpy()
            calls += n
        noise.append(x)
    return Trajectory(sampler, "invert", refs, clean, torch.cat(noise), prompt, num_inference_steps, sigmas.cpu(),
                      [0] * len(refs), dict(pipe_kwargs), residuals, calls, timesteps=timesteps.cpu(), sampler=which)


def noise(adapter: Adapter, images, seeds: Sequence[int] | int = 0, prompt: str = "", num_inference_steps: int = 20,
          resize: bool = False, **pipe_kwargs) -> Trajectory:
    """Noising to each step's level -> Trajectory(method="noise"): eps ~ N(0, I) from each reference's
    seed (a list, one per reference, or one int for all), step i at `sampling.level(clean, eps, sigmas[i], path)`
    (`Trajectory.point(i)`): the flow path `sampling.at_level(clean, eps, sigma_i)`, or PixArt's DDPM
    q(x_t | x_0) at the timestep t_i of step i. Every family."""
    refs = _check_common(adapter, images, prompt, num_inference_steps, resize, pipe_kwargs, "noise")
    one = isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool)
    seeds = [int(seeds)] * len(refs) if one else list(seeds) if isinstance(seeds, (list, tuple, np.ndarray)) else seeds
    if (not isinstance(seeds, list) or len(seeds) != len(refs)
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ValueError(f"seeds must be one non-negative int per reference ({len(refs)}) or one int, got {seeds!r}")
    sampler, which = sampling.sampler(adapter)
    timesteps, sigmas = sampling.schedule(sampler, num_inference_steps, pipe_kwargs.get("height"), pipe_kwargs.get("width"))
    levels = sampling.levels(sampler, timesteps, sigmas)
    clean = sampling.encode(sampler, refs)
    eps = torch.cat([torch.randn((1, *clean.shape[1:]), generator=torch.Generator("cpu").manual_seed(int(s)))
                     for s in seeds]).to(clean.device)
    start = eps if sampler.family.path == "flow" else sampling.level(clean, eps, levels[0], "ddpm")  # flow: sigma_0 = 1
    return Trajectory(sampler, "noise", refs, clean, start, prompt, num_inference_steps, levels,
                      [int(s) for s in seeds], dict(pipe_kwargs), eps=eps, timesteps=timesteps.cpu(), sampler=which)


# 3. Reconstruction and recording
# ---------------------------------------------------------------------------------------------


def regenerate(traj: Trajectory, prompt: str | None = None, batch_size: int = 16, **pipe_kwargs) -> np.ndarray:
    """(B, H, W, 3): the pipeline run from the trajectory's noise (default: with its prompt), unedited.
    For an inversion this is the reconstruction; for noising, a fresh generation from eps."""
    pipe = traj.adapter.pipe
    prompt = traj.prompt if prompt is None else prompt
    out = []
    for start in range(0, len(traj), batch_size):
        latents = traj.noise[start:start + batch_size]
        kwargs = traj.adapter.call_kwargs({**traj.pipe_kwargs, **pipe_kwargs, "latents": latents})
        images = pipe([prompt] * len(latents), num_inference_steps=traj.num_inference_steps, output_type="np",
                      **kwargs).images
        out.append(images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images))
    return np.concatenate(out).astype(np.float32)


def path_residuals(traj: Trajectory, batch_size: int = 16) -> np.ndarray:
    """(N, B): how far the model's own Euler step from each point of the trajectory lands from the
    next point, relative to it: |x_i + (sigma_{i+1} - sigma_i) v(x_i, t_i) - x_{i+1}| / |x_{i+1}|.
    Inversion: its solve's residuals (`Trajectory.residuals`, NaN for the plain inversion); noising:
    computed here at x_i = sampling.at_level(clean, eps, sigma_i), with the trajectory's prompt -- a path the
    model would follow has residuals near 0. Flow families only (PixArt's sampler is not an Euler
    step on a velocity: refused)."""
    if traj.method == "invert":
        return traj.residuals
    if traj.path != "flow":
        raise ValueError(f"path_residuals measures the flow-matching Euler step; {traj.adapter.family.name} predicts DDPM "
                         f"noise; allowed families: {list(FAMILIES)}")
    adapter, N = traj.adapter, traj.num_inference_steps
    kwargs = traj.pipe_kwargs
    timesteps, sigmas = sampling.schedule(adapter, N, kwargs.get("height"), kwargs.get("width"))
    guidance = float(kwargs.get("guidance_scale", sampling.default_guidance_scale(adapter)))
    out = np.zeros((N, len(traj)))
    for start in range(0, len(traj), batch_size):
        clean = traj.clean[start:start + batch_size]
        eps = (traj.noise if traj.eps is None else traj.eps)[start:start + batch_size]
        v = sampling.velocity(adapter, traj.prompt, len(clean), guidance, kwargs.get("height"), kwargs.get("width"),
                      kwargs.get("max_sequence_length"))
        for i in range(N):
            x, x_next = sampling.at_level(clean, eps, sigmas[i]), sampling.at_level(clean, eps, sigmas[i + 1])
            miss = x + (sigmas[i + 1] - sigmas[i]) * v(x, timesteps[i]) - x_next
            out[i, start:start + len(clean)] = (miss.reshape(len(clean), -1).norm(dim=1)
                                                / x_next.reshape(len(clean), -1).norm(dim=1).clamp_min(1e-12)).cpu().numpy()
    return out


def pixel_error(images: np.ndarray, references: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: mean |difference|, MSE, max |difference| and PSNR (dB) of images in [0, 1]."""
    images, references = np.asarray(images, np.float64), np.asarray(references, np.float64)
    if images.shape != references.shape:
        raise ValueError(f"images {images.shape} and references {references.shape} differ in shape")
    d = images - references
    axes = tuple(range(1, d.ndim))
    mse = (d ** 2).mean(axes)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10 * np.log10(1 / np.maximum(mse, 1e-300)), np.inf)
    return {"mae": np.abs(d).mean(axes), "mse": mse, "max": np.abs(d).max(axes), "psnr": psnr}


def record(traj: Trajectory, taps: Sequence[str] | None = None, steps: Sequence[int] | None = None, channels=None,
           token_mask=None, batch_size: int = 16, captions: Sequence[str] | None = None,
           conditioning: bool | None = None, max_bytes: int | None = None) -> transport.Record:
    """Record the references' channels along their trajectory (`transport.record` with `latents`).

    Inversion: the pipeline regenerates from the inverted noise with the trajectory's prompt (the
    record's images are the reconstructions). Noising: the same call under `sampling.noising_scheduler`
    (the record's images are the references, through the VAE). The record's adapter is the
    trajectory's (SANA on its DPM-Solver: the Euler twin), so `transport.transport` generates the
    targets with the same scheduler. captions: what each reference shows,
    if known (shapes-world captions): they become the record's unit labels, so the transport table
    judges whether outputs took the reference's attributes; the generation still uses the prompt.
    conditioning: also keep the AdaLN conditioning (`transport.record`'s default: with channels "all").
    channels and max_bytes: as `transport.record` (channels required; "all" on a model other than
    the organism needs max_bytes)."""
    if traj.method not in METHODS:
        raise ValueError(f"unknown method {traj.method!r}; allowed: {list(METHODS)}")
    if captions is not None and (isinstance(captions, str) or len(captions) != len(traj)):
        raise ValueError(f"captions must be a list of one str per reference ({len(traj)}), got {captions!r:.80}")
    args = dict(taps=taps, steps=steps, channels=channels, token_mask=token_mask, conditioning=conditioning,
                num_inference_steps=traj.num_inference_steps, batch_size=batch_size, latents=traj.noise,
                max_bytes=max_bytes, **traj.pipe_kwargs)
    prompts = [traj.prompt] * len(traj)
    if traj.method == "invert":
        rec = transport.record(traj.adapter, prompts, [0], **args)
    else:
        with sampling.noising_scheduler(traj.adapter, traj.clean, traj.noise if traj.eps is None else traj.eps, traj.sigmas):
            rec = transport.record(traj.adapter, prompts, [0], **args)
    labels = list(captions) if captions is not None else prompts
    rec.units = [(label, seed) for label, seed in zip(labels, traj.seeds)]
    return rec
