"""The model organism: a miniature FLUX trained on the shapes world.

It is the real diffusers `FluxTransformer2DModel` (double-stream and single-stream blocks, RoPE,
AdaLN-Zero modulation), only with fewer and narrower blocks, plus a small `transformers`
`CLIPTextModel` with a word-level tokenizer. As in FLUX.1 the text encoder gives a token sequence
(joint attention, `encoder_hidden_states`) and a pooled vector (the AdaLN conditioning,
`pooled_projections`). Unlike FLUX.1 there is no VAE: the model denoises 4x4-pixel patches
directly, so a 32x32 image is an 8x8 grid of 48-channel tokens.

What this is not: a general text-to-image model. It knows 26 words (`mabook.world.vocabulary`).

Entry points: `load()` returns an `OrganismPipeline` from the committed, hash-checked checkpoint;
`python -m mabook.train` reproduces it; `python -m mabook.evaluate` scores it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import Timesteps
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from mabook import world
from mabook.files import atomic_path, write_json
from mabook.images import to_uint8  # noqa: F401  (re-exported: organism.to_uint8 is how the chapters name it)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
CHECKPOINT = CHECKPOINT_DIR / "organism.safetensors"
DEFAULT_GUIDANCE_SCALE = 4.0  # classifier-free guidance; the organism was trained with 10% caption dropout
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")  # EOS id 3: CLIP pools at the first EOS
MLPS = ("gelu", "swiglu")  # FLUX's MLP (tanh-GELU), or a gated one


@dataclass
class OrganismConfig:
    """Architecture of the organism; saved inside the checkpoint's metadata."""

    image_size: int = world.IMAGE_SIZE
    patch_size: int = 4  # 4x4 pixels per token: 8x8 tokens, a large object spans ~4x4 tokens
    num_layers: int = 4  # double-stream (MMDiT) blocks; FLUX.1 has 19
    num_single_layers: int = 4  # single-stream blocks; FLUX.1 has 38
    attention_head_dim: int = 32  # FLUX.1: 128
    num_attention_heads: int = 4  # inner dim 128; FLUX.1: 24 heads -> 3072
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # (text-index, row, col); sums to head dim
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_length: int = 32  # captions are <= 23 tokens: the rest is padding, as in FLUX's T5
    # Counterfactual organisms (chapter "Where do massive activations come from?"); the defaults are FLUX's.
    timestep_conditioning: bool = True  # False: the AdaLN always sees t = CONSTANT_TIMESTEP (noise level only in the input)
    norm_affine: bool = False  # True: every LayerNorm gets a learnable scale and bias (explicit constants to use)
    mlp: str = "gelu"  # "swiglu": gated MLPs (a * silu(b), the Spike paper's quadratic amplifier), parameter-matched

    def __post_init__(self):
        if self.mlp not in MLPS:
            raise ValueError(f"OrganismConfig.mlp={self.mlp!r}: expected one of {', '.join(MLPS)}")

    @property
    def in_channels(self) -> int:
        return 3 * self.patch_size**2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def build_tokenizer(config: OrganismConfig = OrganismConfig()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's vocabulary, built offline with `tokenizers`."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in world.vocabulary():
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=config.max_text_length,
    )


def build_text_encoder(config: OrganismConfig = OrganismConfig()) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(SPECIAL_TOKENS) + len(world.vocabulary()),
            hidden_size=config.text_hidden_size,
            intermediate_size=4 * config.text_hidden_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_text_length,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )


CONSTANT_TIMESTEP = 500.0  # t = 0.5 in FLUX's 0-1000 timestep units: what a timestep-free organism always sees


class ConstantTimesteps(Timesteps):
    """FLUX's sinusoidal timestep projection, fed one constant instead of the timestep: the AdaLN
    modulation then depends on the prompt only (the organism must read the noise level from its input)."""

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.full_like(timesteps, CONSTANT_TIMESTEP))


def _affine_norms(module: torch.nn.Module) -> None:
    """Replace every LayerNorm without parameters by one with a learnable scale (ones) and bias (zeros):
    the same function at initialisation, but constants the model can learn instead of making them."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.LayerNorm) and not child.elementwise_affine:
            setattr(module, name, torch.nn.LayerNorm(child.normalized_shape, eps=child.eps, elementwise_affine=True))
        else:
            _affine_norms(child)


class SwiGLU(torch.nn.Module):
    """The gate of a gated MLP: the input's two halves a, b -> a * silu(b) (Shazeer 2020; LLaMA).
    A product of two linear maps of the same token grows quadratically with it: the Spike paper's
    "quadratic amplifier" (arXiv 2603.05498)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return a * torch.nn.functional.silu(b)


