"""mabook.sinks, issue 22: the mass-matched random control and the per-sample sink statistics.

Independent computations: the mass-matched keys are re-drawn by a plain loop in numpy on a captured
mass tensor (the same seeded order, the rule its docstring states); the mass the interventions removed
is read back from an `attention.capture` nested inside them; the per-sample statistics are recomputed
from one separate capture per unit.
"""

import json
import zlib

import numpy as np
import pytest
import torch

from mabook import attention, disruption, scorecard, sink_samples, sinks, world
from mabook.attention import KeyIntervention
from mabook.stats import bootstrap_ci, paired_ratio_ci

torch.set_num_threads(1)
STEPS = 3
LAYER = "single_transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def organism(trained_organism):
    return trained_organism


@pytest.fixture(scope="module")
def captured(organism):
    """A per-sample capture over the baselines of 3 prompts x 2 seeds (the units, in order)."""
    _, adapter = organism
    with sink_samples.capture_samples(adapter) as cap:
        base = disruption.baseline(adapter, world.heldout_captions(3, 1, seed=1), (0, 1), STEPS)
    return cap, base


# -- the mass-matched keys against a plain numpy loop ------------------------------------------------


def numpy_mass_matched(rows: np.ndarray, k: int, seed: int, layer: str, step: int, head: int, tolerance: float) -> list[int]:
    """The documented rule for one head, one key at a time: the seeded order (the count-matched
    control's torch draw, the one thing taken from torch), the sinks skipped; a key is taken while
    the total stays <= T (1 + tolerance) and passed over otherwise, until the total reaches T (1 - tolerance)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{layer}|{step}".encode()))
    draw = torch.rand(*rows.shape, generator=g).numpy()[head]
    row = rows[head].astype(np.float64)
    sinks_ = set(np.argsort(-row, kind="stable")[:k].tolist())
    target = row[sorted(sinks_)].sum()
    total, taken = 0.0, []
    for key in np.argsort(draw, kind="stable"):
        if key in sinks_:
            continue
        if total >= target * (1 - tolerance):
            break
        if total + row[key] <= target * (1 + tolerance):
            taken.append(int(key))
            total += row[key]
    return taken


def chosen_sets(match, head: int) -> set[int]:
    return set(match.keys[head, :int(match.count[head])].tolist())


@pytest.mark.parametrize("k", [1, 3])
def test_mass_matched_keys_equal_an_independent_numpy_draw(captured, k):
    cap, _ = captured
    within, checked = [], 0
    for layer, step in cap.captured[::4]:
        mass = cap.mass(layer, step).numpy()  # (heads, keys) float64, each row sums to 1
        match = sinks.mass_matched_keys(mass, k, seed=2, layer=layer, step=step)
        for h in range(mass.shape[0]):
            row = mass[h]
            expected = numpy_mass_matched(mass, k, 2, layer, step, h, sinks.MASS_TOLERANCE)
            got = chosen_sets(match, h)
            assert got == set(expected), (layer, step, h)
            top = set(np.argsort(-row, kind="stable")[:k].tolist())
            assert not got & top  # never a sink
            target = row[sorted(top)].sum()
            held = row[sorted(got)].sum()  # each key once, whatever the padding repeats
            assert match.target[h] == pytest.approx(target, rel=1e-12)
            assert match.matched[h] == pytest.approx(held, rel=1e-9)
            assert bool(match.within[h]) == (abs(held - target) <= sinks.MASS_TOLERANCE * target + 1e-15)
            padded = match.keys[h].tolist()  # the padding repeats the row's first key
            assert set(padded) == got and len(padded) == int(match.count.max())
            within.append(bool(match.within[h]))
            checked += 1
    assert checked > 20 and np.mean(within) > 0.9  # matched within the tolerance almost everywhere on the organism


def test_mass_matched_keys_are_seeded_batched_and_reach_what_can_be_reached():
    rng = np.random.default_rng(0)
    mass = rng.dirichlet(np.ones(40) * 0.5, size=(3, 4))  # (samples, heads, keys)
    a = sinks.mass_matched_keys(mass, 2, seed=5, layer="x.attn", step=1)
    b = sinks.mass_matched_keys(torch.from_numpy(mass), 2, seed=5, layer="x.attn", step=1)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.count, b.count)  # reproducible; arrays and tensors alike
    c = sinks.mass_matched_keys(mass, 2, seed=6, layer="x.attn", step=1)
    assert not torch.equal(a.keys, c.keys)  # another seed, another draw
    for i in range(3):  # a batch gives each sample's own result, the draw shared
        one = sinks.mass_matched_keys(mass[i], 2, seed=5, layer="x.attn", step=1)
        for h in range(4):
            assert chosen_sets(one, h) == set(a.keys[i, h, :int(a.count[i, h])].tolist())
    # sinks holding more than the rest: every non-sink key, short of the target, not within the tolerance
    heavy = np.full(10, 0.02)
    heavy[3] = 0.82
    m = sinks.mass_matched_keys(heavy[None], 1, seed=0)
    assert int(m.count[0]) == 9 and not bool(m.within[0])
    assert float(m.matched[0]) == pytest.approx(0.18) and float(m.target[0]) == pytest.approx(0.82)
    assert 3 not in m.keys[0].tolist()
    # a wider tolerance never needs more keys
    wide = sinks.mass_matched_keys(mass, 2, seed=5, layer="x.attn", step=1, tolerance=0.5)
    assert bool(wide.within.all())


@pytest.mark.parametrize("path,eta,dose", [("score", 0.0, "redistribute"), ("score", 0.5, "renormalise"),
                                           ("value_zero", 0.0, "redistribute"), ("value_mean", 0.0, "redistribute")])
def test_a_padded_key_list_edits_as_its_own_keys_would(path, eta, dose):
    """Rows of a mass-matched choice hold different numbers of keys; the padding repeats a row's first
    key. Every path the control allows must edit a padded row as the row's own keys alone would."""
    from mabook import softmax

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g) for _ in range(3))
    mass = softmax.image_query_mass(q, k, slice(4, 20))
    match = sinks.mass_matched_keys(mass, 1, seed=1, tolerance=0.2)
    assert len(set(match.count.flatten().tolist())) > 1  # padded rows among them
    padded = softmax.attention(q, k, v, [softmax.Edit(match.keys, path, eta, dose)])[0]
    fused = softmax.attend(q, k, v, match.keys, path, eta, dose=dose)
    for b in range(2):
        for h in range(3):
            own = match.keys[b, h, :int(match.count[b, h])][None, None]
            alone = softmax.attention(q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1],
                                      [softmax.Edit(own, path, eta, dose)])[0]
            torch.testing.assert_close(padded[b, h], alone[0, 0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fused[b, h], alone[0, 0], rtol=1e-4, atol=1e-5)


def test_random_mass_extends_the_count_matched_draw_at_a_call(organism):
    """k = 1: the mass-matched set of a seed holds the count-matched control's key of the same seed
    (both read the same unedited mass at the first intervened call)."""
    pipe, adapter = organism
    prompt = world.heldout_captions(1, 1, seed=3)
    chosen = {}
    for iv in (KeyIntervention("random", 1, layers=LAYER, steps=[0], seed=4),
               sinks.MassMatched(k=1, layers=LAYER, steps=[0], seed=4)):
        with sinks.Recorded(adapter, iv) as rec:
            pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
        chosen[iv.keys] = rec.chosen[(LAYER, 0)]
    random_keys, matched = chosen["random"], chosen["random-mass"]
    assert random_keys.shape[-1] == 1 and matched.shape[-1] >= 1
    assert all(int(random_keys[b, h, 0]) in matched[b, h].tolist()
               for b in range(matched.shape[0]) for h in range(matched.shape[1]))


# -- the run: the mass each intervention removed ------------------------------------------------------


@pytest.fixture(scope="module")
def small_run(organism, captured):
    _, base = captured
    first = disruption.Baseline(base.adapter, base.units[:4], base.images[:4], base.stats, base.token_means[:4],
                                base.num_inference_steps, base.pipe_kwargs, base.metrics[:4])
    ivs = sinks.interventions([1], layers=LAYER, n_random=1, controls=sinks.CONTROLS)
    return first, ivs, sinks.run(first, ivs, batch_size=3)  # batches of 3 and 1: units told apart in both


def test_run_records_the_mass_a_nested_capture_sees(organism, small_run):
    pipe, adapter = organism
    first, ivs, result = small_run
    assert [iv.keys for iv in ivs] == ["sink", "bottom", "random", "random-mass"]
    rows = {(r["kind"], r["prompt"], r["seed"]): r for r in result.table if r["kind"] != "baseline"}
    for iv in ivs:
        for prompt, seed in first.units[2:4]:  # one unit at a time, a capture of both guidance halves nested inside
            with sinks.Recorded(adapter, iv) as rec:
                rec.begin(1)
                with attention.capture(adapter, layers=LAYER, cfg="both") as cap, \
                        attention.capture(adapter, layers=LAYER, cfg="cond") as cond, \
                        attention.capture(adapter, layers=LAYER, cfg="uncond") as uncond:
                    out = pipe([prompt], num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(seed)],
                               output_type="np")
                held = rec.finish()[0]
            before = np.mean([cap.suppressed(LAYER, s)[0].numpy() for s in sorted(cap.steps_seen)])
            sink_mass = np.mean([c.mass(LAYER, s).topk(1, dim=-1).values.numpy() for s in sorted(cap.steps_seen)
                                 for c in (cond, uncond)])  # each guidance half's own top-1
            row = rows[(iv.keys, prompt, seed)]
            assert row["mass_removed"] == pytest.approx(before, rel=1e-5)
            assert held["mass_removed"] == pytest.approx(before, rel=1e-6)  # the capture sums in float32
            assert row["sink_mass"] == pytest.approx(sink_mass, rel=1e-5)
            mse = ((np.asarray(out.images)[0].astype(np.float64) - first.images[first.units.index((prompt, seed))]) ** 2).mean()
            assert row["pixel_mse"] == pytest.approx(mse, rel=1e-4, abs=1e-9)
    for (kind, *_), row in rows.items():
        if kind == "sink":
            assert row["mass_removed"] == pytest.approx(row["sink_mass"]) and row["keys_used"] == 1
        if kind == "random-mass":
            assert row["keys_used"] > 1 and row["within_tolerance"] > 0.5
            assert abs(row["mass_removed"] / row["sink_mass"] - 1) < 2 * sinks.MASS_TOLERANCE


