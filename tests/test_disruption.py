"""mabook.disruption: baselines, channel sets, conditions, the table and its summaries.

Checked against independent computations: numpy on raw hidden states for the channel sets and
the dataset means, numpy means for ratios, planted signals for the prompt/timestep split.
"""

import numpy as np
import pytest
import torch

import mabook
from mabook import disruption, organism, probe, stats, world
from mabook.metrics import MissingWeights
from mabook.probe import Tap
from mabook.statistics import Statistics

torch.set_num_threads(1)
PROMPTS = world.heldout_captions(3, 1, seed=0)
STEPS = 4


@pytest.fixture(scope="module")
def adapter(trained_organism):
    return trained_organism[1]


@pytest.fixture(scope="module")
def base(adapter):
    return disruption.baseline(adapter, PROMPTS, seeds=[0, 1], num_inference_steps=STEPS)


def assert_no_hooks(adapter):
    for name, module in adapter.transformer.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr), f"{name or 'transformer'}.{attr} not empty"


def test_baseline_images_do_not_depend_on_batching(adapter, base):
    again = disruption.baseline(adapter, PROMPTS, seeds=[0, 1], num_inference_steps=STEPS, batch_size=2)
    assert base.units == [(p, s) for s in (0, 1) for p in PROMPTS]
    np.testing.assert_allclose(again.images, base.images, atol=1e-5)
    assert base.token_means.shape == (6, STEPS, 8, adapter.width)
    assert all(m["pixel_mse"] == 0 and m["ssim"] == pytest.approx(1) for m in base.metrics)


def test_identity_condition_changes_nothing(base):
    cond = disruption.conditions(base, ks=[4], kinds=["top"], op="scale", value=1.0)
    result = disruption.run(base, cond)
    rows = [r for r in result.table if r["kind"] == "top"]
    assert len(rows) == len(base.units)
    assert all(r["pixel_mse"] == 0 and r["ssim"] == pytest.approx(1) for r in rows)


def test_zeroing_top_channels_changes_images_and_table_has_judge_columns(base):
    result = disruption.run(base, disruption.conditions(base, ks=[4], kinds=["top"]))
    rows = [r for r in result.table if r["kind"] == "top"]
    assert np.mean([r["pixel_mse"] for r in rows]) > 1e-4
    for key in ("color", "shape", "size", "position", "cleanliness", "mask_iou", "ssim", "prompt", "seed"):
        assert key in rows[0]
    assert set(result.images) == {"baseline", "top-4 | zero | all layers, all steps"}


def planted_statistics():
    """Channel 0: level 50 (top); channel 1: +-20 alternating over tokens (|mean| 0, RMS 20); channel 2: zeros;
    the rest N(0, 1). Returns (stats, raw arrays per step)."""
    g = torch.Generator().manual_seed(0)
    stats, raw = Statistics(), []
    for step in range(2):
        x = torch.randn(3, 16, 12, generator=g)
        x[..., 0] += 50
        x[..., 1] = 20 * torch.tensor([1.0, -1.0]).repeat(8)
        x[..., 2] = 0
        stats.update(Tap("transformer_blocks.0", "img"), step, x)
        raw.append(x.numpy().astype(np.float64))
    return stats, np.concatenate(raw)


def test_channel_sets_match_numpy_on_raw_hidden_states():
    stats, x = planted_statistics()
    flat = x.reshape(-1, x.shape[-1])
    abs_mean = np.abs(x.mean(1)).mean(0)
    rms = np.sqrt((flat ** 2).mean(0))
    k = 3
    assert disruption.channel_set(stats, k, "top")["transformer_blocks.0.img"] == list(np.argsort(-abs_mean)[:k])
    assert disruption.channel_set(stats, k, "bottom_abs_mean")["transformer_blocks.0.img"] == list(np.argsort(abs_mean)[:k])
    assert disruption.channel_set(stats, k, "bottom_rms")["transformer_blocks.0.img"] == list(np.argsort(rms)[:k])
    bottom_abs = disruption.channel_set(stats, 4, "bottom_abs_mean")["transformer_blocks.0.img"]
    bottom_rms = disruption.channel_set(stats, 4, "bottom_rms")["transformer_blocks.0.img"]
    assert 1 in bottom_abs and 1 not in bottom_rms  # the loud zero-mean channel: a "low statistic" only by |mean|
    random = disruption.channel_set(stats, 3, "random", seed=4)["transformer_blocks.0.img"]
    assert 0 not in random and random == disruption.channel_set(stats, 3, "random", seed=4)["transformer_blocks.0.img"]


