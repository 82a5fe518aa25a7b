"""mabook.probe: taps, streaming statistics, captures, edits, and hook hygiene on the organism."""

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

import mabook
from mabook import organism, probe
from mabook.probe import Edit, Tap

torch.set_num_threads(1)
PROMPTS = ["a large red circle at the top left on a black background", "a small blue square at the center on a white background"]
STEPS = 3


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return mabook.adapter_for(organism.build_pipeline())


def generate(adapter, prompts=PROMPTS, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", "generator": torch.Generator().manual_seed(0)} | kwargs
    return adapter.pipe(prompts, **kwargs).images


def assert_no_hooks(adapter):
    for name, module in adapter.transformer.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr), f"{name or 'transformer'}.{attr} not empty"


# -- taps ---------------------------------------------------------------------------------------


def test_tap_name_mirrors_module_path(adapter):
    assert str(Tap("single_transformer_blocks.1", "txt")) == "single_transformer_blocks.1.txt"
    names = [str(t) for t in probe.taps(adapter)]
    assert names[:2] == ["transformer_blocks.0.img", "transformer_blocks.0.txt"]
    assert len(names) == 2 * len(adapter.blocks)
    for t in probe.taps(adapter):  # every name points at a real module
        assert adapter.transformer.get_submodule(t.block_path) is not None


def test_unknown_tap_error_names_value_and_allowed(adapter):
    with pytest.raises(ValueError, match=r"unknown tap 'transformer_blocks\.9\.img'.*allowed.*transformer_blocks\.0\.img"):
        probe.collect(adapter, taps=["transformer_blocks.9.img"])
    with pytest.raises(ValueError, match="unknown stream 'image'"):
        Tap("transformer_blocks.0", "image")
    with pytest.raises(TypeError, match="Tap or its name"):
        probe.resolve(adapter, 3)


# -- collecting ---------------------------------------------------------------------------------


def test_probe_does_not_change_output(adapter):
    baseline = generate(adapter)
    with probe.collect(adapter):
        probed = generate(adapter)
    assert torch.equal(baseline, probed)


