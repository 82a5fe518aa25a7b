"""mabook.models: every supported family loads through `mabook.load` and is probed end to end.

Each family is a tiny random-weight pipeline built from configs (tokenizers built offline),
saved with `save_pretrained`, loaded back by `mabook.load(dir)` and run for two denoising steps.
"""

import subprocess
import sys

import pytest
import tokenizers as tk
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

import mabook
from mabook import inversion, models, organism, probe, processors

torch.set_num_threads(1)
WORDS = ["[PAD]", "[UNK]", "[EOS]", "[BOS]", "a", "red", "circle"]
TEXT_LEN = 8


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    t = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   bos_token="[BOS]", model_max_length=TEXT_LEN)


def tiny_clip(projection: bool):
    config = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=TEXT_LEN, pad_token_id=0, bos_token_id=3,
                            eos_token_id=2, projection_dim=16)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_t5() -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0))


def tiny_vae(**kwargs) -> AutoencoderKL:
    # one block: vae_scale_factor 1, so the latent grid equals the pixel grid
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                         layers_per_block=1, **kwargs)


def tiny_flux(**transformer_kwargs):
    """Tiny FLUX; transformer_kwargs override the transformer's (e.g. a wider one)."""
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny_clip(False), tokenizer=tiny_tokenizer(), text_encoder_2=tiny_t5(), tokenizer_2=tiny_tokenizer(),
        transformer=FluxTransformer2DModel(**{**dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                     pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
                                              **transformer_kwargs}),
    )
    return pipe, dict(height=8, width=8, guidance_scale=1.0, max_sequence_length=TEXT_LEN)


def tiny_sd3(**transformer_kwargs):
    """Tiny SD3; transformer_kwargs add SD3.5's features (qk_norm, dual_attention_layers)."""
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny_clip(True), tokenizer=tiny_tokenizer(), text_encoder_2=tiny_clip(True),
        tokenizer_2=tiny_tokenizer(), text_encoder_3=tiny_t5(), tokenizer_3=tiny_tokenizer(),
        transformer=SD3Transformer2DModel(**{**dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                    caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                                    pos_embed_max_size=16), **transformer_kwargs}),
    )
    return pipe, dict(height=8, width=8, max_sequence_length=TEXT_LEN)


def tiny_pixart(**transformer_kwargs):
    pipe = PixArtSigmaPipeline(
        scheduler=DPMSolverMultistepScheduler(), vae=tiny_vae(), text_encoder=tiny_t5(), tokenizer=tiny_tokenizer(),
        transformer=PixArtTransformer2DModel(**{**dict(sample_size=8, num_layers=2, attention_head_dim=8,
                                                       num_attention_heads=2, in_channels=4, out_channels=8, patch_size=2,
                                                       cross_attention_dim=16, caption_channels=16,
                                                       norm_type="ada_norm_single", use_additional_conditions=False),
                                                **transformer_kwargs}),
    )
    return pipe, dict(height=8, width=8, max_sequence_length=TEXT_LEN, use_resolution_binning=False, clean_caption=False)


def tiny_sana(**transformer_kwargs):
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
                        decoder_act_fns="silu", scaling_factor=0.41)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, pad_token_id=0, bos_token_id=3, eos_token_id=2))
    pipe = SanaPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=SanaTransformer2DModel(**{**dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                                     attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                                                     cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                                     sample_size=8, patch_size=1), **transformer_kwargs}),
    )
    # SANA checks height % 32; the 2-level DC-AE halves it once: 32 px -> 16x16 tokens
    return pipe, dict(height=32, width=32, max_sequence_length=TEXT_LEN, use_resolution_binning=False,
                      complex_human_instruction=None)