def gated_width(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of a gated MLP with the parameters of an ungated one of ratio `mlp_ratio`
    (LLaMA's 2/3 rule: 3 matrices of width h ~ 2 of width 4*dim)."""
    return int(2 * mlp_ratio * dim / 3)


def _gated_mlps(transformer: FluxTransformer2DModel) -> None:
    """Every MLP of `transformer` becomes a SwiGLU one of (about) the same parameter count."""
    dim = transformer.inner_dim
    hidden = gated_width(dim)
    for block in transformer.transformer_blocks:
        block.ff = FeedForward(dim, dim_out=dim, activation_fn="swiglu", inner_dim=hidden)
        block.ff_context = FeedForward(dim, dim_out=dim, activation_fn="swiglu", inner_dim=hidden)
    for block in transformer.single_transformer_blocks:
        block.mlp_hidden_dim = hidden
        block.proj_mlp = torch.nn.Linear(dim, 2 * hidden)
        block.act_mlp = SwiGLU()
        block.proj_out = torch.nn.Linear(dim + hidden, dim)


def build_transformer(config: OrganismConfig = OrganismConfig()) -> FluxTransformer2DModel:
    transformer = _flux_transformer(config)
    if not config.timestep_conditioning:
        old = transformer.time_text_embed.time_proj
        transformer.time_text_embed.time_proj = ConstantTimesteps(old.num_channels, old.flip_sin_to_cos,
                                                                  old.downscale_freq_shift, old.scale)
    if config.norm_affine:
        _affine_norms(transformer)
    if config.mlp == "swiglu":
        _gated_mlps(transformer)
    return transformer


def _flux_transformer(config: OrganismConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,  # patching is done by the pipeline (pixels -> tokens), as FLUX packs latents
        in_channels=config.in_channels,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_hidden_size,
        pooled_projection_dim=config.text_hidden_size,
        guidance_embeds=False,
        axes_dims_rope=tuple(config.axes_dims_rope),
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # shift=1: the images are tiny, so no resolution-dependent shift as in FLUX.1's pipeline.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch_size, 3, H, W) -> (batch_size, (H/p)*(W/p), 3*p*p), row-major tokens."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid: int) -> torch.Tensor:
    """(batch_size, grid*grid, 3*p*p) -> (batch_size, 3, grid*p, grid*p)."""
    B, N, D = tokens.shape
    p = patch_size
    x = tokens.reshape(B, grid, grid, 3, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, 3, grid * p, grid * p)


def image_ids(grid: int, device=None) -> torch.Tensor:
    """FLUX's positional ids for image tokens: (grid*grid, 3) = (0, row, col)."""
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid)[:, None]
    ids[..., 2] = torch.arange(grid)[None, :]
    return ids.reshape(grid * grid, 3).to(device)


def velocity(pipe, xt: torch.Tensor, captions: list[str], t: torch.Tensor) -> torch.Tensor:
    """One transformer call outside the sampler: the predicted velocity for tokens `xt`
    (batch_size, grid*grid, in_channels) of `captions` at timesteps `t` (batch_size,) in [0, 1]
    (no guidance). Training calls it; so do experiments that feed the AdaLN another timestep than
    the input's noise level (`mabook.origins`)."""
    cfg = pipe.organism_config
    prompt_embeds, pooled = pipe.encode_prompt(captions)
    return pipe.transformer(
        hidden_states=xt,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=t,
        img_ids=image_ids(cfg.grid, xt.device),
        txt_ids=torch.zeros(cfg.max_text_length, 3, device=xt.device),
        return_dict=False,
    )[0]


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


class OrganismPipeline(DiffusionPipeline):
    """Text-to-image pipeline with FLUX's call shape: `pipe(prompt, num_inference_steps=…, generator=…)`.

    Classifier-free guidance runs the conditional and unconditional ("") prompts as one batch
    of 2*batch_size: the unconditional half comes first (as in diffusers' SD3 pipeline).

    Instead of `prompt`, the text can come as embeddings (diffusers' names, e.g. interpolated
    between two prompts): `prompt_embeds` (batch_size, max_text_length, text_hidden_size) and
    `pooled_prompt_embeds` (batch_size, text_hidden_size), as `encode_prompt` returns them; the
    unconditional half is still the encoded empty prompt.
    """

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, organism_config: OrganismConfig | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.organism_config = organism_config or OrganismConfig()
        self._guidance_scale = DEFAULT_GUIDANCE_SCALE  # the last (or, before any, the default) call's

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True if the current (or last, or by default the next) call batches [uncond; cond]; diffusers' name."""
        return self._guidance_scale > 1.0

    @property
    def grid(self) -> tuple[int, int]:
        g = self.organism_config.grid
        return g, g

    def encode_prompt(self, prompt: list[str]):
        """-> (prompt_embeds (B, max_text_length, D), pooled_prompt_embeds (B, D))."""
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.organism_config.max_text_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)
        out = self.text_encoder(ids)
        dtype = self.transformer.dtype
        return out.last_hidden_state.to(dtype), out.pooler_output.to(dtype)

    def check_embeds(self, prompt_embeds, pooled_prompt_embeds) -> None:
        """Raise unless the two are tensors shaped as `encode_prompt` returns them, with one batch size."""
        cfg = self.organism_config
        if not isinstance(prompt_embeds, torch.Tensor) or not isinstance(pooled_prompt_embeds, torch.Tensor):
            raise TypeError(f"prompt_embeds and pooled_prompt_embeds must both be tensors, got "
                            f"{type(prompt_embeds).__name__} and {type(pooled_prompt_embeds).__name__}")
        tokens, width = cfg.max_text_length, cfg.text_hidden_size
        if prompt_embeds.dim() != 3 or tuple(prompt_embeds.shape[1:]) != (tokens, width) or not len(prompt_embeds):
            raise ValueError(f"prompt_embeds has shape {tuple(prompt_embeds.shape)}; expected (batch_size, {tokens}, {width})")
        if tuple(pooled_prompt_embeds.shape) != (prompt_embeds.shape[0], width):
            raise ValueError(f"pooled_prompt_embeds has shape {tuple(pooled_prompt_embeds.shape)}; expected "
                             f"(batch_size, {width}) with the batch_size of prompt_embeds ({prompt_embeds.shape[0]})")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        prompt = self._check_call(prompt, num_inference_steps, output_type, prompt_embeds, pooled_prompt_embeds)
        self._guidance_scale = guidance_scale  # read by probes through do_classifier_free_guidance
        prompt_embeds, pooled, batch_size = self._text_condition(prompt, prompt_embeds, pooled_prompt_embeds,
                                                                 num_images_per_prompt)
        latents = self._initial_latents(batch_size, generator, latents)
        latents = self._denoise(latents, prompt_embeds, pooled, num_inference_steps, guidance_scale)
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _check_call(self, prompt, num_inference_steps, output_type, prompt_embeds, pooled_prompt_embeds) -> list[str] | None:
        """Raise on arguments `__call__` cannot use; the prompt as a list of str (None with embeddings)."""
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass prompt, or prompt_embeds with pooled_prompt_embeds")
        if prompt is not None and (prompt_embeds is not None or pooled_prompt_embeds is not None):
            raise ValueError("pass either prompt or prompt_embeds/pooled_prompt_embeds, not both")
        if prompt is None:
            self.check_embeds(prompt_embeds, pooled_prompt_embeds)
        else:
            if isinstance(prompt, str):
                prompt = [prompt]
            if not isinstance(prompt, list) or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        return prompt

    def _text_condition(self, prompt, prompt_embeds, pooled_prompt_embeds, num_images_per_prompt: int):
        """(prompt_embeds, pooled, batch_size) for the transformer: each prompt `num_images_per_prompt`
        times (batch_size images), and with classifier-free guidance the encoded empty prompt first
        ([uncond; cond], 2 * batch_size rows)."""
        device, dtype = self.transformer.device, self.transformer.dtype
        if prompt is not None:
            prompt = [p for p in prompt for _ in range(num_images_per_prompt)]
            prompt_embeds, pooled = self.encode_prompt(prompt)
        else:
            prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
            pooled = pooled_prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        batch_size = prompt_embeds.shape[0]
        if self.do_classifier_free_guidance:
            neg_embeds, neg_pooled = self.encode_prompt([""] * batch_size)
            prompt_embeds = torch.cat([neg_embeds, prompt_embeds])
            pooled = torch.cat([neg_pooled, pooled])
        return prompt_embeds, pooled, batch_size

    def _initial_latents(self, batch_size: int, generator, latents: torch.Tensor | None) -> torch.Tensor:
        """Gaussian noise in patch space (batch_size, grid*grid, in_channels), float32 on the transformer's
        device; or the given `latents`, checked."""
        cfg = self.organism_config
        shape = (batch_size, cfg.grid * cfg.grid, cfg.in_channels)
        if isinstance(generator, list):  # one generator per image, as in diffusers: noise independent of batching
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image "
                                 "(len(prompt) * num_images_per_prompt) or a single generator")
            if latents is None:
                latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device=self.transformer.device, dtype=torch.float32)

    def _denoise(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                 num_inference_steps: int, guidance_scale: float) -> torch.Tensor:
        """The sampling loop, sigma from 1 to 1/N as in FLUX.1's pipeline: one transformer call per
        step (a classifier-free guidance batch is one call)."""
        cfg, do_cfg = self.organism_config, self.do_classifier_free_guidance
        device, dtype = self.transformer.device, self.transformer.dtype
        img_ids = image_ids(cfg.grid, device).to(dtype)
        txt_ids = torch.zeros(cfg.max_text_length, 3, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            timestep = (t / 1000).expand(model_input.shape[0]).to(dtype)
            noise_pred = self.transformer(
                hidden_states=model_input.to(dtype),
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0].float()
            if do_cfg:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str):
        """Tokens -> images in [0, 1]: (B, 3, H, W) for "pt", (B, H, W, 3) floats for "np", PIL for "pil"."""
        cfg = self.organism_config
        images = unpatchify(latents, cfg.patch_size, cfg.grid).clamp(-1, 1)
        images = (images + 1) / 2  # (B, 3, H, W) in [0, 1]
        if output_type == "np" or output_type == "pil":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return images