def test_mean_op_writes_each_steps_dataset_mean(adapter, base):
    tap, step = "transformer_blocks.2.img", 1
    # the dataset mean, independently: numpy over the baseline's hidden states (both guidance halves, all units)
    generators = [torch.Generator().manual_seed(s) for _, s in base.units]
    with probe.collect(adapter, taps=[tap], cfg="both", capture=[(tap, step)]) as run:
        adapter.pipe([p for p, _ in base.units], num_inference_steps=STEPS, generator=generators, output_type="np")
    expected = run.captured[(tap, step)].double().numpy().mean((0, 1))
    cond = disruption.Condition("top-2", "top", 2, "mean", ((tap, (7, 66)),))
    with probe.edit(adapter, cond.edits(base.stats)):
        with probe.collect(adapter, taps=[tap], cfg="both", capture=[(tap, step)]) as edited:
            adapter.pipe([p for p, _ in base.units], num_inference_steps=STEPS, generator=generators, output_type="np")
    x = edited.captured[(tap, step)].numpy()
    np.testing.assert_allclose(x[..., 7], expected[7], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x[..., 66], expected[66], rtol=1e-5, atol=1e-6)


def synthetic_table():
    rows = []
    for u in range(10):
        for kind, level in (("baseline", 0.0), ("top", 3.0), ("random", 1.0)):
            for rep in range(1 if kind != "random" else 2):
                value = level * (1 + u / 10) + (0.1 * rep if kind == "random" else 0)
                rows.append({"prompt": f"p{u}", "seed": 0, "kind": kind, "k": 0 if kind == "baseline" else 4,
                             "op": "none" if kind == "baseline" else "zero",
                             "window": "none" if kind == "baseline" else "all layers, all steps",
                             "condition": kind, "pixel_mse": value, "cleanliness": 1 - value / 10,
                             "ssim": 1 - value / 10})
    return rows


def test_paired_ratio_and_summary_against_numpy():
    table = synthetic_table()
    top = np.array([3.0 * (1 + u / 10) for u in range(10)])
    rnd = np.array([1.0 * (1 + u / 10) + 0.05 for u in range(10)])  # two random sets averaged per unit
    (ratio,) = disruption.paired_ratios(table, "pixel_mse", controls=["random"])
    assert ratio["ratio"] == pytest.approx(top.mean() / rnd.mean())
    assert ratio["ci"][0] <= ratio["ratio"] <= ratio["ci"][1]
    (clean,) = disruption.paired_ratios(table, "cleanliness", controls=["random"])  # drop below each unit's baseline
    assert clean["top_damage"] == pytest.approx((top / 10).mean())
    rows = {r["kind"]: r for r in disruption.summary(table, ["pixel_mse"])}
    assert rows["top"]["pixel_mse"] == pytest.approx(top.mean()) and rows["top"]["n_units"] == 10
    low, high = rows["top"]["pixel_mse_ci"]
    assert low < top.mean() < high