def test_combined_is_the_score_and_the_value_path_nested_in_one_attention(organism, small_run):
    """The paper's combination: its images are those of the two interventions nested by hand (each
    part choosing from the unedited mass); the table's op names both parts and the mass recorded is
    the score part's (at eta = 0 exactly the score path's). At eta = 0 the sinks get no
    probability, so replacing their values changes nothing: the combination is the score path alone,
    bit for bit; at eta = 0.1 it is neither part alone."""
    _, adapter = organism
    first, _, _ = small_run
    score0, value = sinks.intervention("sink", 1, layers=LAYER), sinks.intervention("sink", 1, "value_mean", layers=LAYER)
    score1 = sinks.intervention("sink", 1, eta=0.1, layers=LAYER)
    both0, both1 = sinks.Combined(score0, value), sinks.combined("sink", 1, "value_mean", eta=0.1, layers=LAYER)
    result = sinks.run(first, [both0, both1, score0, score1, value], batch_size=4)
    with attention.intervene(adapter, score1), attention.intervene(adapter, value):
        by_hand = adapter.generate(first.units, STEPS, 4)
    np.testing.assert_array_equal(result.images[f"{both1.name} | {LAYER}, all steps"], by_hand)
    rows = {(r["condition"], r["prompt"], r["seed"]): r for r in result.table}
    for (prompt, seed), m in zip(first.units, disruption.unit_metrics(first, by_hand)):
        r0, r1 = rows[(both0.name, prompt, seed)], rows[(both1.name, prompt, seed)]
        assert (r0["op"], r1["op"]) == ("score eta=0 + value_mean", "score eta=0.1 + value_mean") and r1["kind"] == "sink"
        assert r1["pixel_mse"] == m["pixel_mse"] and r1["ssim"] == m["ssim"]
        assert r0["pixel_mse"] == rows[(score0.name, prompt, seed)]["pixel_mse"] != rows[(value.name, prompt, seed)]["pixel_mse"]
        assert r1["pixel_mse"] not in (rows[(score1.name, prompt, seed)]["pixel_mse"], rows[(value.name, prompt, seed)]["pixel_mse"])
        assert r0["mass_removed"] == rows[(score0.name, prompt, seed)]["mass_removed"] > 0  # the same generation, the same keys
        assert r1["mass_removed"] > 0
    control = sinks.run(first, [sinks.combined("random", 1, "value_mean", eta=0.1, layers=LAYER)], batch_size=4)
    assert any(p["op"] == "score eta=0.1 + value_mean" for p in sinks.paired_ratios(control.table + result.table))