def build_pipeline(config: OrganismConfig = OrganismConfig()) -> OrganismPipeline:
    """A randomly initialised organism (what training starts from)."""
    return OrganismPipeline(
        transformer=build_transformer(config),
        text_encoder=build_text_encoder(config),
        tokenizer=build_tokenizer(config),
        scheduler=build_scheduler(),
        organism_config=config,
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint: one safetensors file, hash recorded in a JSON card beside it
# ---------------------------------------------------------------------------------------------


class ChecksumError(ValueError):
    """The checkpoint file does not have the SHA-256 recorded in its card."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save(pipe: OrganismPipeline, path: Path, info: dict | None = None) -> str:
    """Write weights (fp16, to keep the file a few MB) and a card with config, info and SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().to(torch.float16).contiguous() for k, v in pipe.transformer.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v.detach().to(torch.float16).contiguous() for k, v in pipe.text_encoder.state_dict().items()}
    config = asdict(pipe.organism_config)
    with atomic_path(path) as tmp:  # an interrupted save leaves the previous checkpoint (or none), never half of one
        save_file(tensors, str(tmp), metadata={"organism_config": json.dumps(config)})
    digest = sha256(path)
    card = {"file": path.name, "sha256": digest, "organism_config": config, **(info or {})}
    write_json(card_path(path), card)
    return digest