def test_statistics_match_captured_hidden_states(adapter):
    tap = "single_transformer_blocks.2.img"
    with probe.collect(adapter, capture=[(tap, 1)]) as run:
        generate(adapter)
    x = run.captured[(tap, 1)].double()  # (batch, tokens, C): conditional half only
    assert x.shape == (len(PROMPTS), 64, adapter.width)
    s = run.stats
    torch.testing.assert_close(s.get("abs_mean", tap, 1), x.mean(1).abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.get("mean", tap, 1), x.mean((0, 1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.get("std", tap, 1), x.reshape(-1, x.shape[-1]).std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.get("max_abs", tap, 1), x.abs().amax((0, 1)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.get("median_abs", tap, 1), x[0].abs().median(0).values, rtol=1e-5, atol=1e-6)
    assert s.array("abs_mean").shape == (len(adapter.blocks), adapter.width)
    assert s.per_step("abs_mean").shape == (STEPS, len(adapter.blocks), adapter.width)


def test_cfg_selects_conditional_half_by_default(adapter):
    tap = "transformer_blocks.1.img"
    captured = {}
    for cfg in probe.CFG_MODES:
        with probe.collect(adapter, cfg=cfg, capture=[(tap, 0)]) as run:
            generate(adapter)
        captured[cfg] = run.captured[(tap, 0)]
    both = captured["both"]
    assert both.shape[0] == 2 * len(PROMPTS)
    assert torch.equal(captured["uncond"], both[: len(PROMPTS)])  # [uncond; cond]
    assert torch.equal(captured["cond"], both[len(PROMPTS):])


def test_single_block_text_stream_is_the_text_tokens(adapter):
    with probe.collect(adapter, capture=[("single_transformer_blocks.0.txt", 0)]) as run:
        generate(adapter)
    txt = run.captured[("single_transformer_blocks.0.txt", 0)]
    assert txt.shape[1] == adapter.pipe.organism_config.max_text_length


def test_steps_restart_at_each_generation(adapter):
    with probe.collect(adapter, taps=["transformer_blocks.0.img"]) as run:
        generate(adapter, prompts=PROMPTS[:1])
        generate(adapter, prompts=PROMPTS[:1])
    assert run.stats.steps == list(range(STEPS))
    assert run.stats._count[(0, Tap("transformer_blocks.0", "img"))] == 2  # one sample per generation
    assert run.stats.timesteps[0] > run.stats.timesteps[STEPS - 1]


def test_statistics_memory_independent_of_tokens_and_batch():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    adapter = mabook.adapter_for(transformer)
    nbytes = []
    for batch_size, grid in ((1, 4), (3, 16)):
        ids = organism.image_ids(grid)
        with probe.collect(adapter, guidance_batch=False) as run:
            transformer(hidden_states=torch.randn(batch_size, grid * grid, 4), encoder_hidden_states=torch.randn(batch_size, 5, 16),
                        pooled_projections=torch.randn(batch_size, 16), timestep=torch.ones(batch_size), img_ids=ids,
                        txt_ids=torch.zeros(5, 3))
        nbytes.append((run.stats.nbytes, run.observed_bytes))
    assert nbytes[0][0] == nbytes[1][0]  # statistics: same bytes for 16 or 768 image tokens
    assert nbytes[1][1] > 30 * nbytes[0][1]  # while the hidden states grew


def test_statistics_save_load_roundtrip(adapter, tmp_path):
    with probe.collect(adapter) as run:
        generate(adapter, prompts=PROMPTS[:1])
    run.stats.save(tmp_path / "stats.safetensors")
    loaded = probe.Statistics.load(tmp_path / "stats.safetensors")
    assert loaded.taps == run.stats.taps and loaded.timesteps == run.stats.timesteps
    np.testing.assert_array_equal(loaded.per_step("max_abs", "txt"), run.stats.per_step("max_abs", "txt"))


def test_unknown_capture_step_error_names_steps_that_ran(adapter):
    with pytest.raises(ValueError, match=r"step\(s\) \[7\].*0\.\.2"):
        with probe.collect(adapter, capture=[("transformer_blocks.0.img", 7)]):
            generate(adapter, prompts=PROMPTS[:1])


def test_bad_arguments_give_clear_errors(adapter):
    with pytest.raises(ValueError, match="unknown cfg 'cnd'"):
        probe.collect(adapter, cfg="cnd")
    with pytest.raises(ValueError, match="non-negative ints"):
        probe.collect(adapter, steps=[-1])
    with pytest.raises(TypeError, match="guidance_batch"):
        probe.collect(adapter, guidance_batch="yes")
    with pytest.raises(ValueError, match="unknown statistic 'avg'"):
        probe.Statistics().get("avg", "transformer_blocks.0.img")


def test_odd_batch_in_guidance_mode_is_an_error(adapter):
    with pytest.raises(ValueError, match="guidance batch must be even"):
        with probe.collect(adapter, guidance_batch=True):  # forced: the call below makes no CFG batch
            generate(adapter, prompts=PROMPTS[:1], guidance_scale=1.0)
    assert_no_hooks(adapter)


def test_call_without_guidance_is_read_from_the_pipeline(adapter):
    with probe.collect(adapter) as p:  # guidance_scale=1: the pipeline says there is no CFG batch
        generate(adapter, prompts=PROMPTS[:1], guidance_scale=1.0)
    assert p.stats.steps and adapter.guidance_batch() is False
    generate(adapter, prompts=PROMPTS[:1])  # back to the default call
    assert adapter.guidance_batch() is True


# -- hook hygiene -------------------------------------------------------------------------------


def test_hooks_removed_on_normal_exit(adapter):
    with probe.collect(adapter):
        generate(adapter, prompts=PROMPTS[:1])
    assert_no_hooks(adapter)


def test_hooks_removed_after_exception(adapter):
    def explode(tap, step, hidden_states):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with probe.hooks(adapter, explode):
            generate(adapter, prompts=PROMPTS[:1])
    assert_no_hooks(adapter)


def test_hooks_removed_after_keyboard_interrupt(adapter):
    def interrupt(tap, step, hidden_states):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with probe.collect(adapter), probe.edit(adapter, Edit("transformer_blocks.0.img", [0], "zero")), probe.hooks(adapter, interrupt):
            generate(adapter, prompts=PROMPTS[:1])
    assert_no_hooks(adapter)


# -- edits --------------------------------------------------------------------------------------


def test_identity_edit_gives_bit_identical_output(adapter):
    baseline = generate(adapter)
    edits = [Edit(t, list(range(adapter.width)), lambda x: x) for t in probe.taps(adapter)]
    with probe.edit(adapter, edits):
        edited = generate(adapter)
    assert torch.equal(baseline, edited)


def test_zeroing_channels_changes_output(adapter):
    baseline = generate(adapter)
    with probe.edit(adapter, Edit("transformer_blocks.1.img", [0, 1, 2, 3], "zero")):
        edited = generate(adapter)
    assert (baseline - edited).abs().max() > 1e-4


def test_edit_acts_only_at_its_steps_and_channels(adapter):
    tap = "transformer_blocks.2.img"
    with probe.edit(adapter, Edit(tap, [5], "set", value=3.0, steps=[1])):
        with probe.collect(adapter, taps=[tap], capture=[(tap, 0), (tap, 1)]) as run:
            generate(adapter)
    step1, step0 = run.captured[(tap, 1)], run.captured[(tap, 0)]
    assert torch.all(step1[..., 5] == 3.0) and not torch.all(step1[..., 4] == 3.0)
    assert not torch.all(step0[..., 5] == 3.0)


def test_mean_edit_removes_spatial_variation(adapter):
    tap = "transformer_blocks.2.img"
    with probe.edit(adapter, Edit(tap, [5, 9], "mean")):
        with probe.collect(adapter, taps=[tap], capture=[(tap, 0)]) as run:
            generate(adapter)
    x = run.captured[(tap, 0)]
    assert x[..., [5, 9]].std(1).max() < 1e-5 and x[..., 4].std(1).min() > 1e-3


def test_cond_only_edit_leaves_unconditional_half(adapter):
    tap = "transformer_blocks.0.img"
    with probe.edit(adapter, Edit(tap, [1], "zero"), cfg="cond"):
        with probe.collect(adapter, taps=[tap], capture=[(tap, 0)], cfg="both") as run:
            generate(adapter)
    x = run.captured[(tap, 0)]
    assert torch.all(x[len(PROMPTS):, :, 1] == 0) and not torch.all(x[: len(PROMPTS), :, 1] == 0)


def test_token_mask_limits_edit_to_tokens(adapter):
    tap = "transformer_blocks.0.img"
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:10] = True
    with probe.edit(adapter, Edit(tap, [1], "zero", token_mask=mask)):
        with probe.collect(adapter, taps=[tap], capture=[(tap, 0)]) as run:
            generate(adapter)
    x = run.captured[(tap, 0)]
    assert torch.all(x[:, :10, 1] == 0) and torch.all(x[:, 10:, 1] != 0)


def test_bad_edits_give_clear_errors(adapter):
    with pytest.raises(ValueError, match=r"channel 128 .* out of range; allowed: ints in \[0, 128\)"):
        probe.edit(adapter, Edit("transformer_blocks.0.img", [128]))
    with pytest.raises(ValueError, match="unknown edit op 'delete'"):
        probe.edit(adapter, Edit("transformer_blocks.0.img", [1], "delete"))
    with pytest.raises(ValueError, match="needs a value"):
        probe.edit(adapter, Edit("transformer_blocks.0.img", [1], "set"))
    with pytest.raises(TypeError, match="Edit objects"):
        probe.edit(adapter, ["transformer_blocks.0.img"])
    with pytest.raises(ValueError, match=r"edit asked for step\(s\) \[50\]"):
        with probe.edit(adapter, Edit("transformer_blocks.0.img", [1], steps=[50])):
            generate(adapter, prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        with probe.edit(adapter, Edit("transformer_blocks.0.img", [1], lambda x: x[..., :0])):
            generate(adapter, prompts=PROMPTS[:1])
    assert_no_hooks(adapter)


def test_single_tap_name_is_accepted(adapter):
    with probe.collect(adapter, taps="transformer_blocks.3.img") as run:
        generate(adapter, prompts=PROMPTS[:1])
    assert [str(t) for t in run.stats.taps] == ["transformer_blocks.3.img"]


@pytest.mark.gpu
def test_probe_on_cuda_bf16_accumulates_float64_on_device():
    pipe = organism.build_pipeline().to("cuda", torch.bfloat16)
    adapter = mabook.adapter_for(pipe)
    with probe.collect(adapter) as run:
        pipe(PROMPTS, num_inference_steps=2, generator=torch.Generator("cuda").manual_seed(0), output_type="pt")
    acc = next(iter(run.stats._acc.values()))
    assert acc.device.type == "cuda" and acc.dtype == torch.float64
    assert run.stats.array("abs_mean").shape == (len(adapter.blocks), adapter.width)


def test_merged_runs_equal_one_run_over_all_prompts(adapter):
    latents = torch.randn(len(PROMPTS), 64, 48, generator=torch.Generator().manual_seed(1))
    runs = []
    for i, p in enumerate(PROMPTS):
        with probe.collect(adapter) as run:
            generate(adapter, prompts=[p], latents=latents[i:i + 1])
        runs.append(run.stats)
    with probe.collect(adapter) as together:
        generate(adapter, latents=latents)  # same prompts and noise in one batch
    merged = probe.Statistics.merge(runs)
    assert merged.taps == together.stats.taps and merged.steps == together.stats.steps
    for name in ("abs_mean", "mean", "std", "max_abs"):
        np.testing.assert_allclose(merged.array(name), together.stats.array(name), rtol=1e-4, atol=1e-5)