def test_mass_removed_summary_and_paired_ratios_include_the_mass_matched_control(small_run):
    first, _, result = small_run
    table = result.table
    summary = {r["kind"]: r for r in sinks.mass_removed(table)}
    assert set(summary) == {"sink", "bottom", "random", "random-mass"}
    units = first.units
    groups = [p for p, _ in units]
    for kind, r in summary.items():
        per_unit = {(x["prompt"], x["seed"]): x["mass_removed"] for x in table if x["kind"] == kind}
        sink = {(x["prompt"], x["seed"]): x["mass_removed"] for x in table if x["kind"] == "sink"}
        a, b = np.array([per_unit[u] for u in units]), np.array([sink[u] for u in units])
        assert r["mass_removed"] == pytest.approx(a.mean())
        assert r["mass_removed_ci"] == pytest.approx(bootstrap_ci(a, groups=groups))
        assert r["n_units"] == 4 and r["n_prompts"] == len(set(groups))
        if kind != "sink":
            assert r["vs_sink"] == pytest.approx(a.mean() / b.mean())
            assert r["vs_sink_ci"] == pytest.approx(paired_ratio_ci(a, b, groups=groups))
    assert summary["random"]["vs_sink"] < 1 - sinks.MASS_TOLERANCE  # count-matched random keys hold less than the sinks
    assert summary["bottom"]["vs_sink"] < summary["random"]["vs_sink"]
    assert abs(summary["random-mass"]["vs_sink"] - 1) < sinks.MASS_TOLERANCE  # the mass-matched control is matched
    assert summary["random-mass"]["keys"] > 1 and 0.5 < summary["random-mass"]["within_tolerance"] <= 1
    ratios = {r["control"]: r for r in sinks.paired_ratios(table)}
    assert set(ratios) == {"random", "bottom", "random-mass"}
    sink_d = disruption.damage(table, "pixel_mse", kind="sink", k=1, op="score eta=0", window=f"{LAYER}, all steps")
    ctrl_d = disruption.damage(table, "pixel_mse", kind="random-mass", k=1, op="score eta=0", window=f"{LAYER}, all steps")
    assert ratios["random-mass"]["ratio"] == pytest.approx(np.mean(list(sink_d.values())) / np.mean(list(ctrl_d.values())))
    # a table from before these columns: nothing to summarise, no error
    old = [{k: v for k, v in r.items() if k not in ("mass_removed", "sink_mass", "keys_used", "within_tolerance")} for r in table]
    assert sinks.mass_removed(old) == []
    json.dumps(sinks.mass_removed(table), allow_nan=False)  # strict JSON: the payload has no NaN


