"""mabook.probe and mabook.statistics: taps, streaming statistics, captures, edits, and hook hygiene on the organism."""

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

import mabook
from mabook import organism, probe, statistics
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


def bare_flux_transformer():
    """A tiny random FluxTransformer2DModel without a pipeline, and its adapter."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    return transformer, mabook.adapter_for(transformer)


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


def numpy_statistics(chunks):
    """The reference: statistics of raw hidden states with numpy in float64, no streaming.

    chunks: list of (batch, tokens, C) arrays (one per call, any batching)."""
    x = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])  # (samples, tokens, C)
    flat = x.reshape(-1, x.shape[-1])
    lower_median = lambda a: np.sort(np.abs(a), axis=0)[(a.shape[0] - 1) // 2]  # torch.median's convention
    return {
        "abs_mean": np.abs(x.mean(1)).mean(0),
        "mean": flat.mean(0),
        "std": flat.std(0),
        "max_abs": np.abs(flat).max(0),
        "median_abs": np.mean([lower_median(s) for s in x], axis=0),
        "norm_share": numpy_norm_share(flat),
    }


def numpy_norm_share(tokens):
    """(C,) each channel's share of the variance a LayerNorm over channels divides by, over all
    `tokens` (n, C): the sum over tokens of (x_c - the token's mean over channels)^2, divided by
    the sum over tokens of C * the token's variance (np.var, what the LayerNorm divides by)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    deviation = tokens - tokens.mean(1, keepdims=True)
    return (deviation ** 2).sum(0) / (tokens.shape[1] * tokens.var(1)).sum()


def assert_statistics_close(stats, tap, step, reference, rtol=1e-6, atol=1e-9):
    for name, expected in reference.items():
        np.testing.assert_allclose(stats.get(name, tap, step).cpu().numpy(), expected, rtol=rtol, atol=atol, err_msg=name)


def test_statistics_match_numpy_on_captured_hidden_states(adapter):
    tap = "single_transformer_blocks.2.img"
    with probe.collect(adapter, capture=[(tap, 1)]) as run:
        generate(adapter)
    x = run.captured[(tap, 1)]  # (batch, tokens, C): conditional half only
    assert x.shape == (len(PROMPTS), 64, adapter.width)
    assert_statistics_close(run.stats, tap, 1, numpy_statistics([x.numpy()]), rtol=1e-5, atol=1e-6)
    assert run.stats.array("abs_mean").shape == (len(adapter.blocks), adapter.width)
    assert run.stats.per_step("abs_mean").shape == (STEPS, len(adapter.blocks), adapter.width)


def massive_hidden_states(batch, tokens=64, C=8, seed=0):
    """float32 hidden states with std 1 and channel means 0, 1e3, 3e3, 1e4 (real-DiT magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, C, generator=g)
    x[..., 1] += 1e3
    x[..., 2] += 3e3
    x[..., 3] += 1e4
    x[..., 4] = -1e4 + 0.01 * x[..., 4]  # a tiny spread under a huge negative level
    return x


def test_std_is_stable_for_massive_channels():
    calls = [massive_hidden_states(b, seed=i) for i, b in enumerate((1, 3, 2))]  # three calls, mixed batching
    stats = statistics.Statistics()
    for x in calls:
        stats.update(Tap("transformer_blocks.0", "img"), 0, x)
    ref = numpy_statistics([x.numpy() for x in calls])
    std = stats.get("std", "transformer_blocks.0.img", 0).numpy()
    np.testing.assert_allclose(std, ref["std"], rtol=1e-4)  # E[x^2] - E[x]^2 in float32 gave 0 at 3e3 and 1e4
    assert std[3] == pytest.approx(1.0, rel=0.1) and std[4] == pytest.approx(0.01, rel=0.1)
    assert_statistics_close(stats, "transformer_blocks.0.img", 0, ref, rtol=1e-6, atol=1e-6)


def test_pooled_and_merged_statistics_match_numpy_on_raw_hidden_states():
    tap = Tap("transformer_blocks.0", "img")
    data = {(run, step): [massive_hidden_states(b, tokens=16, seed=10 * run + step + 7 * b) for b in (1, 2)]
            for run in range(3) for step in range(2)}
    runs = []
    for run in range(3):
        s = statistics.Statistics()
        for step in range(2):
            for x in data[(run, step)]:
                s.update(tap, step, x)
        s.timesteps = {0: 1000.0, 1: 500.0}
        runs.append(s)
    merged = statistics.Statistics.merge(runs)
    for step in range(2):
        chunks = [x.numpy() for run in range(3) for x in data[(run, step)]]
        assert_statistics_close(merged, tap, step, numpy_statistics(chunks), atol=1e-6)
    pooled_all = [x.numpy() for chunks in data.values() for x in chunks]  # pooled over steps and runs
    assert_statistics_close(merged, tap, None, numpy_statistics(pooled_all), atol=1e-6)
    assert_statistics_close(runs[1], tap, None, numpy_statistics([x.numpy() for st in range(2) for x in data[(1, st)]]),
                            atol=1e-6)
    assert merged.counts(tap, 0) == {"samples": 9, "tokens": 9 * 16, "calls": 6}


def test_median_abs_does_not_depend_on_batching_or_cfg_mode(adapter):
    tap = "transformer_blocks.1.img"
    latents = torch.randn(len(PROMPTS), 64, 48, generator=torch.Generator().manual_seed(3))
    with probe.collect(adapter, taps=[tap]) as together:
        generate(adapter, latents=latents)
    singles = []
    for i, p in enumerate(PROMPTS):
        with probe.collect(adapter, taps=[tap]) as one:
            generate(adapter, prompts=[p], latents=latents[i:i + 1])
        singles.append(one.stats)
    merged = statistics.Statistics.merge(singles)
    np.testing.assert_allclose(together.stats.get("median_abs", tap).numpy(), merged.get("median_abs", tap).numpy(),
                               rtol=1e-5, atol=1e-6)
    # "both" holds the conditional samples' medians plus the unconditional ones': a mean over all samples
    with probe.collect(adapter, taps=[tap], cfg="both", capture=[(tap, 0)]) as both:
        generate(adapter, latents=latents)
    x = both.captured[(tap, 0)].numpy()
    np.testing.assert_allclose(both.stats.get("median_abs", tap, 0).numpy(), numpy_statistics([x])["median_abs"], rtol=1e-5)


def test_median_abs_over_long_sequences_reads_a_fixed_token_subset():
    x = massive_hidden_states(3, tokens=statistics.MEDIAN_TOKENS * 4, seed=5)
    idx = statistics.median_tokens(x.shape[1])
    assert idx is not None and len(idx) == statistics.MEDIAN_TOKENS and torch.equal(idx, statistics.median_tokens(x.shape[1]))
    one, split = statistics.Statistics(), statistics.Statistics()
    tap = Tap("transformer_blocks.0", "img")
    one.update(tap, 0, x)
    for i in range(3):
        split.update(tap, 0, x[i:i + 1])
    expected = numpy_statistics([x[:, idx].numpy()])["median_abs"]
    np.testing.assert_allclose(one.get("median_abs", tap).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(split.get("median_abs", tap).numpy(), expected, rtol=1e-6)


def test_lower_median_equals_torch_median_and_numpy_with_ties_nan_and_every_length():
    """The probe's median (a selection in numpy on the CPU, issue 23's cost fix) gives torch.median's
    values exactly -- the lower median, sorted index (n - 1) // 2, checked in float64 numpy too -- and
    NaN where a row holds one; channel_moments' median row is the same as with torch.median."""
    torch.manual_seed(0)
    for n in (1, 2, 3, 8, 63, 64, 257):
        a = torch.randn(3, 5, n).abs() * torch.logspace(-3, 4, 5)[:, None]
        a[0, 0] = 0.5  # a row of ties
        a[1, 1, : n // 2] = 0.0
        if n > 2:
            a[2, 3, 1] = float("nan")
        expected = a.median(-1).values
        got = statistics.lower_median(a.clone(), a.amax((0, 2)))
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(-1.0), expected.nan_to_num(-1.0))
        finite = ~expected.isnan().numpy()
        lower = np.sort(a.double().numpy(), -1)[..., (n - 1) // 2]
        np.testing.assert_array_equal(got.double().numpy()[finite], lower[finite])
    x = massive_hidden_states(2, tokens=statistics.MEDIAN_TOKENS + 44, seed=3)  # the token-subset path
    rows, _ = statistics.channel_moments(x)
    idx = statistics.median_tokens(x.shape[1])
    assert torch.equal(rows[3], x[:, idx].abs().median(1).values.sum(0, dtype=torch.float64))


def test_norm_share_of_a_massive_channel_at_a_real_model_width():
    """One channel at 3e3 among 3072 (a real DiT's width and magnitude): it holds > 0.9 of the
    LayerNorm variance, as numpy says; the shares sum to 1; and two batches merged, one batch, and
    the same tokens in one call all give the same shares."""
    width, g = 3072, torch.Generator().manual_seed(4)
    x = torch.randn(5, 32, width, generator=g)
    x[..., 11] += 3e3
    x[..., 12] -= 1e3 * torch.rand(5, 32, generator=g)  # a second large channel, varying over tokens
    tap = Tap("transformer_blocks.0", "img")
    one, two, first, second = statistics.Statistics(), statistics.Statistics(), statistics.Statistics(), statistics.Statistics()
    one.update(tap, 0, x)
    two.update(tap, 0, x[:2])
    two.update(tap, 0, x[2:])
    first.update(tap, 0, x[:3])
    second.update(tap, 0, x[3:])
    merged = statistics.Statistics.merge([first, second])
    expected = numpy_norm_share(x.reshape(-1, width).numpy())
    share = one.get("norm_share", tap, 0).numpy()
    assert share[11] > 0.9 and expected[11] > 0.9 and share.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(share, expected, rtol=1e-5, atol=1e-12)
    for other in (two, merged):
        np.testing.assert_allclose(other.get("norm_share", tap, 0).numpy(), share, rtol=1e-10, atol=1e-15)
    # uniform channels: each holds about 1 / width
    flat = statistics.Statistics()
    flat.update(tap, 0, torch.randn(4, 64, width, generator=g))  # 256 tokens: each share within +-50 % of 1 / width
    assert flat.get("norm_share", tap, 0).numpy() == pytest.approx(np.full(width, 1 / width), rel=0.5)


def test_norm_share_pools_steps_and_runs_like_numpy():
    """Pooled over steps (step=None) and over merged runs: the share of the pooled tokens, not a mean of shares."""
    tap = Tap("transformer_blocks.0", "img")
    small = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(1))
    big = massive_hidden_states(3, tokens=8, seed=2)
    a, b = statistics.Statistics(), statistics.Statistics()
    a.update(tap, 0, small)
    b.update(tap, 1, big)
    merged = statistics.Statistics.merge([a, b])
    expected = numpy_norm_share(torch.cat([small, big]).reshape(-1, 8).numpy())
    np.testing.assert_allclose(merged.get("norm_share", tap).numpy(), expected, rtol=1e-6)
    mean_of_shares = (numpy_norm_share(small.reshape(-1, 8).numpy()) + numpy_norm_share(big.reshape(-1, 8).numpy())) / 2
    assert np.abs(mean_of_shares - expected).max() > 0.1  # the two definitions differ: the test can tell them apart