def snapshots(path: str | Path | None = None) -> dict[int, Path]:
    """{training step: file} of the weight snapshots saved beside a checkpoint (`<stem>-step<N>.safetensors`),
    the checkpoint itself included at its final step; each loads with `load(file)` (hash-checked)."""
    path = Path(path) if path is not None else CHECKPOINT
    found = {}
    for file in sorted(path.parent.glob(f"{path.stem}-step*.safetensors")) + [path]:
        card = card_path(file)
        if file.is_file() and card.is_file():
            found[int(json.loads(card.read_text())["step"])] = file
    return dict(sorted(found.items()))


def load(path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> OrganismPipeline:
    """Load the organism from a safetensors checkpoint, verifying its SHA-256 first."""
    path = Path(path) if path is not None else CHECKPOINT
    card_file = card_path(path)
    if not path.is_file() or not card_file.is_file():
        raise FileNotFoundError(
            f"organism checkpoint not found: {path} (and its card {card_file.name}); "
            "train one with `python -m mabook.train`"
        )
    try:
        card = json.loads(card_file.read_text())
        recorded = card["sha256"]
        config = OrganismConfig(**{**card["organism_config"], "axes_dims_rope": tuple(card["organism_config"]["axes_dims_rope"])})
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"the checkpoint card {card_file} is corrupt ({type(e).__name__}: {e}); it must be the JSON "
                         "`organism.save` writes, with 'sha256' and 'organism_config'") from None
    digest = sha256(path)
    if digest != recorded:
        raise ChecksumError(f"{path} has SHA-256 {digest}, but its card records {recorded}: the file is corrupt or was replaced")
    pipe = build_pipeline(config)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError: a file whose card was written for it, yet unreadable
        raise ValueError(f"{path} is not a readable safetensors checkpoint ({e})") from None
    for prefix, module in (("transformer.", pipe.transformer), ("text_encoder.", pipe.text_encoder)):
        sub = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    pipe.card = card
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    # .to(dtype) only when asked: diffusers warns on any dtype cast through .to()
    return pipe.to(device=device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