def test_recorded_units_do_not_depend_on_the_batch(organism, small_run):
    first, ivs, result = small_run
    iv = ivs[-1]  # random-mass
    single = sinks.run(first, [iv], batch_size=1)
    for a, b in zip([r for r in result.table if r["kind"] == "random-mass"], [r for r in single.table if r["kind"] == "random-mass"]):
        assert (a["prompt"], a["seed"]) == (b["prompt"], b["seed"])
        assert a["mass_removed"] == pytest.approx(b["mass_removed"], rel=1e-4)
        assert a["keys_used"] == pytest.approx(b["keys_used"], rel=0.05)


# -- per-sample statistics against one capture per unit ---------------------------------------------------


def test_per_sample_statistics_equal_one_capture_per_unit(organism, captured):
    _, adapter = organism
    cap, base = captured
    rows = sink_samples.sample_statistics(cap, base.units)
    layers = attention.layers(adapter)
    assert len(rows) == len(base.units) * len(layers)
    by = {(r["prompt"], r["seed"], r["layer"]): r for r in rows}
    for prompt, seed in base.units[::3]:  # independent: that unit alone, in a capture of its own
        with attention.capture(adapter) as one:
            adapter.generate([(prompt, seed)], STEPS, 1)
        for layer in layers[::2]:
            steps = sorted(one.steps_seen)
            mass = np.stack([one.mass(layer, s).numpy() for s in steps])  # (steps, heads, keys): this unit's own
            kinds = one.keys(layer).kinds()
            top = np.argsort(-mass, -1, kind="stable")[..., :3]
            r = by[(prompt, seed, layer)]
            for kind in ("text", "pad", "image"):
                assert r[kind] == pytest.approx(np.mean(kinds[top[..., 0]] == kind))
            assert r["top1_over_uniform"] == pytest.approx(mass.max(-1).mean() * mass.shape[-1], rel=1e-5)
            assert r["top1_stays"] == pytest.approx(np.mean(top[1:, :, 0] == top[:-1, :, 0]))
            jac = [len(set(a) & set(b)) / len(set(a) | set(b)) for t in range(len(steps) - 1)
                   for a, b in zip(top[t + 1], top[t])]
            assert r["topk_jaccard"] == pytest.approx(np.mean(jac))
            assert r["top1_is_key0"] == pytest.approx(np.mean(top[..., 0] == 0))
    # the summary: means over units, CIs resampling prompts; "all layers" averages each unit over layers first
    summary = {r["layer"]: r for r in sink_samples.sample_summary(rows)}
    groups = [p for p, _ in base.units]
    values = np.array([by[(p, s, layers[1])]["top1_over_uniform"] for p, s in base.units])
    assert summary[layers[1]]["top1_over_uniform"] == pytest.approx(values.mean())
    assert summary[layers[1]]["top1_over_uniform_ci"] == pytest.approx(bootstrap_ci(values, groups=groups))
    every = np.array([np.mean([by[(p, s, l)]["image"] for l in layers]) for p, s in base.units])
    assert summary["all layers"]["image"] == pytest.approx(every.mean())
    assert summary["all layers"]["n_units"] == 6 and summary["all layers"]["n_prompts"] == 3
    assert summary["all layers"]["top1_kind"] == max(("text", "pad", "image"), key=lambda k: summary["all layers"][k])
    # the averaged capture is still there, and is what a plain capture gives
    assert cap.samples_at(layers[0], 0) == len(base.units)