def test_merge_refuses_runs_with_different_schedules(adapter):
    runs = []
    for steps in (3, 5):
        with probe.collect(adapter, taps=["transformer_blocks.0.img"]) as run:
            generate(adapter, prompts=PROMPTS[:1], num_inference_steps=steps)
        runs.append(run.stats)
    with pytest.raises(ValueError, match="different schedules: step 1 ran at timestep"):
        statistics.Statistics.merge(runs)
    assert statistics.Statistics.merge([runs[1], runs[1]]).steps == list(range(5))
    with pytest.raises(ValueError, match="step 1 ran at timestep .* in an earlier generation"):
        with probe.collect(adapter, taps=["transformer_blocks.0.img"]):
            generate(adapter, prompts=PROMPTS[:1], num_inference_steps=3)
            generate(adapter, prompts=PROMPTS[:1], num_inference_steps=5)
    assert_no_hooks(adapter)


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
    transformer, adapter = bare_flux_transformer()
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
        generate(adapter, prompts=PROMPTS)
    run.stats.save(tmp_path / "stats.safetensors")
    loaded = statistics.Statistics.load(tmp_path / "stats.safetensors")
    assert loaded.taps == run.stats.taps and loaded.timesteps == run.stats.timesteps
    for tap in run.stats.taps:
        for step in run.stats.steps:
            assert loaded.counts(tap, step) == run.stats.counts(tap, step) == {"samples": 3, "tokens": 3 * (
                64 if tap.stream == "img" else 32), "calls": 2}
            for name in statistics.STATISTICS:
                assert torch.equal(loaded.get(name, tap, step), run.stats.get(name, tap, step)), (name, tap, step)


