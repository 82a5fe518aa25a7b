"""mabook.discovery on statistics with a planted massive channel (no model needed)."""

import numpy as np
import pytest
import torch

import mabook
from mabook import discovery
from mabook.probe import Tap
from mabook.statistics import Statistics

C = 32
MASSIVE = 7  # the planted channel


def planted_statistics(num_layers=3, num_steps=4, scale=500.0, seed=0, raw=False, tokens=16, C=C):
    """Statistics of hidden states (2, tokens, C) ~ N(0, 1) with channel MASSIVE offset by `scale`
    and channel MASSIVE+1 by scale/10 (a runner-up). raw=True also returns the hidden states,
    {layer: (steps, 2, tokens, C) float64 numpy}, for independent computations."""
    g = torch.Generator().manual_seed(seed)
    stats = Statistics()
    data = {layer: [] for layer in range(num_layers)}
    for step in range(num_steps):
        for layer in range(num_layers):
            x = torch.randn(2, tokens, C, generator=g)
            x[..., MASSIVE] += scale
            x[..., MASSIVE + 1] += scale / 10
            stats.update(Tap(f"transformer_blocks.{layer}", "img"), step, x)
            data[layer].append(x.numpy().astype(np.float64))
    if raw:
        return stats, {layer: np.stack(xs) for layer, xs in data.items()}
    return stats


def numpy_sun(x: np.ndarray) -> tuple[float, float]:
    """Sun et al.'s two numbers from raw hidden states (..., samples, tokens, C), in numpy: the
    largest |x| anywhere, and the median over channels of each channel's median |x| over tokens
    (torch's lower median for an even count) averaged over the samples."""
    a = np.abs(x.reshape(-1, *x.shape[-2:]))  # (samples, tokens, C)
    lower_median = np.sort(a, axis=1)[:, (a.shape[1] - 1) // 2]  # (samples, C)
    return float(a.max()), float(np.median(lower_median.mean(0)))


def numpy_norm_share(x: np.ndarray) -> np.ndarray:
    """(C,) each channel's share of the variance a LayerNorm over channels divides by, pooled over
    every token: numerator from the deviations from each token's mean, denominator from np.var."""
    x = x.reshape(-1, x.shape[-1])  # (tokens, C)
    deviation = x - x.mean(1, keepdims=True)
    return (deviation ** 2).sum(0) / (x.shape[1] * x.var(1)).sum()


def test_top_k_finds_planted_channel_first():
    reports = discovery.massive_channels(planted_statistics(), k=2)
    assert len(reports) == 3
    for r in reports:
        assert r.top == [MASSIVE, MASSIVE + 1]
        assert MASSIVE not in r.bottom and MASSIVE not in r.random
        assert len(r.bottom) == len(r.random) == 2


def test_controls_are_equal_size_disjoint_and_seeded():
    values = np.arange(C, dtype=float)
    top = discovery.top_k(values, 4)
    assert top.tolist() == [31, 30, 29, 28]
    assert discovery.bottom_k(values, 4).tolist() == [0, 1, 2, 3]
    r1, r2 = discovery.random_k(C, 4, seed=3, exclude=top), discovery.random_k(C, 4, seed=3, exclude=top)
    assert r1.tolist() == r2.tolist() and not set(r1) & set(top) and len(set(r1)) == 4


@pytest.mark.parametrize("scale, sun", [(2000.0, True), (3e3, True), (20.0, False)])
def test_ratio_and_sun_criterion_match_numpy_on_the_raw_hidden_states(scale, sun):
    """max |x|, the median |x| and their ratio recomputed in numpy from the hidden states themselves
    (pooled over steps, as step=None asks); the paper's ratio from the numpy |mean over tokens|."""
    stats, data = planted_statistics(scale=scale, raw=True)
    reports = discovery.massive_channels(stats, k=1)
    for layer, r in enumerate(reports):
        x = data[layer]  # (steps, 2, tokens, C)
        max_abs, median_abs = numpy_sun(x)
        assert r.max_abs == pytest.approx(max_abs, rel=1e-6)
        assert r.median_abs == pytest.approx(median_abs, rel=1e-6)
        assert r.sun_ratio == pytest.approx(max_abs / median_abs, rel=1e-6)
        assert r.sun_massive is sun and (max_abs > 100 and max_abs / median_abs >= 1000) is sun
        abs_mean = np.abs(x.mean(2)).mean((0, 1))  # |mean over tokens| per sample, averaged
        assert r.ratio_to_median == pytest.approx(abs_mean[MASSIVE] / np.median(abs_mean), rel=1e-6)
    if sun:
        assert reports[0].ratio_to_median > 1000
    else:
        assert 10 < reports[0].ratio_to_median and reports[0].max_abs < 100  # 20 < 100: not massive in Sun's sense


@pytest.mark.parametrize("k", [0, -1, C + 1])
def test_k_out_of_range_is_a_clear_error(k):
    with pytest.raises(ValueError, match=rf"k={k} is out of range; allowed: 1 <= k <= {C}"):
        discovery.massive_channels(planted_statistics(), k=k)


def test_k_of_wrong_type_is_a_clear_error():
    with pytest.raises(TypeError, match="k must be an int"):
        discovery.top_k(np.zeros(C), 2.0)


def test_jaccard_values():
    assert discovery.jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3)
    assert discovery.jaccard([1, 2], [1, 2]) == 1.0
    m = discovery.jaccard_matrix([[1], [1], [2]])
    assert m.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_stability_of_identical_sets_is_one_with_tight_ci():
    s = discovery.stability([[1, 2]] * 5)
    assert (s.mean, s.low, s.high) == (1.0, 1.0, 1.0)