# family -> (builder, expected taps, expected grid at the builder's size)
FAMILIES = {
    "flux": (tiny_flux, ["transformer_blocks.0.img", "transformer_blocks.0.txt", "single_transformer_blocks.0.img",
                         "single_transformer_blocks.0.txt", "single_transformer_blocks.1.img",
                         "single_transformer_blocks.1.txt"], (4, 4)),
    # SD3's last block is context_pre_only: no text output to tap
    "sd3": (tiny_sd3, ["transformer_blocks.0.img", "transformer_blocks.0.txt", "transformer_blocks.1.img"], (4, 4)),
    "pixart": (tiny_pixart, ["transformer_blocks.0.img", "transformer_blocks.1.img"], (4, 4)),
    "sana": (tiny_sana, ["transformer_blocks.0.img", "transformer_blocks.1.img"], (16, 16)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_saved_and_loaded_pipeline_is_probed(family, tmp_path):
    build, expected_taps, expected_grid = FAMILIES[family]
    torch.manual_seed(0)
    pipe, call = build()
    pipe.save_pretrained(tmp_path)

    loaded, adapter = mabook.load(tmp_path)

    assert adapter.family.name == family
    assert adapter.grid(call["height"], call["width"]) == expected_grid
    assert len(adapter.attention_modules()) >= len(adapter.blocks)
    with probe.collect(adapter, capture=[(expected_taps[0], 1)]) as run:
        loaded("a red circle", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0), **call)
    assert [str(t) for t in run.stats.taps] == expected_taps
    assert run.stats.steps == [0, 1]
    h, w = expected_grid
    # one image (the conditional half where the family batches guidance), h*w image tokens
    assert run.captured[(expected_taps[0], 1)].shape == (1, h * w, adapter.width)
    assert run.stats.get("abs_mean", expected_taps[0]).shape == (adapter.width,)


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_transformer_only_directory_loads_through_same_path(family, tmp_path):
    pipe, _ = FAMILIES[family][0]()
    pipe.transformer.save_pretrained(tmp_path)
    loaded, adapter = mabook.load(tmp_path)
    assert loaded is None
    assert adapter.family.name == family and len(adapter.blocks) == 2


def test_organism_adapter_matches_flux_layout():
    pipe = organism.build_pipeline()
    adapter = mabook.adapter_for(pipe)
    assert adapter.family.name == "organism"
    assert adapter.grid() == (8, 8)
    assert adapter.guidance_batch() is True
    assert adapter.width == 128
    assert [b.path for b in adapter.blocks][:1] == ["transformer_blocks.0"]
    assert [b.path for b in adapter.blocks][-1] == "single_transformer_blocks.3"


def test_the_family_table_holds_which_families_have_softmax_attention_invert_and_tokenize_their_text_keys():
    assert [f.attention for f in models.FAMILIES.values()] == ["softmax"] * 4 + ["linear"]  # SANA's is linear
    assert processors.SOFTMAX_FAMILIES == ("organism", "flux", "sd3", "pixart")
    assert models.INVERTIBLE == inversion.FAMILIES == ("organism", "flux", "sd3", "sana")  # SANA: on Euler steps of its flow
    assert {f.name: f.text_tokenizer for f in models.FAMILIES.values() if f.text_tokenizer} == {
        "organism": "tokenizer", "flux": "tokenizer_2"}


def test_text_tokenizer_is_the_one_whose_tokens_are_the_text_keys():
    pipe = organism.build_pipeline()
    tokenizer, max_length = mabook.adapter_for(pipe).text_tokenizer({})
    assert tokenizer is pipe.tokenizer and max_length == pipe.organism_config.max_text_length
    pipe, call = tiny_flux()
    adapter = mabook.adapter_for(pipe)
    tokenizer, max_length = adapter.text_tokenizer({"max_sequence_length": call["max_sequence_length"]})
    assert tokenizer is pipe.tokenizer_2 and max_length == TEXT_LEN  # T5's, padded to the call's max_sequence_length
    assert adapter.text_tokenizer({})[1] == 512  # FluxPipeline's default
    with pytest.raises(ValueError, match="bare transformer"):
        models.Adapter(adapter.family, pipe.transformer).text_tokenizer({})
    with pytest.raises(ValueError, match="'sd3' has no one tokenizer"):
        mabook.adapter_for(tiny_sd3()[0]).text_tokenizer({})


def test_load_organism_from_checkpoint_path(tmp_path):
    pipe = organism.build_pipeline()
    organism.save(pipe, tmp_path / "o.safetensors")
    loaded, adapter = mabook.load("organism", path=tmp_path / "o.safetensors")
    assert adapter.family.name == "organism" and loaded.transformer is adapter.transformer


def test_unsupported_model_error_lists_supported_families():
    with pytest.raises(models.UnsupportedModelError) as info:
        mabook.adapter_for(torch.nn.Linear(2, 2))
    for name in models.SUPPORTED:
        assert name in str(info.value)
    assert "Linear" in str(info.value)


def test_unsupported_transformer_directory_names_its_class(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(models.UnsupportedModelError, match="UNet2DConditionModel.*supported families"):
        mabook.load(tmp_path)


def test_load_rejects_wrong_types():
    with pytest.raises(TypeError, match="name_or_path"):
        mabook.load(42)


def test_import_mabook_stays_light():
    code = "import sys, mabook; print('diffusers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_cpu_offload_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cpu_offload=True.*device='cpu'"):
        mabook.load(tmp_path, device="cpu", cpu_offload=True)


# -- which samples are conditional, per family, with guidance on and off ----------------------------

GUIDANCE = {  # family -> pipeline kwargs that turn guidance on (flux: "true CFG", a separate call)
    "flux": dict(true_cfg_scale=3.0, negative_prompt="circle"),
    "sd3": dict(guidance_scale=5.0),
    "pixart": dict(guidance_scale=4.5),
    "sana": dict(guidance_scale=4.5),
}
NO_GUIDANCE = {"flux": {}, "sd3": dict(guidance_scale=1.0), "pixart": dict(guidance_scale=1.0), "sana": dict(guidance_scale=1.0)}
PAIR = ["a red circle", "red"]


def built(family):
    """A tiny pipeline in eval mode (built from configs, its text encoders would run dropout)."""
    torch.manual_seed(0)
    pipe, call = FAMILIES[family][0]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe, {k: v for k, v in call.items() if k != "guidance_scale"}


def step0(pipe, adapter, call, cfg, prompts=PAIR, **kwargs):
    """(stats, captured or None) at the first image tap, step 0, under `cfg`."""
    tap = probe.taps(adapter, ["img"])[0]
    with probe.collect(adapter, cfg=cfg, capture=[(tap, 0)]) as run:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        pipe(prompts, num_inference_steps=2, output_type="latent", **call, **kwargs)
    return run.stats, run.captured.get((str(tap), 0)), tap


@pytest.mark.parametrize("family", list(FAMILIES))
def test_conditional_samples_are_the_conditional_ones_with_guidance_on_and_off(family):
    pipe, call = built(family)
    adapter = mabook.adapter_for(pipe)
    # guidance off: every sample is conditional, one per prompt -- also when both share one noise seed
    off_stats, off, tap = step0(pipe, adapter, call, "cond", **NO_GUIDANCE[family])
    assert off.shape[0] == len(PAIR) and off_stats.counts(tap, 0)["samples"] == len(PAIR)
    shared = [torch.Generator().manual_seed(0) for _ in PAIR]
    same_noise, _, _ = step0(pipe, adapter, call, "cond", **NO_GUIDANCE[family], generator=shared)
    assert same_noise.counts(tap, 0)["samples"] == len(PAIR)
    none, nothing, _ = step0(pipe, adapter, call, "uncond", **NO_GUIDANCE[family])  # no unconditional sample at all
    assert nothing is None and none.steps == []
    # guidance on: the "cond" samples are exactly what the same prompts give without guidance at step 0
    # (same noise, same prompts), and the "uncond" ones are not
    on_stats, cond, _ = step0(pipe, adapter, call, "cond", **GUIDANCE[family])
    _, uncond, _ = step0(pipe, adapter, call, "uncond", **GUIDANCE[family])
    torch.testing.assert_close(cond, off, rtol=1e-4, atol=1e-5)
    assert cond.shape == uncond.shape and (cond - uncond).abs().max() > 1e-4
    assert on_stats.counts(tap, 0)["samples"] == len(PAIR)
    torch.testing.assert_close(on_stats.get("mean", tap, 0), off_stats.get("mean", tap, 0), rtol=1e-4, atol=1e-5)


def test_uncond_mode_sees_nothing_in_calls_without_unconditional_samples():
    pipe, call = built("flux")
    adapter = mabook.adapter_for(pipe)
    tap = probe.taps(adapter, ["img"])[0]
    with probe.collect(adapter, cfg="uncond") as run:
        pipe("a red circle", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0), **call)
    assert run.stats.taps == [] and run.stats.steps == []
    with probe.collect(adapter, cfg="both", capture=[(tap, 0)]) as both:  # true CFG: [uncond; cond] like a batch
        pipe("a red circle", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
             **call, **GUIDANCE["flux"])
    _, cond, _ = step0(pipe, adapter, call, "cond", prompts=["a red circle"], **GUIDANCE["flux"])
    _, uncond, _ = step0(pipe, adapter, call, "uncond", prompts=["a red circle"], **GUIDANCE["flux"])
    assert torch.equal(both.captured[(str(tap), 0)], torch.cat([uncond, cond]))
    assert both.stats.counts(tap, 0) == {"samples": 2, "tokens": 2 * 16, "calls": 2}


def test_img2img_below_the_last_timestep_starts_at_step_zero():
    from diffusers import FluxImg2ImgPipeline

    pipe, call = built("flux")
    img2img = FluxImg2ImgPipeline(**pipe.components)
    adapter = mabook.adapter_for(pipe)
    seen = []
    with probe.hooks(adapter, lambda tap, step, h: seen.append((step, hooks.steps_seen[step])),
                     taps=[probe.taps(adapter)[0]]) as hooks:
        pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
        image = torch.rand(1, 3, 8, 8)
        img2img("a red circle", image=image, strength=0.2, num_inference_steps=10,
                generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    assert [s for s, _ in seen] == [0, 1, 2, 3, 0, 1]
    assert seen[4][1] < seen[3][1]  # the case that matters: it starts below where the last generation ended


def test_every_submodule_is_a_lazy_attribute_of_the_package():
    import pkgutil

    names = [m.name for m in pkgutil.iter_modules(mabook.__path__) if not m.name.startswith("_")]
    assert {"attention", "origins", "reproduce", "sweep", "transport"} <= set(names)
    for name in names:
        assert getattr(mabook, name).__name__ == f"mabook.{name}"