def test_statistics_of_another_format_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"0/transformer_blocks.0.img": torch.zeros(5, 4, dtype=torch.float64)}, str(tmp_path / "old.safetensors"),
              metadata={"mabook_statistics": '{"taps": [["transformer_blocks.0", "img"]]}'})
    with pytest.raises(ValueError, match="format 1, this mabook reads format 3: collect them again"):
        statistics.Statistics.load(tmp_path / "old.safetensors")
    # format 2: five rows, no norm_var_sum (a file written before norm_share)
    meta = ('{"format": 2, "taps": [["transformer_blocks.0", "img"]], "counts": {"0/transformer_blocks.0.img": 1}, '
            '"tokens": {"0/transformer_blocks.0.img": 4}, "calls": {"0/transformer_blocks.0.img": 1}, "timesteps": {}}')
    save_file({"0/transformer_blocks.0.img": torch.zeros(5, 4, dtype=torch.float64)}, str(tmp_path / "v2.safetensors"),
              metadata={"mabook_statistics": meta})
    with pytest.raises(ValueError, match="holds statistics in format 2, this mabook reads format 3"):
        statistics.Statistics.load(tmp_path / "v2.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a mabook statistics file"):
        statistics.Statistics.load(tmp_path / "other.safetensors")


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
        statistics.Statistics().get("avg", "transformer_blocks.0.img")


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