def test_stability_ci_contains_mean_for_noisy_sets():
    rng = np.random.default_rng(0)
    sets = [[0] + rng.choice(np.arange(1, 10), 2, replace=False).tolist() for _ in range(12)]
    s = discovery.stability(sets)
    assert 0 < s.low <= s.mean <= s.high < 1
    assert s.matrix.shape == (12, 12) and "Jaccard" in str(s)


def test_stability_across_steps_layers_and_runs():
    stats = planted_statistics()
    assert discovery.stability_across_steps(stats, "transformer_blocks.0.img", k=1).mean == 1.0
    assert discovery.stability_across_layers(stats, k=1).mean == 1.0
    runs = [planted_statistics(seed=s) for s in range(3)]
    assert discovery.stability_across_runs(runs, "transformer_blocks.1.img", k=2).mean == 1.0
    # k much larger than the planted pair: the rest is noise, so overlap drops
    assert discovery.stability_across_runs(runs, "transformer_blocks.1.img", k=6).mean < 1.0


def test_stability_needs_two_sets():
    with pytest.raises(ValueError, match="at least 2 sets, got 1"):
        discovery.stability([[1]])


def test_frequency_counts_membership():
    f = discovery.frequency([[1, 2], [1, 3]], 4)
    assert f.tolist() == [0.0, 1.0, 0.5, 0.5]


def test_bootstrap_ci_brackets_the_mean():
    low, high = discovery.bootstrap_ci(np.arange(20.0))
    assert low < 9.5 < high
    assert discovery.bootstrap_ci([3.0, 3.0]) == (3.0, 3.0)


def test_table_rows_have_every_field():
    rows = discovery.table(discovery.massive_channels(planted_statistics(), k=2, step=1))
    assert {"tap", "top", "ratio_to_median", "sun_massive", "sun_ratio", "bottom", "random", "norm_share",
            "norm_share_top_k"} <= set(rows[0])


def test_norm_share_matches_numpy_at_every_layer_and_step():
    stats, data = planted_statistics(raw=True)
    for step in (None, 0, 3):
        for layer, r in enumerate(discovery.massive_channels(stats, k=2, step=step)):
            share = numpy_norm_share(data[layer] if step is None else data[layer][step])
            assert r.norm_share == pytest.approx(share[MASSIVE], rel=1e-6)
            assert r.norm_share_top_k == pytest.approx(share[[MASSIVE, MASSIVE + 1]].sum(), rel=1e-6)


