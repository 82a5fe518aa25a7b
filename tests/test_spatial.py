"""mabook.spatial: K-means masks, ground truth, IoU, assignment (and mabook.linear_probes: probes, UMAP), on any adapter with a token grid.

Checked against independent computations: a planted hidden-state tensor whose mask is known,
numpy IoU and patch majorities, brute-force assignment and Otsu, numpy means for the summary.
"""

import itertools

import numpy as np
import pytest
import torch

import mabook
from mabook import images, linear_probes, spatial, world
from mabook.probe import Tap
from mabook.statistics import Statistics
from mabook.stats import bootstrap_ci

torch.set_num_threads(1)
TAP = "transformer_blocks.0.img"
PLANTED_CHANNEL = 5


def planted_capture(n_prompts=4, width=16, channel=PLANTED_CHANNEL, seed=0):
    """A Capture without a model: channel `channel` is +50 on each caption's rendered token mask and
    0 elsewhere, every other channel small noise."""
    prompts = world.heldout_captions(n_prompts, 1, seed=seed)
    rng = np.random.default_rng(seed)
    x = 0.01 * rng.standard_normal((n_prompts, 64, width)).astype(np.float32)
    masks = []
    for u, p in enumerate(prompts):
        mask = spatial.downsample(world.render(world.parse_caption(p)).foreground, (8, 8))
        x[u, mask.ravel(), channel] += 50
        masks.append(mask)
    stats = Statistics()
    stats.update(Tap("transformer_blocks.0", "img"), 0, torch.from_numpy(x))
    cap = spatial.Capture([(p, 0) for p in prompts], np.zeros((n_prompts, 32, 32, 3), np.float32), {(TAP, 0): x}, stats,
                          (8, 8), 1)
    return cap, np.stack(masks)


def test_planted_top1_kmeans_mask_equals_the_planted_mask():
    cap, masks = planted_capture()
    sets = spatial.channel_sets(cap.stats, 1, ["top"])
    assert sets["top-1"]["channels"][TAP] == [PLANTED_CHANNEL]
    fg = spatial.foreground_maps(cap, TAP, 0, sets["top-1"]["channels"][TAP], source="rendered")
    np.testing.assert_array_equal(fg, masks)
    rows = spatial.measure(cap, sets, sources=("rendered",), thresholds=("otsu",))
    for r in rows:
        if r["set"] in ("top-1", "threshold-otsu"):
            assert r["token_iou"] == 1.0 and r["object_iou"] == 1.0
    chance = [r["token_iou"] for r in rows if r["set"] == "chance"]
    assert np.mean(chance) < 0.6  # the same clusters with tokens shuffled lose the layout


def test_pixel_iou_of_the_planted_mask_is_the_token_mask_upsampled():
    cap, masks = planted_capture()
    rows = spatial.measure(cap, spatial.channel_sets(cap.stats, 1, ["top"]), sources=("rendered",), thresholds=(),
                           chance=False)
    for r, mask, (p, _) in zip(rows, masks, cap.units):
        truth = world.render(world.parse_caption(p)).foreground
        pixels = np.kron(mask, np.ones((4, 4), bool)).astype(bool)
        expected = (pixels & truth).sum() / (pixels | truth).sum()
        assert r["pixel_iou"] == pytest.approx(expected)


def test_iou_downsample_upsample_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random((32, 32)) > 0.5, rng.random((32, 32)) > 0.7
    assert spatial.iou(a, b) == pytest.approx(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())
    assert spatial.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    expected = np.array([[a[4 * i:4 * i + 4, 4 * j:4 * j + 4].mean() >= 0.5 for j in range(8)] for i in range(8)])
    np.testing.assert_array_equal(spatial.downsample(a, (8, 8)), expected)
    m = rng.integers(0, 3, (8, 8))
    np.testing.assert_array_equal(images.upsample(m, (32, 32)), np.kron(m, np.ones((4, 4), int)))
    np.testing.assert_array_equal(spatial.label_map(np.arange(6), (2, 3)), [[0, 1, 2], [3, 4, 5]])