# -- bad input: one line, the value and what is allowed ------------------------------------------------------


@pytest.mark.parametrize("call,error,message", [
    (lambda: sinks.mass_matched_keys(np.full((2, 4), 0.25), 0), ValueError, r"k must be an int in \[1, 3\] .*got 0"),
    (lambda: sinks.mass_matched_keys(np.full((2, 4), 0.25), 4), ValueError, r"k must be an int in \[1, 3\] .*got 4"),
    (lambda: sinks.mass_matched_keys(np.full(4, 0.25), 1), ValueError, r"mass must have shape \(heads, keys\) .*got \(4,\)"),
    (lambda: sinks.mass_matched_keys(np.array([[0.5, -0.1, 0.6]]), 1), ValueError, "finite and non-negative"),
    (lambda: sinks.mass_matched_keys([[0.5, 0.5]], 1), TypeError, "mass must be a tensor or array .*got list"),
    (lambda: sinks.mass_matched_keys(np.full((2, 4), 0.25), 1, seed=-1), ValueError, "seed must be a non-negative int, got -1"),
    (lambda: sinks.mass_matched_keys(np.full((2, 4), 0.25), 1, tolerance=1.5), ValueError, r"tolerance must be a number in \(0, 1\)"),
    (lambda: sinks.MassMatched(k=1, eta=0.5), ValueError,
     r"random-mass takes eta 0 or 1 under dose 'redistribute', got eta=0.5; allowed: eta in \{0, 1\}, dose 'renormalise'"),
    (lambda: sinks.MassMatched(keys="random"), ValueError, "MassMatched keys must be 'random-mass', got 'random'"),
    (lambda: sinks.MassMatched(k=0), ValueError, "k must be an int >= 1, got 0"),
    (lambda: sinks.MassMatched(tolerance=0), ValueError, r"tolerance must be a number in \(0, 1\)"),
    (lambda: sinks.intervention("top"), ValueError, r"unknown keys 'top'; allowed: \['sink', 'random', 'bottom', 'random-mass'\]"),
    (lambda: sinks.interventions([1], controls=["top"]), ValueError, r"controls must be a list drawn from \['random', 'bottom', "
                                                                       r"'random-mass'\], got \['top'\]"),
    (lambda: sink_samples.sample_summary([]), ValueError, "no rows: pass sink_samples.sample_statistics"),
    (lambda: sink_samples.sample_summary([{"layer": "a"}], cluster="seed"), ValueError, "unknown cluster 'seed'; allowed"),
    (lambda: sinks.Combined(KeyIntervention(path="value_zero"), KeyIntervention(path="value_zero")), ValueError,
     "Combined.score must be a KeyIntervention on path score, got"),
    (lambda: sinks.Combined(KeyIntervention(), KeyIntervention(k=2, path="value_mean")), ValueError,
     "Combined parts must hit the same keys: k is 1 on the score path and 2 on the value path"),
    (lambda: sinks.combined(value_path="score"), ValueError, "Combined.value must be a KeyIntervention on path value_zero or value_mean"),
], ids=["k-zero", "k-all-keys", "mass-1d", "mass-negative", "mass-list", "seed", "tolerance", "eta-between",
        "keys", "mm-k", "mm-tolerance", "intervention-keys", "controls", "summary-empty", "summary-cluster",
        "combined-score-path", "combined-keys", "combined-value-path"])