def test_norm_share_of_one_massive_channel_on_a_real_model_width():
    """One channel at 3e3 among 3072 (a real DiT's width and magnitude) holds > 0.9 of the LayerNorm
    variance; the same channel at 3 holds about 3^2 / 3072 of it (no longer massive)."""
    width = 3072
    for scale, low, high in ((3e3, 0.9, 1.0), (3.0, 1e-3, 1e-2)):
        stats, data = planted_statistics(num_layers=1, num_steps=2, scale=scale, raw=True, C=width)
        r = discovery.massive_channels(stats, k=2)[0]
        share = numpy_norm_share(data[0])
        assert r.top[0] == MASSIVE and low < r.norm_share < high
        assert r.norm_share == pytest.approx(share[MASSIVE], rel=1e-5)
        assert r.norm_share_top_k == pytest.approx(share[r.top].sum(), rel=1e-5)


def test_unknown_stream_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'txt' taps"):
        discovery.massive_channels(planted_statistics(), k=1, stream="txt")


def statistics_of(x: torch.Tensor) -> Statistics:
    stats = Statistics()
    stats.update(Tap("transformer_blocks.0", "img"), 0, x)
    return stats


@pytest.mark.parametrize("level,spread,expected", [
    (150.0, 1.0, False),   # magnitude > 100, but only ~150x the median |x|: fails the ratio condition only
    (50.0, 0.01, False),   # ~5000x the median |x|, but 50 < 100: fails the magnitude condition only
    (5000.0, 1.0, True),   # both
])
def test_sun_criterion_needs_both_magnitude_and_ratio(level, spread, expected):
    g = torch.Generator().manual_seed(0)
    x = spread * torch.randn(1, 64, C, generator=g)
    x[0, 5, MASSIVE] = level  # one massive activation
    report = discovery.massive_channels(statistics_of(x), k=1)[0]
    median = float(np.median(np.sort(np.abs(x[0].numpy()), axis=0)[31]))  # numpy: lower median per channel, median over channels
    assert report.max_abs == pytest.approx(level)
    assert report.median_abs == pytest.approx(median, rel=1e-6)
    assert (report.max_abs > 100) == (level > 100) and (report.sun_ratio >= 1000) == (level / median >= 1000)
    assert report.sun_massive is expected


def test_collect_statistics_seeds_every_prompt_alike_and_passes_cfg():
    """One seed convention: every prompt has its own generator seeded `seed`, so the noise does not
    depend on the batch (the old per-batch `seed + b` made chapter 1's "seed 1" reuse seed 0's second batch)."""
    from mabook import organism, probe

    torch.manual_seed(0)
    pipe = organism.build_pipeline()
    adapter = mabook.adapter_for(pipe)
    prompts = ["a red circle at the center on a black background", "a blue square at the left on a white background",
               "a small green triangle at the top on a gray background"]
    stats = discovery.collect_statistics(adapter, prompts, num_inference_steps=2, seed=5, batch_size=2)
    # independently: each prompt alone, its noise drawn by hand from a generator seeded 5
    shape = (1, pipe.organism_config.grid ** 2, pipe.organism_config.in_channels)
    runs = []
    for p in prompts:
        latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(5))
        with probe.collect(adapter) as run:
            pipe([p], num_inference_steps=2, latents=latents, output_type="pt")
        runs.append(run.stats)
    expected = Statistics.merge(runs)
    for name in ("abs_mean", "std", "max_abs", "median_abs", "norm_share"):
        np.testing.assert_allclose(stats.array(name), expected.array(name), rtol=1e-5, atol=1e-6)
    again = discovery.collect_statistics(adapter, prompts, num_inference_steps=2, seed=5, batch_size=3)
    np.testing.assert_allclose(again.array("abs_mean"), stats.array("abs_mean"), rtol=1e-5, atol=1e-6)
    other = discovery.collect_statistics(adapter, prompts, num_inference_steps=2, seed=6, batch_size=2)
    assert np.abs(other.array("abs_mean") - stats.array("abs_mean")).max() > 1e-4  # another seed, other noise
    both = discovery.collect_statistics(adapter, prompts, num_inference_steps=2, seed=5, batch_size=2, cfg="both")
    tap = both.layers()[0]
    assert both.counts(tap, 0)["samples"] == 2 * len(prompts) and stats.counts(tap, 0)["samples"] == len(prompts)