def test_hungarian_assignment_on_a_hand_made_case():
    # tokens 0..9: background {0..5}, object 1 {6, 7}, object 2 {8, 9}
    segments = np.zeros((3, 10), bool)
    segments[0, :6], segments[1, 6:8], segments[2, 8:] = True, True, True
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])  # 4 clusters: the background split in two
    np.testing.assert_array_equal(spatial.assign(labels, segments), [0, 0, 1, 2])  # extra cluster 1 joins by majority
    t = spatial.Truth(np.repeat(np.repeat(segments.reshape(3, 2, 5), 4, 1), 4, 2), segments.reshape(3, 2, 5))
    s = spatial.score(labels, (2, 5), t)
    assert s["token_iou"] == pytest.approx(4 / 5)  # foreground {5..9} vs {6..9}
    assert s["object_ious"] == pytest.approx([2 / 3, 1.0])


def test_hungarian_assignment_maximises_summed_iou_like_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        labels = rng.integers(0, 3, 24)
        labels[:3] = [0, 1, 2]
        seg = rng.integers(0, 3, 24)
        segments = seg[None] == np.arange(3)[:, None]
        mapping = spatial.assign(labels, segments)
        total = lambda perm: sum(spatial.iou(labels == c, segments[perm[c]]) for c in range(3))
        best = max(total(p) for p in itertools.permutations(range(3)))
        assert total(mapping) == pytest.approx(best)


def test_otsu_matches_brute_force_between_class_variance():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(0, 1, 40), rng.normal(6, 1, 24)])
    t = spatial.otsu(v)
    best, best_t = -1, None
    s = np.sort(v)
    for i in range(1, len(s)):
        lo, hi = s[:i], s[i:]
        between = len(lo) * len(hi) / len(s) ** 2 * (lo.mean() - hi.mean()) ** 2
        if between > best:
            best, best_t = between, (s[i - 1] + s[i]) / 2
    assert t == pytest.approx(best_t)
    np.testing.assert_array_equal(spatial.threshold(v, "otsu"), (v > best_t).astype(int))
    np.testing.assert_array_equal(spatial.threshold(v, "median"), (v > np.median(v)).astype(int))


def test_summary_means_and_cis_are_over_units():
    rows = []
    for u in range(6):
        for seed in (0, 1):  # two random sets per unit, averaged per unit first
            rows.append({"prompt": f"p{u}", "seed": 0, "set": "random-4", "token_iou": u / 10 + seed / 100,
                         "pixel_iou": 0.5, "object_iou": float("nan")})
    (r,) = spatial.summary(rows, by=("set",))
    unit_means = [u / 10 + 0.005 for u in range(6)]
    assert r["token_iou"] == pytest.approx(np.mean(unit_means)) and r["n_units"] == 6
    assert r["token_iou_ci"] == pytest.approx(bootstrap_ci(unit_means))
    assert np.isnan(r["object_iou"])
    d = spatial.paired_difference(rows + [{**x, "set": "top-4", "token_iou": x["token_iou"] + 0.2} for x in rows],
                                  {"set": "top-4"}, {"set": "random-4"})
    assert d["difference"] == pytest.approx(0.2)


def test_probe_finds_the_planted_object_channel_and_not_a_random_one():
    cap, _ = planted_capture(n_prompts=9)
    sets = {"top-1": {"kind": "top", "k": 1, "channels": {TAP: [PLANTED_CHANNEL]}},
            "random-1": {"kind": "random", "k": 1, "channels": {TAP: [0]}}}
    rows = linear_probes.probes(cap, sets, targets=["on_object"])
    acc = {r["set"]: r["balanced_accuracy"] for r in rows}
    assert acc["top-1"] == 1.0 and acc["random-1"] < 0.8 and "token (row, col)" in acc
    train, test = linear_probes.split_prompts(cap.prompts, seed=0)
    assert train.isdisjoint(test) and train | test == set(cap.prompts) and len(test) == 3