def _every_context(adapter):
    """{name: a callable that runs a generation inside one of mabook's hook or processor contexts}."""
    import contextlib

    from mabook import attention, disruption, spatial, transport

    tap = "transformer_blocks.1.img"

    def inside(*contexts):
        def run():
            with contextlib.ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context())
                generate(adapter, prompts=PROMPTS[:1])
        return run

    def transported():
        rec = transport.record(adapter, PROMPTS[:1], taps=[tap], channels=[0, 1], num_inference_steps=STEPS)
        transport.transport(rec, PROMPTS[1:], 0.5, target_images=rec.images)

    return {
        "probe.collect": inside(lambda: probe.collect(adapter, capture=[(tap, 2)])),
        "probe.edit": inside(lambda: probe.edit(adapter, Edit(tap, [0], "zero"))),
        "probe.hooks": inside(lambda: probe.hooks(adapter, lambda *a: None)),
        "attention.capture": inside(lambda: attention.capture(adapter)),
        "attention.intervene": inside(lambda: attention.intervene(adapter, attention.KeyIntervention("sink", k=2))),
        "attention.intervene+capture": inside(lambda: attention.intervene(adapter, attention.KeyIntervention("random", k=1)),
                                              lambda: attention.capture(adapter, cfg="both")),
        "transport.record": lambda: transport.record(adapter, PROMPTS[:1], taps=[tap], channels=[0], num_inference_steps=STEPS),
        "transport.transport": transported,
        "disruption.baseline": lambda: disruption.baseline(adapter, PROMPTS[:1], [0], STEPS),
        "spatial.capture": lambda: spatial.capture(adapter, PROMPTS[:1], [0], STEPS, taps=[tap], steps=[1]),
    }


CONTEXTS = ["probe.collect", "probe.edit", "probe.hooks", "attention.capture", "attention.intervene", "attention.intervene+capture",
            "transport.record", "transport.transport", "disruption.baseline", "spatial.capture"]