def test_bad_input_is_one_clear_line(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_input_on_captures(organism, captured):
    _, adapter = organism
    cap, base = captured
    with pytest.raises(ValueError, match=r"the capture holds 6 samples at .* units has 2; allowed: one conditional sample per unit"):
        sink_samples.sample_statistics(cap, base.units[:2])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\] .*got 4"):
        sink_samples.sample_statistics(cap, base.units, k=4)
    with pytest.raises(TypeError, match="cap must be a SampleCapture .*got Capture"):
        sink_samples.sample_statistics(attention.capture(adapter), base.units)
    with pytest.raises(ValueError, match="top must be an int >= 1 .*got 0"):
        sink_samples.capture_samples(adapter, top=0)
    assert sinks.MassMatched(k=1, eta=0.5, dose="renormalise").name == "random-mass-1#0 score eta=0.5 renormalise"
    assert sinks.MassMatched(k=2, path="value_zero", seed=3).name == "random-mass-2#3 value_zero"


def test_cli_refuses_the_mass_matched_control_at_an_intermediate_eta():
    from mabook.experiments import sinks as verb

    with pytest.raises(ValueError, match=r"^--controls random-mass \(a default\) needs --eta 0 or 1 under --dose redistribute, "
                                         r"got --eta 0.5; allowed: --dose renormalise"):
        verb.Config(controls=["random", "random-mass"], eta=0.5)
    cfg = verb.Config(controls=["random-mass"], k=[1], n_random=2)
    assert [iv.name for iv in cfg.conditions(None)] == ["sink-1 score eta=0", "random-mass-1#0 score eta=0",
                                                        "random-mass-1#1 score eta=0"]
    # the default: the count-matched and the mass-matched controls
    assert [iv.keys for iv in verb.Config(k=[1], n_random=1).conditions(None)] == ["sink", "bottom", "random", "random-mass"]