def test_truth_has_background_and_one_segment_per_object():
    caption = world.heldout_captions(1, 2, seed=0)[0]
    t = spatial.truth(caption, (8, 8))
    assert t.pixels.shape == (3, 32, 32) and t.tokens.shape == (3, 8, 8) and t.n_objects == 2
    np.testing.assert_array_equal(t.pixels[0], ~world.render(world.parse_caption(caption)).foreground)
    image = world.render(world.parse_caption(caption)).image
    judged = spatial.truth(caption, (8, 8), image, "judged")
    assert judged.n_objects == 1 and spatial.iou(judged.pixels[1], ~t.pixels[0]) == 1.0  # the judge is exact on renders


@pytest.fixture(scope="module")
def organism_capture(trained_organism):
    pipe, adapter = trained_organism
    prompts = world.heldout_captions(2, 1, seed=0) + world.heldout_captions(1, 2, seed=0)
    return adapter, spatial.capture(adapter, prompts, num_inference_steps=3, steps=[1, 2], batch_size=2)


def test_organism_capture_measure_and_probes(organism_capture):
    adapter, cap = organism_capture
    assert cap.grid == adapter.grid() == (8, 8) and cap.patch == (4, 4) and len(cap.taps) == 8
    assert cap.features(cap.taps[0], 1).shape == (3, 64, adapter.width)
    # batching does not change what is captured
    again = spatial.capture(adapter, cap.prompts, num_inference_steps=3, taps=[cap.taps[3]], steps=[2], batch_size=3)
    np.testing.assert_allclose(again.features(cap.taps[3], 2), cap.features(cap.taps[3], 2), atol=1e-4)
    sets = spatial.channel_sets(cap.stats, 4, n_random=2)
    assert list(sets) == ["top-4", "bottom_abs_mean-4", "bottom_rms-4", "random-4#0", "random-4#1", "all"]
    rows = spatial.measure(cap, sets, taps=cap.taps[-2:], steps=[2], n_clusters=(2, 3))
    # units x taps x steps x (6 sets x 2 K + chance x 2 K + 2 thresholds) x 2 sources
    assert len(rows) == 3 * 2 * 1 * (6 * 2 + 2 + 2) * 2
    assert all(0 <= r["token_iou"] <= 1 and 0 <= r["pixel_iou"] <= 1 for r in rows)
    assert {r["n_objects"] for r in rows} == {1, 2}
    table = {r["set"]: r for r in spatial.summary(rows, source="rendered", n_clusters=2)}
    assert set(table) == {"top-4", "bottom_abs_mean-4", "bottom_rms-4", "random-4", "all", "chance", "threshold-otsu",
                          "threshold-median"}
    m, taps, steps = spatial.layer_step_map(rows, set="top-4", source="rendered")
    assert m.shape == (2, 1) and taps == cap.taps[-2:] and steps == [2]
    probe_rows = linear_probes.probes(cap, {"top-4": sets["top-4"]}, taps=cap.taps[-1:], steps=[2])
    assert {r["target"] for r in probe_rows} == set(linear_probes.TARGETS)


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
def test_masks_on_any_adapter_with_an_image_token_grid(family):
    from test_models import FAMILIES, built

    pipe, call = built(family)
    adapter = mabook.adapter_for(pipe)
    pipe.set_progress_bar_config(disable=True)
    cap = spatial.capture(adapter, ["a red circle", "red"], num_inference_steps=2, **call)
    h, w = FAMILIES[family][2]
    assert cap.grid == (h, w) and cap.images.shape[1:] == (8, 8, 3)
    tap = spatial.image_tap(adapter)
    assert cap.features(tap, 1).shape == (2, h * w, adapter.width)
    sets = spatial.channel_sets(cap.stats, 2, ["top", "random", "all"], n_random=1)
    fg = spatial.foreground_maps(cap, tap, 1, sets["top-2"]["channels"][tap], source=None)  # no ground truth here
    assert fg.shape == (2, h, w) and fg.any((1, 2)).all() and not fg.all((1, 2)).any()
    assert images.overlay(cap.images, fg).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="ground truth needs a shapes-world caption, got 'a red circle'"):
        spatial.measure(cap, sets)