def test_energy_control_moves_random_channels_as_far_as_the_top_edit(adapter):
    """The energy-matched control's shift, against numpy on the hidden states themselves: at a
    (tap, step), zeroing the top-4 moves a token by sqrt(mean over tokens of sum_c x_c^2); the control
    moves its 4 random channels by a constant vector of that length (same for mean-replacement with
    the per-step variance). Checked on a 2-prompt generation whose statistics are the same tokens."""
    tap, step = "transformer_blocks.1.img", 2
    with probe.collect(adapter, cfg="both", capture=[(tap, step)]) as run:
        adapter.generate([(p, 0) for p in PROMPTS[:2]], STEPS)
    hidden = run.captured[(tap, step)].double().numpy()  # (samples, tokens, channels)
    top = disruption.channel_set(run.stats, 4, "top")[tap]
    rand = disruption.channel_set(run.stats, 4, "energy", seed=3)[tap]
    assert rand == disruption.channel_set(run.stats, 4, "random", seed=3)[tap] and not set(rand) & set(top)
    x = hidden[..., top]
    expected = {"zero": np.sqrt((x ** 2).sum(-1).mean()), "mean": np.sqrt(((x - x.mean((0, 1))) ** 2).sum(-1).mean())}
    for op, length in expected.items():
        cond = disruption.Condition("energy-4#3", "energy", 4, op, ((tap, tuple(rand)),), seed=3, matched=((tap, tuple(top)),))
        (edit,) = [e for e in cond.edits(run.stats) if e.steps == [step]]
        h = torch.from_numpy(hidden).float()
        moved = edit.apply(h, torch.tensor(rand)) - h
        shift = moved[..., rand].double().numpy()
        assert np.allclose(shift, shift[0, 0], atol=1e-5)  # one constant vector for every token
        assert np.linalg.norm(shift[0, 0]) == pytest.approx(length, rel=1e-4), op
        assert np.abs(np.delete(moved.numpy(), rand, axis=-1)).max() == 0  # no other channel moves
    with pytest.raises(ValueError, match="energy-matched control needs op in"):
        disruption.Condition("e", "energy", 4, "token_mean", ((tap, tuple(rand)),), matched=((tap, tuple(top)),))


def test_cis_resample_prompts_not_the_seeds_of_one_prompt():
    """Two seeds of one prompt are not two independent draws. A table whose two seeds per prompt
    give equal values carries the information of its 16 prompts: the prompt-clustered CI has the
    width of a plain bootstrap over the 16 prompt means (an independent computation); the old
    per-unit CI is ~1/sqrt(2) as wide -- over-confident."""
    rng = np.random.default_rng(3)
    per_prompt = rng.gamma(2.0, 1.0, 16)
    table = [{"prompt": f"p{i}", "seed": seed, "kind": kind, "k": 0 if kind == "baseline" else 4, "op": "zero",
              "window": "all", "condition": kind, "pixel_mse": value * (3.0 if kind == "top" else 1.0)}
             for i, value in enumerate(per_prompt) for seed in (0, 1) for kind in ("baseline", "top", "random")]
    rows = {r["kind"]: r for r in disruption.summary(table, ["pixel_mse"])}
    width = np.subtract(*rows["random"]["pixel_mse_ci"][::-1])
    low, high = stats.bootstrap_ci(per_prompt, n_resamples=2000)
    assert rows["random"]["n_prompts"] == 16 and rows["random"]["n_units"] == 32
    assert width == pytest.approx(high - low, rel=0.15)
    unit_rows = {r["kind"]: r for r in disruption.summary(table, ["pixel_mse"], cluster=None)}
    assert np.subtract(*unit_rows["random"]["pixel_mse_ci"][::-1]) / width == pytest.approx(2 ** -0.5, rel=0.15)
    # the paired ratio: every prompt's top/random ratio is exactly 3, so any resample of prompts gives 3
    (ratio,) = disruption.paired_ratios(table, "pixel_mse", controls=["random"], window="all")
    assert ratio["ratio"] == pytest.approx(3.0) and ratio["ci"] == pytest.approx((3.0, 3.0))