# -- the scorecard prefers the mass-matched ratio when the big run has it ----------------------------------------


def test_scorecard_perceptual_shift_prefers_the_mass_matched_control():
    committed = scorecard.load()["attention_full.json"]
    if any(r["control"] == "random-mass" for r in committed["paired_ratios"]):  # a big run with the control reads it
        assert "mass-matched" in scorecard.CHECKS["sinks-perceptual-shift"](committed).result
    # the same file without the control (as a run made before it existed): read against count-matched keys
    data = {**committed, "paired_ratios": [r for r in committed["paired_ratios"] if r["control"] != "random-mass"],
            "paired_ratios_linear": {m: [r for r in rows if r["control"] != "random-mass"]
                                     for m, rows in committed.get("paired_ratios_linear", {}).items()},
            "summary": [r for r in committed["summary"] if r["kind"] != "random-mass"]}
    before = scorecard.CHECKS["sinks-perceptual-shift"](data)
    assert "mass-matched" not in before.result
    window = f"{data['layer']}, all steps"
    extra = {"k": scorecard.K_SINK, "control": "random-mass", "op": "score eta=0", "window": window}
    mse = {**extra, "metric": "pixel_mse", "sink_damage": 2.0, "control_damage": 1.0, "ratio": 2.0, "ci": [1.5, 2.6], "n_units": 64}
    mae = {**extra, "metric": "pixel_mae", "sink_damage": 1.2, "control_damage": 1.0, "ratio": 1.2, "ci": [0.9, 1.4], "n_units": 64}
    with_mass = {**data, "paired_ratios": data["paired_ratios"] + [mse],
                 "paired_ratios_linear": {**data.get("paired_ratios_linear", {}),
                                          "pixel_mae": data.get("paired_ratios_linear", {}).get("pixel_mae", []) + [mae]}}
    after = scorecard.CHECKS["sinks-perceptual-shift"](with_mass)
    assert "sink / mass-matched random 1.2" in after.result and after.value == 1.2 and after.ci == (0.9, 1.4)
    assert after.proxy_verdict == scorecard.UNCLEAR  # the CI straddles 1
    assert "mass-matched" in after.reading
    no_linear = {**with_mass, "paired_ratios_linear": {}}
    summary_rows = [{**r, "kind": "random-mass"} for r in data["summary"] if r["kind"] == "random"]
    read = scorecard.CHECKS["sinks-perceptual-shift"]({**no_linear, "summary": data["summary"] + summary_rows})
    assert "pixel MSE sink / mass-matched random 2" in read.result and read.value == 2.0
    assert read.proxy_verdict == scorecard.HOLDS