def test_bad_input_gives_clear_errors(organism_capture):
    adapter, cap = organism_capture
    x = cap.features(cap.taps[0], 1)[0]
    with pytest.raises(ValueError, match="K=1 is out of range; allowed: 2 <= K < 64"):
        spatial.kmeans(x, 1)
    with pytest.raises(ValueError, match="K=64 is out of range; allowed: 2 <= K < 64"):
        spatial.measure(cap, spatial.channel_sets(cap.stats, 1, ["top"]), n_clusters=64)
    with pytest.raises(ValueError, match="the channel set is empty"):
        spatial.kmeans(x[:, []], 2)
    with pytest.raises(ValueError, match="the channel set is empty"):
        spatial.measure(cap, {"none": {"kind": "top", "k": 0, "channels": {t: [] for t in cap.taps}}})
    with pytest.raises(ValueError, match=r"channel 128 is out of range; allowed: ints in \[0, 128\)"):
        cap.features(cap.taps[0], 1, [128])
    with pytest.raises(ValueError, match="unknown tap 'transformer_blocks.9.img'"):
        cap.features("transformer_blocks.9.img", 1)
    with pytest.raises(ValueError, match="unknown tap 'transformer_blocks.9.img'"):
        spatial.capture(adapter, ["a red circle"], num_inference_steps=1, taps=["transformer_blocks.9.img"])
    with pytest.raises(ValueError, match="is on the 'txt' stream; spatial maps need an image tap"):
        spatial.capture(adapter, ["a red circle"], num_inference_steps=1, taps=["transformer_blocks.0.txt"])
    with pytest.raises(ValueError, match=r"step 7 never ran; the steps that ran were 0..2"):
        cap.features(cap.taps[0], 7)
    with pytest.raises(ValueError, match=r"capture asked for step\(s\) \[5\], but the steps that ran were 0..1"):
        spatial.capture(adapter, ["a red circle"], num_inference_steps=2, steps=[5])
    with pytest.raises(ValueError, match=r"capture missing: \('transformer_blocks.0.img', 0\) was not captured"):
        cap.features(cap.taps[0], 0)
    with pytest.raises(ValueError, match="unknown channel set kind 'middle'"):
        spatial.channel_sets(cap.stats, 4, ["middle"])
    with pytest.raises(ValueError, match="unknown ground-truth source 'drawn'"):
        spatial.measure(cap, spatial.channel_sets(cap.stats, 1, ["top"]), sources=("drawn",))
    with pytest.raises(ValueError, match="unknown threshold rule 'mean'"):
        spatial.threshold(np.arange(4.0), "mean")
    with pytest.raises(ValueError, match="unknown probe target 'texture'"):
        linear_probes.probes(cap, spatial.channel_sets(cap.stats, 1, ["top"]), targets=["texture"])


def test_embed_bad_input_gives_a_clear_error():  # its own test: linear_probes.embed imports umap first (numba, ~20 s)
    with pytest.raises(ValueError, match="n_neighbors=50 is out of range"):
        linear_probes.embed(np.zeros((20, 3)), n_neighbors=50)


@pytest.mark.slow  # UMAP's first call compiles numba kernels (~10 s)
def test_embed_is_seeded_and_two_dimensional():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 4)), rng.normal(8, 1, (30, 4))])
    a, b = linear_probes.embed(x, n_neighbors=5, n_epochs=50), linear_probes.embed(x, n_neighbors=5, n_epochs=50)
    assert a.shape == (60, 2)
    np.testing.assert_allclose(a, b)