@pytest.mark.parametrize("name", CONTEXTS)
def test_every_context_is_undone_by_keyboard_interrupt_mid_generation(adapter, name):
    """Ctrl-C at the second denoising step, inside each of mabook's contexts (probe's, attention's,
    transport's and the experiments' built on them): no hook and no swapped attention processor
    survives, and the next generation is bit-identical to one before."""
    before = generate(adapter, prompts=PROMPTS[:1])
    processors = {path: m.processor for path, m in adapter.attention_modules().items()}
    run = _every_context(adapter)[name]
    calls = []
    skip = STEPS if name == "transport.transport" else 0  # let its record finish: interrupt the transport itself

    def interrupt_at_second_step(module, args, output):
        calls.append(1)
        if len(calls) == skip + 2:
            raise KeyboardInterrupt

    handle = adapter.blocks[-1].module.register_forward_hook(interrupt_at_second_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        handle.remove()
    assert len(calls) == skip + 2, "the interrupt did not come mid-generation"
    assert_no_hooks(adapter)
    assert all(m.processor is processors[path] for path, m in adapter.attention_modules().items())
    assert torch.equal(generate(adapter, prompts=PROMPTS[:1]), before)


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


def edited_and_baseline(adapter, edit, tap, cfg="cond", edit_cfg="both", prompts=PROMPTS):
    """Step-0 hidden states at `tap` with and without `edit` (step 0: both runs see the same input)."""
    out = []
    for edits in ([edit], []):
        with probe.edit(adapter, edits, cfg=edit_cfg) if edits else probe.hooks(adapter, lambda *a: None):
            with probe.collect(adapter, taps=[tap], capture=[(tap, 0)], cfg=cfg) as run:
                generate(adapter, prompts=prompts)
        out.append(run.captured[(tap, 0)])
    return out


def test_scale_and_tensor_set_edits(adapter):
    tap = "transformer_blocks.2.img"
    edited, base = edited_and_baseline(adapter, Edit(tap, [5], "scale", value=-2.0), tap)
    assert torch.equal(edited[..., 5], -2.0 * base[..., 5]) and torch.equal(edited[..., 6], base[..., 6])
    value = torch.tensor([1.5, -250.0])
    edited, base = edited_and_baseline(adapter, Edit(tap, [3, 7], "set", value=value), tap)
    assert torch.all(edited[..., 3] == 1.5) and torch.all(edited[..., 7] == -250.0)
    assert torch.equal(edited[..., 4], base[..., 4])


def test_two_dimensional_token_mask_edits_each_image_its_own_tokens(adapter):
    tap = "transformer_blocks.1.img"
    mask = torch.zeros(len(PROMPTS), 64, dtype=torch.bool)
    mask[0, :8] = True
    mask[1, 40:] = True
    edited, base = edited_and_baseline(adapter, Edit(tap, [2], "set", value=7.0, token_mask=mask), tap, cfg="both")
    for half in (edited[: len(PROMPTS)], edited[len(PROMPTS):]):  # the per-image mask applies to both halves
        assert torch.all(half[..., 2][mask] == 7.0) and not torch.any(half[..., 2][~mask] == 7.0)
    with pytest.raises(ValueError, match=r"token_mask .* shape \(3, 64\)"):
        with probe.edit(adapter, Edit(tap, [2], "zero", token_mask=torch.ones(3, 64, dtype=torch.bool))):
            generate(adapter)
    assert_no_hooks(adapter)


def test_mean_edit_with_token_mask_uses_the_masked_tokens_mean(adapter):
    tap = "transformer_blocks.1.img"
    mask = torch.zeros(64, dtype=torch.bool)
    mask[10:30] = True
    edited, base = edited_and_baseline(adapter, Edit(tap, [4, 9], "mean", token_mask=mask), tap)
    expected = base[:, mask][..., [4, 9]].mean(1)  # (B, 2): over the masked tokens only
    torch.testing.assert_close(edited[:, mask][..., [4, 9]], expected[:, None].expand(-1, int(mask.sum()), -1))
    assert torch.equal(edited[:, ~mask], base[:, ~mask]) and torch.equal(edited[..., 5], base[..., 5])


def test_uncond_only_edit_leaves_conditional_half(adapter):
    tap = "transformer_blocks.0.img"
    edited, base = edited_and_baseline(adapter, Edit(tap, [1], "zero"), tap, cfg="both", edit_cfg="uncond")
    n = len(PROMPTS)
    assert torch.all(edited[:n, :, 1] == 0) and torch.equal(edited[n:], base[n:])


def test_text_stream_edit_takes_effect(adapter):
    tap = "transformer_blocks.1.txt"
    edited, base = edited_and_baseline(adapter, Edit(tap, list(range(adapter.width)), "zero"), tap)
    assert torch.all(edited == 0) and base.abs().max() > 0
    baseline = generate(adapter)
    with probe.edit(adapter, Edit(tap, list(range(adapter.width)), "zero")):
        assert (generate(adapter) - baseline).abs().max() > 1e-3  # the text stream feeds later blocks


# -- where the pipeline is: generations, steps, calls ---------------------------------------------


def recorded_steps(adapter, run, tap="transformer_blocks.0.img", **hook_kwargs):
    """[(step, call, timestep)] for every transformer call made by run()."""
    seen = []
    with probe.hooks(adapter, lambda t, step, h: seen.append((step, hooks.call, hooks.steps_seen[step])),
                     taps=[tap], cfg="both", **hook_kwargs) as hooks:
        run()
    return seen


def test_heun_gives_each_model_evaluation_its_own_step(adapter):
    from diffusers import FlowMatchHeunDiscreteScheduler

    stock = adapter.pipe.scheduler
    adapter.pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    try:
        seen = recorded_steps(adapter, lambda: generate(adapter, prompts=PROMPTS[:1], num_inference_steps=3))
    finally:
        adapter.pipe.scheduler = stock
    steps, calls, timesteps = zip(*seen)
    assert len(seen) == 5  # Heun: 2 * 3 - 1 evaluations
    assert list(steps) == [0, 1, 2, 3, 4] and set(calls) == {0}
    assert timesteps[1] == timesteps[2]  # the correction step re-evaluates at the same timestep: still a new step


def test_direct_transformer_calls_with_positional_timestep():
    transformer, adapter = bare_flux_transformer()
    x, text, pooled = torch.randn(1, 16, 4), torch.randn(1, 5, 16), torch.randn(1, 16)

    def run():
        for t in (0.9, 0.5, 0.5, 0.9, 0.2):  # positional: (hidden_states, encoder_hidden_states, pooled, timestep)
            transformer(x, text, pooled, torch.tensor([t]), organism.image_ids(4), torch.zeros(5, 3))

    seen = recorded_steps(adapter, run, guidance_batch=False)
    assert [(s, c) for s, c, _ in seen] == [(0, 0), (1, 0), (1, 1), (0, 0), (1, 0)]
    assert [t for *_, t in seen] == pytest.approx([0.9, 0.5, 0.5, 0.9, 0.2])


def test_guidance_batch_is_read_from_the_input(adapter):
    n = len(PROMPTS)
    with probe.collect(adapter, taps=["transformer_blocks.0.img"]) as run:
        generate(adapter, guidance_scale=1.0)  # two prompts, no guidance: both samples are conditional
    assert run.stats.counts("transformer_blocks.0.img", 0)["samples"] == n
    with probe.collect(adapter, taps=["transformer_blocks.0.img"]) as run:
        generate(adapter)  # [uncond; cond]
    assert run.stats.counts("transformer_blocks.0.img", 0)["samples"] == n
    latents = torch.randn(1, 64, 48).expand(2, -1, -1)  # identical latents on purpose, no guidance
    with probe.collect(adapter, taps=["transformer_blocks.0.img"]) as run:
        generate(adapter, latents=latents, guidance_scale=1.0)  # the pipeline's flag says: not a guidance batch
    assert run.stats.counts("transformer_blocks.0.img", 0)["samples"] == 2


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


def cuda_against_cpu(device="cuda", tap="single_transformer_blocks.2.img"):
    """Statistics of one pipeline run on the CPU (float32), then on `device` in float32 and in
    bfloat16, from the same weights and the same (CPU-drawn) noise. Returns
    {dtype: (stats on the CPU, the device run, the device's hidden states captured at (tap, 1))}."""
    torch.manual_seed(0)
    pipe = organism.build_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        with probe.collect(mabook.adapter_for(pipe), capture=[(tap, 1)]) as r:
            pipe(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
        return r

    cpu = run().stats
    out = {}
    for dtype in (torch.float32, torch.bfloat16):  # float32 first: bfloat16 is cast from the same float32 weights
        pipe.to(device, dtype)
        r = run()
        out[dtype] = (cpu, r.stats, r.captured[(tap, 1)])
    return out


# Stated tolerances of a device run against the CPU run, as a fraction of each tap's largest value of
# the statistic: float32 (no TF32 in matmuls, torch's default) agrees to rounding; bfloat16 keeps 8
# mantissa bits through 8 blocks and 2 steps (measured on the CPU: <= 2.2e-2).
DEVICE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def check_device_statistics(runs, device="cuda", tap="single_transformer_blocks.2.img"):
    for dtype, (cpu, stats, x) in runs.items():
        acc = next(iter(stats._acc.values()))
        assert acc.device.type == device and acc.dtype == torch.float64  # accumulated in float64 on the device
        assert x.device.type == device and x.dtype == dtype
        for name in statistics.STATISTICS:
            ref, got = cpu.array(name), stats.array(name)  # (layers, channels)
            assert got.shape == ref.shape == (len(stats.layers()), 128)
            scale = np.abs(ref).max(1, keepdims=True)
            worst = float((np.abs(got - ref) / scale).max())
            assert worst <= DEVICE_TOLERANCE[dtype], f"{name} in {dtype} on {device}: {worst:.2e} of the tap's maximum"
        # and exactly what numpy computes from the hidden states the device produced
        assert_statistics_close(stats, tap, 1, numpy_statistics([x.float().cpu().numpy()]), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_probe_on_cuda_matches_the_cpu_run_within_the_stated_tolerance():
    check_device_statistics(cuda_against_cpu("cuda"), "cuda")


def test_merged_runs_equal_one_run_over_all_prompts(adapter):
    latents = torch.randn(len(PROMPTS), 64, 48, generator=torch.Generator().manual_seed(1))
    runs = []
    for i, p in enumerate(PROMPTS):
        with probe.collect(adapter) as run:
            generate(adapter, prompts=[p], latents=latents[i:i + 1])
        runs.append(run.stats)
    with probe.collect(adapter) as together:
        generate(adapter, latents=latents)  # same prompts and noise in one batch
    merged = statistics.Statistics.merge(runs)
    assert merged.taps == together.stats.taps and merged.steps == together.stats.steps
    for name in ("abs_mean", "mean", "std", "max_abs", "norm_share"):
        np.testing.assert_allclose(merged.array(name), together.stats.array(name), rtol=1e-4, atol=1e-5, err_msg=name)


# -- the conditioning tap (opt-in) ----------------------------------------------------------------


def test_conditioning_tap_is_opt_in_and_named_like_its_module(adapter):
    cond = probe.conditioning_tap(adapter)
    assert str(cond) == "time_text_embed.temb" and adapter.transformer.get_submodule(cond.block_path) is not None
    assert cond not in probe.taps(adapter)  # never a default tap
    assert probe.taps(adapter, ["temb", "img"])[0] == cond and probe.resolve(adapter, "time_text_embed.temb") == cond
    with pytest.raises(ValueError, match="unknown stream 'pooled'; allowed: \\['img', 'txt', 'temb'\\]"):
        probe.taps(adapter, ["pooled"])
    pixart = mabook.models.Adapter(mabook.models.FAMILIES["pixart"], adapter.transformer)
    with pytest.raises(ValueError, match="pixart models have no conditioning tap"):
        probe.conditioning_tap(pixart)


def test_conditioning_tap_sees_temb_and_its_edits_reach_the_output(adapter):
    cond = probe.conditioning_tap(adapter)
    seen = {}
    with probe.hooks(adapter, lambda tap, step, h: seen.setdefault(step, h.clone()), taps=[cond], cfg="both"):
        baseline = generate(adapter)
    pipe = adapter.pipe
    pipe.scheduler.set_timesteps(STEPS)
    with torch.no_grad():  # what FluxTransformer2DModel computes: time_text_embed(1000 * timestep, pooled)
        pooled = torch.cat([pipe.encode_prompt([""] * 2)[1], pipe.encode_prompt(PROMPTS)[1]])
        for step, t in enumerate(pipe.scheduler.timesteps):
            expected = adapter.transformer.time_text_embed((t / 1000).expand(4) * 1000, pooled)
            assert seen[step].shape == (4, 1, adapter.width)
            torch.testing.assert_close(seen[step][:, 0], expected, rtol=1e-5, atol=1e-6)
    with probe.edit(adapter, [Edit(cond, list(range(adapter.width)), lambda x: x.clone())]):
        assert torch.equal(generate(adapter), baseline)  # an identity edit is bit-identical
    with probe.edit(adapter, [Edit(cond, [0, 1, 2], "zero")]):
        assert not torch.allclose(generate(adapter), baseline)
    assert_no_hooks(adapter)