def test_cluster_bootstrap_against_a_loop():
    """stats' cluster bootstrap against a plain loop over resamples (numpy, one draw of groups at a time)."""
    rng = np.random.default_rng(0)
    values, groups = rng.normal(size=12), [i // 3 for i in range(12)]
    got = stats.bootstrap_ci(values, groups=groups, n_resamples=500, seed=7)
    draws = np.random.default_rng(7).integers(0, 4, size=(500, 4))
    means = [np.concatenate([values[np.array(groups) == g] for g in row]).mean() for row in draws]
    assert got == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    with pytest.raises(ValueError, match="needs at least 2 groups"):
        stats.bootstrap_ci(values, groups=[0] * 12)
    with pytest.raises(ValueError, match="groups has 3 labels for 12 values"):
        stats.bootstrap_ci(values, groups=[0, 1, 2])


def test_decomposition_separates_prompt_from_timestep(base):
    units, steps, layers, C = base.token_means.shape
    timestep_only = np.broadcast_to(np.linspace(0, 5, steps)[None, :, None, None], base.token_means.shape)
    index = {p: i for i, p in enumerate(dict.fromkeys(p for p, _ in base.units))}
    prompt_only = np.broadcast_to(np.array([index[p] for p, _ in base.units], dtype=float)[:, None, None, None],
                                  base.token_means.shape)
    for values, share in ((timestep_only, 0.0), (prompt_only, 1.0)):
        fake = disruption.Baseline(base.adapter, base.units, base.images, base.stats, np.array(values), STEPS)
        rows = disruption.decomposition(fake, {base.layers[0]: [0, 1]})
        assert rows[0]["prompt_share"] == pytest.approx(share)


def test_decomposition_separates_the_seed_from_the_prompt(base):
    """3 prompts x 2 seeds: a value that moves with the seed only is seed variance, not prompt
    variance; on random values, prompt + seed variance is the across-unit variance (the law of
    total variance, computed here with numpy as one number) and the shares are those variances' parts."""
    layers = len(base.layers)
    units = [(p, s) for s in (0, 1) for p in ("a", "b", "c")]  # seed-major, as check_units makes them
    seed_only = np.broadcast_to(np.array([0.0, 0, 0, 4, 4, 4])[:, None, None, None], (6, 3, layers, 2)) * 1e3
    fake = disruption.Baseline(base.adapter, units, base.images, base.stats, np.array(seed_only), 3)
    (row,) = disruption.decomposition(fake, {base.layers[0]: [0, 1]})
    assert row["seed_share"] == pytest.approx(1.0) and row["prompt_share"] == pytest.approx(0.0, abs=1e-12)
    assert row["seed_var"] == pytest.approx(4e6)  # seeds at 0 and 4000: population variance 2000^2

    values = np.random.default_rng(0).normal(size=(6, 3, layers, 2)) * np.array([1.0, 3e3])  # real-model magnitudes
    fake = disruption.Baseline(base.adapter, units, base.images, base.stats, values, 3)
    (row,) = disruption.decomposition(fake, {base.layers[0]: [0, 1]})
    m = values[:, :, 0, :]
    across_units = m.var(0).mean()
    assert row["prompt_var"] + row["seed_var"] == pytest.approx(across_units, rel=1e-12)
    prompt_means = np.stack([m[[0, 3]].mean(0), m[[1, 4]].mean(0), m[[2, 5]].mean(0)])
    assert row["prompt_var"] == pytest.approx(prompt_means.var(0).mean(), rel=1e-12)
    total = across_units + m.var(1).mean()
    assert row["prompt_share"] == pytest.approx(row["prompt_var"] / total) and 0 < row["seed_share"] < 1
    with pytest.raises(ValueError, match=r"as many seeds for every prompt, got \[1, 2\] seeds"):
        disruption.decomposition(disruption.Baseline(base.adapter, units[:5], base.images, base.stats, values[:5], 3),
                                 {base.layers[0]: [0]})


def test_windows_split_layers_and_steps_in_equal_thirds(base):
    layers, steps, label = disruption.window(base.layers, 20, "mid", "late")
    assert layers == base.layers[3:5] and steps == tuple(range(14, 20)) and label == "mid layers, late steps"  # 8 layers
    sizes = {(len(ls), len(st)) for lp in disruption.PARTS for sp in disruption.PARTS
             for ls, st, _ in [disruption.window([f"l{i}" for i in range(8)], 20, lp, sp)]}
    assert sizes == {(2, 6)}  # every window edits 12 (tap, step) pairs: 8 // 3 layers x 20 // 3 steps
    assert disruption.window([f"l{i}" for i in range(8)], 20, "mid", "early")[:2] == (["l3", "l4"], tuple(range(6)))
    assert disruption.window([f"l{i}" for i in range(8)], 20, "late", "mid")[:2] == (["l6", "l7"], tuple(range(7, 13)))
    conds = disruption.window_conditions(base, k=2)
    assert len(conds) == 9 * 2 and {c.window for c in conds} == {f"{a} layers, {b} steps" for a in disruption.PARTS
                                                                   for b in disruption.PARTS}


def test_bad_input_gives_clear_errors(adapter, base):
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        disruption.baseline(adapter, [], seeds=[0])
    with pytest.raises(ValueError, match="every prompt must be a non-empty str, got ''"):
        disruption.baseline(adapter, [""], seeds=[0])
    with pytest.raises(ValueError, match=r"k=129 is out of range; allowed: 1 <= k <= 128"):
        disruption.conditions(base, ks=[129])
    with pytest.raises(ValueError, match="unknown op 'erase'; allowed"):
        disruption.conditions(base, op="erase")
    with pytest.raises(ValueError, match="op 'scale' needs a numeric value"):
        disruption.conditions(base, op="scale")
    with pytest.raises(ValueError, match="unknown window part 'middle'"):
        disruption.conditions(base, layer_part="middle")
    with pytest.raises(ValueError, match="window .* is empty"):
        disruption.window(base.layers, 2, "all", "late")
    with pytest.raises(ValueError, match="has 1 channels at transformer_blocks.0.img, expected k=2"):
        disruption.Condition("x", "top", 2, "zero", (("transformer_blocks.0.img", (1,)),))
    bad_tap = disruption.Condition("x", "top", 1, "zero", (("transformer_blocks.9.img", (1,)),))
    with pytest.raises(ValueError, match="unknown tap 'transformer_blocks.9.img'"):
        disruption.run(base, [bad_tap])
    assert_no_hooks(adapter)


def test_no_hook_survives_an_exception_mid_run(adapter, base):
    class Boom(disruption.Condition):
        def edits(self, stats):
            return [probe.Edit("transformer_blocks.1.img", [1], lambda x: (_ for _ in ()).throw(KeyboardInterrupt()))]

    with pytest.raises(KeyboardInterrupt):
        disruption.run(base, [Boom("boom", "top", 1, "zero", (("transformer_blocks.1.img", (1,)),))])
    assert_no_hooks(adapter)


def test_runner_works_on_any_flux_architecture_model(tmp_path):
    torch.manual_seed(1)
    pipe = organism.build_pipeline()  # random weights, another checkpoint: only what the adapter provides is used
    organism.save(pipe, tmp_path / "other.safetensors")
    other, adapter = mabook.load("organism", path=tmp_path / "other.safetensors")
    other.set_progress_bar_config(disable=True)
    b = disruption.baseline(adapter, ["a red circle"], seeds=[0], num_inference_steps=2)
    result = disruption.run(b, disruption.conditions(b, ks=[2], kinds=["top", "random"], n_random=1))
    assert len(result.table) == 3


def tiny_clip_dir(tmp_path):
    """A random-weight CLIP with a character-level BPE tokenizer, saved like a hub checkpoint."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                         pad_token_id=1),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_real_model_path_has_pixel_metrics_and_clip_t(tmp_path):
    from test_models import built  # a tiny random FLUX pipeline, as a real model is loaded

    pipe, call = built("flux")
    pipe.save_pretrained(tmp_path / "flux")
    loaded, adapter = mabook.load(tmp_path / "flux")
    loaded.set_progress_bar_config(disable=True)
    clip = tiny_clip_dir(tmp_path)
    b = disruption.baseline(adapter, ["a red circle", "red"], seeds=[0], num_inference_steps=2, clip_model=str(clip), **call)
    result = disruption.run(b, disruption.conditions(b, ks=[2], kinds=["top", "random"], n_random=1))
    row = result.table[-1]
    assert {"pixel_mse", "ssim", "clip_t"} <= set(row) and "cleanliness" not in row  # no judge for non-world prompts
    # CLIP-T, independently: cosine of the projected embeddings, x 100 (clamped at 0), from transformers directly
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    image = (np.clip(b.images[0], 0, 1) * 255).round().astype(np.uint8)
    inputs = processor(text=["a red circle"], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    expected = max(100 * torch.nn.functional.cosine_similarity(img, txt).item(), 0)
    assert b.metrics[0]["clip_t"] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(MissingWeights, match="CLIP-T needs the CLIP model .*nothing"):  # before anything is generated
        disruption.baseline(adapter, ["red"], seeds=[0], num_inference_steps=1, clip_model=str(tmp_path / "nothing"), **call)
