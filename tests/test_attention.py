"""mabook.attention: capture is a no-op, mass matches an independent softmax, interventions act, processors come back.

The independent computation re-derives q, k and v from the attention module's own weights and
inputs by hand in float64 (linear layers, RMS norm, FLUX's rotary embedding), takes the softmax in
numpy, applies the documented edit (the paper's dose: a chosen key keeps eta * p, the others are
rescaled by one common factor; value rows replaced at the chosen keys only) and compares it with the
probabilities and the attention output the module really used, for the organism, FLUX, SD3 (and
SD3.5's QK-norm and MMDiT-X dual attention) and PixArt.
"""

import contextlib
import dataclasses
import functools

import numpy as np
import pytest
import torch
from test_models import built, tiny_sd3

import mabook
from mabook import attention, sink_links, sinks, softmax, world
from mabook.attention import KeyIntervention

torch.set_num_threads(1)
PROMPT = world.heldout_captions(1, 1, seed=0)
STEPS = 3


@pytest.fixture(scope="module")
def organism(trained_organism):
    return trained_organism


def generate(pipe, prompt=PROMPT, steps=STEPS, **call):
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    return out.images if hasattr(out, "images") else out[0]


def processors(adapter):
    return {name: type(p) for name, p in adapter.transformer.attn_processors.items()}


@pytest.fixture(scope="module")
def base(organism):
    return generate(organism[0])


# -- (a) no-op -----------------------------------------------------------------------------------


def test_capture_gives_bit_identical_images_and_restores_processors(organism, base):
    pipe, adapter = organism
    before = processors(adapter)
    objects = {p: m.processor for p, m in adapter.attention_modules().items()}
    with attention.capture(adapter) as cap:
        images = generate(pipe)
    assert torch.equal(images, base)
    assert processors(adapter) == before
    assert all(m.processor is objects[p] for p, m in adapter.attention_modules().items())
    assert len(cap.captured) == len(attention.layers(adapter)) * STEPS
    for layer, step in cap.captured:
        np.testing.assert_allclose(cap.mass(layer, step).sum(-1).numpy(), 1, atol=1e-5)


# -- (b) the captured mass is an independent softmax ------------------------------------------------


def rms(x, norm):
    """RMS norm over the last axis in float64 (None: no norm; a norm without weight: no scale)."""
    if norm is None:
        return x.double()
    x64 = x.double()
    x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps)
    return x64 * norm.weight.double() if getattr(norm, "weight", None) is not None else x64


def rope(x, cos, sin):
    """FLUX's rotary embedding on (B, S, H, D), written out: pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-x1, x0], -1).flatten(-2)
    return x * cos.double()[None, :, None, :] + rotated * sin.double()[None, :, None, :]


def independent_mass(attn, inputs, text):
    """(heads, keys): numpy softmax over keys of q k^T / sqrt(D), averaged over image queries, cond sample."""
    hidden_states = inputs["hidden_states"][-1:]  # the conditional half of the [uncond; cond] batch
    B, N, _ = hidden_states.shape
    H, D = attn.heads, attn.head_dim
    q = rms(attn.to_q(hidden_states).view(B, N, H, D), attn.norm_q)
    k = rms(attn.to_k(hidden_states).view(B, N, H, D), attn.norm_k)
    if inputs.get("encoder_hidden_states") is not None:  # double block: text keys first
        e = inputs["encoder_hidden_states"][-1:]
        eq = rms(attn.add_q_proj(e).view(B, -1, H, D), attn.norm_added_q)
        ek = rms(attn.add_k_proj(e).view(B, -1, H, D), attn.norm_added_k)
        q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
    cos, sin = inputs["image_rotary_emb"]
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    q, k = q[0].permute(1, 0, 2).numpy(), k[0].permute(1, 0, 2).numpy()  # (H, S, D)
    scores = q[:, text:] @ k.transpose(0, 2, 1) / np.sqrt(D)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p.mean(1)


@pytest.mark.parametrize("layer", ["transformer_blocks.1.attn", "single_transformer_blocks.2.attn"])
def test_captured_mass_equals_independent_softmax(organism, layer):
    pipe, adapter = organism
    module = adapter.attention_modules()[layer]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        with attention.capture(adapter, layers=layer, steps=[1]) as cap:
            generate(pipe)
    finally:
        handle.remove()
    text = cap.keys(layer).text
    assert text == pipe.organism_config.max_text_length and cap.keys(layer).image == 64
    with torch.no_grad():
        expected = independent_mass(module, seen[1], text)
    np.testing.assert_allclose(cap.mass(layer, 1).numpy(), expected, atol=2e-6)
    assert cap.captured == [(layer, 1)] and cap.samples_at(layer, 1) == 1


def inputs_of(module):
    """(list, handle): every call's inputs of an attention module, by name (PixArt passes hidden_states positionally)."""
    seen = []

    def hook(m, args, kwargs):
        seen.append({"hidden_states": args[0], **kwargs} if args else dict(kwargs))

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_keys_are_labelled_text_pad_and_image_with_grid_positions(organism):
    pipe, adapter = organism
    layer = "transformer_blocks.0.attn"
    module = adapter.attention_modules()[layer]
    seen, handle = inputs_of(module)
    try:
        with attention.capture(adapter, layers=layer, steps=0) as cap:
            generate(pipe)
    finally:
        handle.remove()
    layout = cap.keys(layer)
    tokens = len(pipe.tokenizer(PROMPT[0])["input_ids"])
    assert layout.pad_from == tokens
    kinds = layout.kinds()
    assert list(kinds[:tokens]) == ["text"] * tokens and set(kinds[tokens:32]) == {"pad"} and set(kinds[32:]) == {"image"}
    assert layout.label(32) == {"kind": "image", "index": 0, "row": 0, "col": 0}
    assert layout.label(32 + 8 * 3 + 5) == {"kind": "image", "index": 29, "row": 3, "col": 5}
    # mass by kind: an independent float64 softmax summed over the key ranges the tokenizer gives
    rows = sinks.mass_by_kind(cap)
    with torch.no_grad():
        expected = independent_mass(module, seen[0], 32)
    assert [(r["layer"], r["step"], r["head"]) for r in rows] == [(layer, 0, h) for h in range(expected.shape[0])]
    by_kind = np.stack([expected[:, :tokens].sum(1), expected[:, tokens:32].sum(1), expected[:, 32:].sum(1)], 1)
    np.testing.assert_allclose([[r["text"], r["pad"], r["image"]] for r in rows], by_kind, atol=2e-6)


def test_sinks_are_the_top_keys_and_movement_covers_every_head(organism):
    pipe, adapter = organism
    layer = "single_transformer_blocks.1.attn"
    with attention.capture(adapter, layers=layer) as cap:
        generate(pipe)
    rows = sinks.sinks(cap, k=2)
    heads = adapter.transformer.config.num_attention_heads
    assert len(rows) == STEPS * heads * 2
    for r in rows:
        mass = cap.mass(layer, r["step"])[r["head"]]
        assert r["key"] == int(mass.topk(2).indices[r["rank"]]) and r["mass"] == pytest.approx(float(mass[r["key"]]))
    moves = sinks.movement(cap, k=2)
    assert [m["head"] for m in moves] == list(range(heads))
    # movement written out in numpy from the captured masses (steps in order)
    mass = np.stack([cap.mass(layer, s).numpy() for s in range(STEPS)])  # (steps, heads, keys)
    order = np.argsort(-mass, axis=-1, kind="stable")
    kinds = cap.keys(layer).kinds()
    for h, m in enumerate(moves):
        first = order[:, h, 0]
        sets = [set(order[s, h, :2].tolist()) for s in range(STEPS)]
        assert m["steps"] == STEPS and m["layer"] == layer
        assert m["top1_stays"] == pytest.approx(np.mean(first[1:] == first[:-1]))
        assert m["topk_jaccard"] == pytest.approx(np.mean([len(a & b) / len(a | b) for a, b in zip(sets, sets[1:])]))
        assert m["top1_is_key0"] == pytest.approx(np.mean(first == 0))
        values, counts = np.unique(kinds[first], return_counts=True)
        assert counts[list(values).index(m["top1_kind"])] == counts.max()


# -- (c) interventions -------------------------------------------------------------------------------


def test_eta_one_changes_nothing_and_eta_zero_on_sinks_changes_the_output(organism, base):
    pipe, adapter = organism
    layer = "transformer_blocks.2.attn"
    with attention.intervene(adapter, KeyIntervention("sink", k=1, eta=1.0, layers=layer)):
        same = generate(pipe)
    torch.testing.assert_close(same, base, atol=1e-4, rtol=0)
    with attention.intervene(adapter, KeyIntervention("sink", k=1, eta=0.0, layers=layer)):
        changed = generate(pipe)
    assert (changed - base).abs().max() > 1e-3


@pytest.mark.parametrize("keys", attention.SELECTIONS)
@pytest.mark.parametrize("path", attention.PATHS)
def test_every_selection_and_path_changes_the_output(organism, base, keys, path):
    pipe, adapter = organism
    with attention.intervene(adapter, KeyIntervention(keys, k=5, path=path, layers="single_transformer_blocks.0.attn")) as iv:
        images = generate(pipe)
    assert (images - base).abs().max() > 1e-4
    chosen = iv.chosen[("single_transformer_blocks.0.attn", 0)]
    assert chosen.shape == (2, adapter.transformer.config.num_attention_heads, 5)  # the CFG batch, every head


def test_intervened_sinks_are_the_captured_top_keys_and_random_keys_avoid_them(organism):
    pipe, adapter = organism
    layer = "transformer_blocks.3.attn"
    # capture nested inside the intervention sees this layer's probabilities before the edit
    with attention.intervene(adapter, KeyIntervention("sink", k=2, layers=layer)) as iv:
        with attention.capture(adapter, layers=layer) as cap:
            generate(pipe)
    for step in range(STEPS):
        top = cap.mass(layer, step).topk(2).indices
        assert torch.equal(iv.chosen[(layer, step)][1].sort().values, top.sort().values)  # [uncond; cond]: cond is 1
    with attention.intervene(adapter, KeyIntervention("random", k=2, layers=layer, steps=0)) as rnd:
        generate(pipe)
    random_keys = rnd.chosen[(layer, 0)][1]
    sinks0 = iv.chosen[(layer, 0)][1]
    for h in range(random_keys.shape[0]):
        assert not set(random_keys[h].tolist()) & set(sinks0[h].tolist())


def test_intervention_only_at_chosen_steps(organism, base):
    pipe, adapter = organism
    with attention.intervene(adapter, KeyIntervention("sink", k=10, eta=0.0, steps=[STEPS - 1])) as iv:
        images = generate(pipe)
    assert {step for _, step in iv.chosen} == {STEPS - 1}
    assert (images - base).abs().max() > 1e-4


# -- (d) processors come back after an error mid-generation -------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_processors_restored_after_an_error_mid_generation(organism, base, error):
    pipe, adapter = organism
    before = {p: m.processor for p, m in adapter.attention_modules().items()}
    calls = []

    def fail_at_second_step(module, args, output):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise error("stop")

    handle = adapter.blocks[4].module.register_forward_hook(fail_at_second_step)
    try:
        with pytest.raises(error):
            with attention.capture(adapter):
                generate(pipe)
        assert len(calls) == 2
        with pytest.raises(error):  # nested: capture inside an intervention
            with attention.intervene(adapter, KeyIntervention("sink", k=1)):
                with attention.capture(adapter):
                    generate(pipe)
        assert len(calls) == 4
    finally:
        handle.remove()
    assert all(m.processor is before[p] for p, m in adapter.attention_modules().items())
    assert not adapter.transformer._forward_pre_hooks
    assert torch.equal(generate(pipe), base)


# -- (e) every softmax family captures and intervenes ---------------------------------------------------


EXPECTED = {  # family -> (layers, text keys, image keys at the first layer)
    "flux": (["transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"], 8, 16),
    "sd3": (["transformer_blocks.0.attn", "transformer_blocks.1.attn"], 8 + 8, 16),  # SD3: CLIP tokens + T5 tokens
    "pixart": (["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 0, 16),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_tiny_family_captures_and_intervenes(family):
    pipe, call = built(family)
    pipe.set_progress_bar_config(disable=True)
    adapter = mabook.adapter_for(pipe)
    layers, text, image = EXPECTED[family]
    assert attention.layers(adapter) == layers
    before = processors(adapter)

    def run():
        out = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **call)
        return out.images

    base = run()
    with attention.capture(adapter) as cap:
        images = run()
    assert torch.equal(images, base) and processors(adapter) == before
    layout = cap.keys(layers[0])
    assert (layout.text, layout.image) == (text, image)
    # FLUX's text keys are T5's tokens, padding found with tokenizer_2; SD3's join CLIP's and T5's (not labelled)
    assert layout.pad_from == (len(pipe.tokenizer_2("a red circle")["input_ids"]) if family == "flux" else None)
    assert layout.positions is not None and len(set(layout.positions)) == image
    for layer, step in cap.captured:
        np.testing.assert_allclose(cap.mass(layer, step).sum(-1).numpy(), 1, atol=1e-5)
    with attention.intervene(adapter, KeyIntervention("sink", k=1, eta=1.0)):
        torch.testing.assert_close(run(), base, atol=1e-4, rtol=0)
    with attention.intervene(adapter, KeyIntervention("sink", k=2, path="value_zero", layers=layers[-1])):
        assert (run() - base).abs().max() > 1e-5
    assert processors(adapter) == before


# -- (f) bad input ---------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors(organism):
    pipe, adapter = organism
    with pytest.raises(ValueError, match=r"k=97 is larger than allowed .* 96 keys"):
        with attention.intervene(adapter, KeyIntervention("sink", k=97, layers="transformer_blocks.0.attn")):
            generate(pipe, steps=1)
    with pytest.raises(ValueError, match=r"k=96 is larger than allowed .* 96 keys, so k <= 95 \(the score path"):
        with attention.intervene(adapter, KeyIntervention("sink", k=96, layers="transformer_blocks.0.attn")):
            generate(pipe, steps=1)
    with attention.intervene(adapter, KeyIntervention("sink", k=96, path="value_zero", layers="transformer_blocks.0.attn")):
        generate(pipe, steps=1)  # the value path may hit every key
    with pytest.raises(ValueError, match=r"^unknown dose 'paper'; allowed: \['redistribute', 'renormalise'\]$"):
        KeyIntervention(dose="paper")
    with pytest.raises(ValueError, match=r"chunk_elements must be an int >= 1 \(or None: CHUNK_ELEMENTS\), got 0"):
        attention.intervene(adapter, KeyIntervention(), chunk_elements=0)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 1.5"):
        KeyIntervention(eta=1.5)
    with pytest.raises(ValueError, match=r"eta .* got -0.1"):
        KeyIntervention(eta=-0.1)
    with pytest.raises(ValueError, match=r"unknown keys 'top'; allowed: \['sink', 'random', 'bottom'\]"):
        KeyIntervention(keys="top")
    with pytest.raises(ValueError, match=r"unknown path 'logit'"):
        KeyIntervention(path="logit")
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        KeyIntervention(k=0)
    with pytest.raises(ValueError, match=r"layer 'transformer_blocks.0.ff' has no attention; allowed: \["):
        attention.capture(adapter, layers="transformer_blocks.0.ff")
    with pytest.raises(ValueError, match=r"unknown cfg 'cnd'"):
        attention.capture(adapter, cfg="cnd")
    with pytest.raises(ValueError, match=r"nothing captured at layer"):
        with attention.capture(adapter, layers="transformer_blocks.0.attn", steps=0) as cap:
            generate(pipe, steps=1)
        cap.mass("transformer_blocks.1.attn", 0)
    with pytest.raises(ValueError, match=r"^probabilities were not kept: pass keep_probabilities=True to capture\(\)$"):
        cap.probabilities("transformer_blocks.0.attn", 0)
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in adapter.transformer.attn_processors.values())


def test_cross_attention_and_linear_attention_are_refused():
    pipe, _ = built("pixart")
    with pytest.raises(ValueError, match=r"'transformer_blocks.0.attn2' is not a softmax self-/joint-attention layer"):
        attention.capture(mabook.adapter_for(pipe), layers="transformer_blocks.0.attn2")
    pipe, _ = built("sana")
    adapter = mabook.adapter_for(pipe)
    with pytest.raises(ValueError, match=r"'sana' has linear attention \(no softmax"):
        attention.capture(adapter)
    with pytest.raises(ValueError, match=r"'sana' has linear attention"):
        attention.intervene(adapter, KeyIntervention())


# -- (f) chapter 6: runner over a disruption.Baseline, sinks <-> massive channels ---------------------


@pytest.fixture(scope="module")
def small_base(organism):
    from mabook import disruption

    return disruption.baseline(organism[1], world.heldout_captions(3, 1, seed=1), (0,), STEPS)


def test_run_table_matches_an_independent_regeneration_and_ratios(organism, small_base):
    from mabook import disruption

    pipe, adapter = organism
    layer = "single_transformer_blocks.0.attn"
    ivs = [KeyIntervention("sink", 2, layers=layer), KeyIntervention("random", 2, layers=layer, seed=0),
           KeyIntervention("random", 2, layers=layer, seed=1), KeyIntervention("bottom", 2, layers=layer),
           KeyIntervention("sink", 2, eta=1.0, layers=layer)]
    result = sinks.run(small_base, ivs)
    n = len(small_base.units)
    assert len(result.table) == n * (1 + len(ivs))
    rows = [r for r in result.table if r["kind"] == "sink" and r["op"] == "score eta=0"]
    assert {r["window"] for r in rows} == {f"{layer}, all steps"} and len(rows) == n
    assert {"pixel_mse", "ssim", "all_correct", "cleanliness"} <= set(rows[0])
    # independent: regenerate under the sink intervention, pixel MSE in numpy
    mse = {}
    for iv in ivs[:4]:
        images = []
        for prompt, seed in small_base.units:
            with attention.intervene(adapter, iv):
                out = pipe([prompt], num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(seed)],
                           output_type="np")
            images.append(np.asarray(out.images)[0])
        mse[iv.name] = ((np.stack(images).astype(np.float64) - small_base.images) ** 2).mean((1, 2, 3))
    np.testing.assert_allclose([r["pixel_mse"] for r in rows], mse[ivs[0].name], rtol=1e-4, atol=1e-9)
    # eta = 1 changes (almost) nothing
    same = [r["pixel_mse"] for r in result.table if r["op"] == "score eta=1"]
    assert max(same) < 1e-8
    ratios = {(r["op"], r["control"]): r for r in sinks.paired_ratios(result.table)}
    random_damage = (mse[ivs[1].name] + mse[ivs[2].name]) / 2  # random sets averaged per unit
    r = ratios[("score eta=0", "random")]
    assert r["ratio"] == pytest.approx(mse[ivs[0].name].mean() / random_damage.mean(), rel=1e-3)
    assert r["ci"][0] <= r["ratio"] * 1.001 and r["n_units"] == n and r["window"] == f"{layer}, all steps"
    b = ratios[("score eta=0", "bottom")]
    assert b["ratio"] == pytest.approx(mse[ivs[0].name].mean() / mse[ivs[3].name].mean(), rel=1e-3)
    summary = {(s["kind"], s["op"]): s for s in disruption.summary(result.table)}
    assert summary[("sink", "score eta=0")]["n_units"] == n
    with pytest.raises(ValueError, match="distinct"):
        sinks.run(small_base, [ivs[0], ivs[0]])


def test_labels():
    assert attention.op_label(KeyIntervention(eta=0.25)) == "score eta=0.25"
    assert attention.op_label(KeyIntervention(path="value_mean")) == "value_mean"
    assert sinks.window_label(KeyIntervention()) == "all layers, all steps"
    assert sinks.window_label(KeyIntervention(layers=["a.attn", "b.attn"], steps=[3, 1])) == "2 layers, steps 1,3"


def test_sink_activation_link_matches_numpy(organism, small_base):
    from scipy.stats import rankdata

    pipe, adapter = organism
    layer, step = "single_transformer_blocks.1.attn", 1
    assert str(sink_links.feeding_tap(adapter, layer)) == "single_transformer_blocks.0.img"
    with pytest.raises(ValueError, match="first block"):
        sink_links.feeding_tap(adapter, "transformer_blocks.0.attn")
    link = sink_links.sink_activation_link(small_base, layer, step=step)[layer]
    tap = "single_transformer_blocks.0.img"
    channel = int(np.argmax(small_base.stats.get("abs_mean", tap).numpy()))
    assert link.channels == [channel] and link.tap == tap
    prompt, seed = small_base.units[-1]
    with mabook.probe.collect(adapter, taps=[tap], capture=[(tap, step)]) as run, \
            attention.capture(adapter, layers=layer, steps=[step]) as cap:
        pipe([prompt], num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np")
    h = run.captured[(tap, step)][-1].double().numpy()
    magnitude = np.abs(h[:, channel])
    mass = cap.mass(layer, step).numpy()[:, cap.keys(layer).image_slice].mean(0)
    np.testing.assert_allclose(link.magnitude[-1], magnitude, rtol=1e-5)
    np.testing.assert_allclose(link.mass[-1], mass, rtol=1e-6)
    pearson = np.corrcoef(magnitude, mass)[0, 1]
    spearman = np.corrcoef(rankdata(magnitude), rankdata(mass))[0, 1]
    assert link.pearson[-1] == pytest.approx(pearson, abs=1e-6)
    assert link.spearman[-1] == pytest.approx(spearman, abs=1e-6)
    s = link.summary()
    assert s["pearson"] == pytest.approx(np.nanmean(link.pearson)) and s["pearson_ci"][0] <= s["pearson"] <= s["pearson_ci"][1]
    assert s["n_units"] == len(small_base.units) and s["chance"] == 1 / 64
    assert set(sink_links.sink_activation_link(small_base, step=0)) == set(attention.layers(adapter)[1:])


def test_sink_shift_identity_edit_keeps_every_sink(organism, small_base):
    pipe, adapter = organism
    tap = "transformer_blocks.1.img"
    edits = {"identity": [mabook.probe.Edit(tap, [0], "scale", value=1.0)],
             "zero-all": [mabook.probe.Edit(tap, list(range(adapter.width)), "zero")]}
    rows = sink_links.sink_shift(small_base, edits, layers=["transformer_blocks.2.attn", "single_transformer_blocks.3.attn"])
    assert len(rows) == 2 * 2 * len(small_base.units)
    ident = [r for r in rows if r["edit"] == "identity"]
    assert all(r["top1_same"] == 1 and r["kind_same"] == 1 for r in ident)
    assert all(r["old_sink_mass"] == pytest.approx(r["sink_mass"]) for r in ident)
    wiped = [r for r in rows if r["edit"] == "zero-all"]
    assert np.mean([r["top1_same"] for r in wiped]) < 1
    # independent: regenerate the last unit with and without the edit, and read the rows off the masses in numpy
    prompt, seed = small_base.units[-1]
    layer = "single_transformer_blocks.3.attn"

    def masses(edit_list):
        edited = mabook.probe.edit(adapter, edit_list) if edit_list else contextlib.nullcontext()
        with attention.capture(adapter, layers=layer) as cap, edited:
            pipe([prompt], num_inference_steps=STEPS, generator=[torch.Generator("cpu").manual_seed(seed)], output_type="np")
        return np.stack([cap.mass(layer, s).numpy() for s in range(STEPS)])  # (steps, heads, keys)

    plain = masses(None)
    wiped_mass = masses(edits["zero-all"])
    top_plain, top_wiped = plain.argmax(-1), wiped_mass.argmax(-1)  # (steps, heads)
    (row,) = [r for r in wiped if r["layer"] == layer and (r["prompt"], r["seed"]) == (prompt, seed)]
    assert row["top1_same"] == pytest.approx(np.mean(top_plain == top_wiped), abs=1e-12)
    assert row["sink_mass"] == pytest.approx(plain.max(-1).mean(), rel=1e-6)
    assert row["old_sink_mass"] == pytest.approx(np.take_along_axis(wiped_mass, top_plain[..., None], -1).mean(), rel=1e-6)
    assert row["edited_sink_mass"] == pytest.approx(wiped_mass.max(-1).mean(), rel=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        sink_links.sink_shift(small_base, {})


# -- (g) post-intervention probabilities and outputs against an independent float64 computation ------------------


def tiny_sd35():
    """SD3.5-style: QK RMS norm and MMDiT-X dual attention (block 0 adds an image-only self-attention, attn2)."""
    pipe, _ = tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,))
    with torch.no_grad():  # the norms' weights start at 1: make them matter
        for name, param in pipe.transformer.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                param.uniform_(0.5, 1.5)
    return pipe, dict(height=8, width=8, max_sequence_length=8)


@functools.lru_cache(maxsize=None)
def tiny(family):
    """(pipe, call, adapter) of a tiny random-weight pipeline, built once per test run."""
    if family == "sd3.5":
        torch.manual_seed(0)
        pipe, call = tiny_sd35()
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()
    else:
        pipe, call = built(family)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call, mabook.adapter_for(pipe)


FAMILIES = ["organism", "flux", "sd3", "sd3.5", "pixart"]


def family_run(request, family):
    """(adapter, run): run() generates one fixed image (with guidance where the family batches it)."""
    if family == "organism":
        pipe, adapter = request.getfixturevalue("organism")
        return adapter, lambda: generate(pipe)
    pipe, call, adapter = tiny(family)
    return adapter, lambda: pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                 output_type="pt", **call).images


def lin(layer, x):
    """A linear layer in float64."""
    out = x.double() @ layer.weight.double().T
    return out if layer.bias is None else out + layer.bias.double()


def independent_qkv(attn, inputs):
    """q, k, v (batch_size, heads, keys, head_dim) float64 from the module's weights and inputs, keys in
    the layer's order: FLUX [text; image] with RoPE, SD3 [image; text], self-attention image only."""
    hidden_states, encoder_hidden_states = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    B, H = hidden_states.shape[0], attn.heads

    def heads(t):
        return t.view(B, t.shape[1], H, -1)  # (B, S, H, D)

    q, k, v = (heads(lin(p, hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k = rms(q, attn.norm_q), rms(k, attn.norm_k)
    flux = type(attn).__name__ == "FluxAttention"
    if encoder_hidden_states is not None:
        eq, ek, ev = (heads(lin(p, encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq, ek = rms(eq, attn.norm_added_q), rms(ek, attn.norm_added_k)
        pairs = ((eq, q), (ek, k), (ev, v)) if flux else ((q, eq), (k, ek), (v, ev))
        q, k, v = (torch.cat(pair, 1) for pair in pairs)
    if flux and inputs.get("image_rotary_emb") is not None:
        cos, sin = inputs["image_rotary_emb"]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    return tuple(t.permute(0, 2, 1, 3).double().numpy() for t in (q, k, v))


def np_softmax(scores):
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def one_hot(chosen, keys):
    """(B, H, 1, keys) bool: True at the chosen keys (B, H, k)."""
    mask = np.zeros(chosen.shape[:2] + (keys,), bool)
    np.put_along_axis(mask, chosen, True, -1)
    return mask[:, :, None, :]


def expected_probabilities(p, mask, eta, dose):
    """The documented score-path edit of probabilities p (B, H, queries, keys), in float64."""
    chosen, others = (p * mask).sum(-1, keepdims=True), (p * ~mask).sum(-1, keepdims=True)
    if dose == "redistribute":  # the chosen keys keep eta * p; the others share the rest in proportion
        return np.where(mask, eta * p, p * (1 + (1 - eta) * chosen / others))
    return np.where(mask, eta * p, p) / (others + eta * chosen)  # "renormalise": scale and renormalise the row


def check_selection(iv, chosen, mass):
    """The chosen keys (B, H, k) are the top-k / bottom-k of the independent mass (B, H, keys), or avoid the top-k."""
    for b, h in np.ndindex(chosen.shape[:2]):
        m, c = mass[b, h], chosen[b, h]
        rest = np.delete(m, c)
        if iv.keys == "sink":
            assert m[c].min() >= rest.max() - 1e-6
        elif iv.keys == "bottom":
            assert m[c].max() <= rest.min() + 1e-6
        else:
            ranked = np.sort(m)[::-1]
            if ranked[iv.k - 1] - ranked[iv.k] > 1e-6:  # a clear top-k: random keys avoid it
                assert not set(c.tolist()) & set(np.argsort(-m)[:iv.k].tolist())


LAYERS = [("organism", "transformer_blocks.1.attn"), ("organism", "single_transformer_blocks.2.attn"),
          ("flux", "transformer_blocks.0.attn"), ("flux", "single_transformer_blocks.1.attn"),
          ("sd3", "transformer_blocks.0.attn"), ("sd3", "transformer_blocks.1.attn"),  # block 1: context_pre_only
          ("sd3.5", "transformer_blocks.0.attn"), ("sd3.5", "transformer_blocks.0.attn2"),  # QK-norm; dual attention
          ("pixart", "transformer_blocks.1.attn1")]
OPS = {
    "score eta=0": [KeyIntervention("sink", 2, eta=0.0)],
    "score eta=0.01": [KeyIntervention("sink", 2, eta=0.01)],
    "score eta=0.01 renormalise": [KeyIntervention("sink", 2, eta=0.01, dose="renormalise")],
    "score eta=0.5 random": [KeyIntervention("random", 2, eta=0.5)],
    "value_zero": [KeyIntervention("sink", 2, path="value_zero")],
    "value_mean bottom": [KeyIntervention("bottom", 2, path="value_mean")],
    "score+value": [KeyIntervention("sink", 1, eta=0.1), KeyIntervention("sink", 2, path="value_zero")],
}
STEP = 1  # the interventions act at the second step only


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("family,layer", LAYERS)
def test_post_intervention_probabilities_and_output_match_an_independent_computation(request, family, layer, op):
    adapter, run = family_run(request, family)
    module = adapter.attention_modules()[layer]
    ivs = [dataclasses.replace(iv, layers=layer, steps=STEP) for iv in OPS[op]]
    seen, handle = inputs_of(module)
    outputs = []
    to_out = getattr(module, "to_out", None)
    if to_out is not None:  # the image queries' attention output, before the output projection
        out_handle = to_out[0].register_forward_pre_hook(lambda m, args: outputs.append(args[0]))
    else:  # FLUX single blocks return every query's attention output
        out_handle = module.register_forward_hook(lambda m, args, output: outputs.append(output))
    try:
        with contextlib.ExitStack() as stack:
            contexts = [stack.enter_context(attention.intervene(adapter, iv)) for iv in ivs]
            cap = stack.enter_context(attention.capture(adapter, layers=layer, steps=STEP, cfg="both",
                                                        keep_probabilities=True))
            run()
    finally:
        handle.remove()
        out_handle.remove()
    assert len(seen) == len(outputs) == (STEPS if family == "organism" else 2)  # one call per step
    with torch.no_grad():
        q, k, v = independent_qkv(module, seen[STEP])
    B, H, S, D = k.shape
    p = np_softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D))  # (B, H, queries, keys)
    image = cap.keys(layer).image_slice
    mass = p[:, :, image].mean(2)
    expected_p, expected_v, hit = p, v.copy(), np.zeros((B, H, 1, S), bool)
    for iv, context in zip(ivs, contexts):
        chosen = context.chosen[(layer, STEP)].numpy()
        check_selection(iv, chosen, mass)  # chosen from the unedited probabilities, per sample and head
        mask = one_hot(chosen, S)
        hit |= mask
        if iv.path == "score":
            expected_p = expected_probabilities(p, mask, iv.eta, iv.dose)
            score_mask, score_iv = mask, iv
        else:  # only the chosen keys' value rows change
            replacement = np.zeros_like(v) if iv.path == "value_zero" else np.broadcast_to(v.mean(2, keepdims=True), v.shape)
            expected_v = np.where(mask[:, :, 0, :, None], replacement, expected_v)
    # the probabilities the module used
    got = cap.probabilities(layer, STEP).double().numpy()
    assert got.shape == p.shape
    np.testing.assert_allclose(got, expected_p, atol=2e-6)
    np.testing.assert_allclose(got.sum(-1), 1, atol=1e-5)  # every row sums to 1
    if any(iv.path == "score" for iv in ivs):
        kept = got[np.broadcast_to(score_mask, got.shape)]
        if score_iv.eta == 0:
            assert (kept == 0).all()  # masked keys get no mass at all
        elif score_iv.dose == "redistribute":
            np.testing.assert_allclose(kept, score_iv.eta * p[np.broadcast_to(score_mask, p.shape)], rtol=1e-4, atol=1e-9)
        # the other keys are rescaled by one common factor per row
        ratio = np.where(~score_mask & (p > 1e-3), got / p, np.nan)
        spread = (np.nanmax(ratio, -1) - np.nanmin(ratio, -1)) / np.nanmean(ratio, -1)
        assert np.nanmax(spread) < 1e-3
    else:
        np.testing.assert_allclose(got, p, atol=2e-6)  # the value path leaves the probabilities alone
    # the attention output the module computed: edited probabilities times edited values
    out = outputs[STEP]
    out = out.view(B, out.shape[1], H, D).permute(0, 2, 1, 3).double().numpy()
    rows = image if to_out is not None else slice(0, S)
    expected_out = (expected_p @ expected_v)[:, :, rows]
    np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=2e-5)
    if any(iv.path != "score" for iv in ivs):  # the value edit shows in the output
        moved = np.abs(expected_out - (expected_p @ v)[:, :, rows]).max()
        assert moved > 1e-4 and np.abs(out - (expected_p @ v)[:, :, rows]).max() > moved / 2
    # the mass before and after, and on the intervened keys
    np.testing.assert_allclose(cap.mass(layer, STEP).numpy(), mass.mean(0), atol=2e-6)
    after = expected_p[:, :, image].mean(2)
    np.testing.assert_allclose(cap.mass_after(layer, STEP).numpy(), after.mean(0), atol=2e-6)
    before_hit, after_hit = cap.suppressed(layer, STEP)
    np.testing.assert_allclose(before_hit.numpy(), (mass * hit[:, :, 0]).sum(-1).mean(0), atol=2e-6)
    np.testing.assert_allclose(after_hit.numpy(), (after * hit[:, :, 0]).sum(-1).mean(0), atol=2e-6)


# -- (h) dose: the paper's rule, and eta = 0 never gives NaN --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_at_eta_one_percent_every_sink_keeps_one_percent_of_its_mass(request, family):
    adapter, run = family_run(request, family)
    cells = len(attention.layers(adapter)) * (STEPS if family == "organism" else 2)  # (layer, step) pairs
    kept = {}
    for dose in attention.DOSES:
        with attention.intervene(adapter, KeyIntervention("sink", k=1, eta=0.01, dose=dose)), \
                attention.capture(adapter, cfg="both") as cap:
            run()
        rows = attention.suppression(cap)
        assert len(rows) == cells * adapter.transformer.config.num_attention_heads  # every layer, step and head
        kept[dose] = np.array([r["kept"] for r in rows])
        assert all(r["removed"] == pytest.approx(r["before"] - r["after"]) for r in rows)
    np.testing.assert_allclose(kept["redistribute"], 0.01, rtol=1e-4)
    assert kept["renormalise"].min() > 0.01 * 1.001  # the old rule, kept by name, leaves the sink more


@pytest.mark.parametrize("dose", attention.DOSES)
@pytest.mark.parametrize("gap", [30.0, 200.0])
def test_a_query_with_all_its_mass_on_the_suppressed_key_gives_no_nan(dose, gap):
    """Logit gap 200: exp(-200) underflows, every other key's float32 probability is exactly 0;
    gap 30: 1 - p_sink is 0 in float32 but the other keys' own sum is not."""
    torch.manual_seed(0)
    B, H, S, D = 1, 2, 6, 4
    q = torch.zeros(B, H, S, D)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(B, H, S, D)
    k[:, :, 0, 0] = gap * D**0.5  # key 0's logit is `gap` above the others' (|logit| < 0.5)
    v = torch.randn(B, H, S, D)
    chosen = torch.zeros(B, H, 1, dtype=torch.long)
    p = np_softmax((q.double() @ k.double().transpose(-1, -2)).numpy() / D**0.5)
    assert p[..., 0].min() > 1 - 1e-12
    for eta in (0.0, 0.01, 0.5):
        out = softmax.attend(q, k, v, chosen, "score", eta, dose=dose)
        edit = softmax.Edit(chosen, "score", eta, dose)
        _, mass, probs = softmax.attention(q, k, v, [edit], image=slice(0, S), keep=True)
        assert torch.isfinite(out).all() and torch.isfinite(probs).all() and torch.isfinite(mass).all()
        expected = expected_probabilities(p, one_hot(chosen.numpy(), S), eta, dose)
        np.testing.assert_allclose(probs.double().numpy(), expected, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(out.double().numpy(), expected @ v.double().numpy(), rtol=1e-5, atol=1e-6)
        if eta == 0:
            assert (probs[..., 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dose", attention.DOSES)
@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_all_mass_on_the_suppressed_key_in_float32_and_bfloat16_gives_finite_rows_summing_to_one(dtype, dose, eta):
    """Logit gap 200 (every other key's probability underflows to exactly 0, also in float32 scores
    from bfloat16 inputs): the explicit probabilities, the fused output (`attend`: one SDPA call) and
    the whole processor stay finite, every row sums to 1 (the fused path's: a value column of ones),
    and they match float64 computed independently from the same (rounded) q, k, v. The freed mass
    goes to the other keys in proportion to their own softmax (the documented fallback)."""
    torch.manual_seed(0)
    B, H, S, D = 2, 2, 7, 4
    q = torch.zeros(B, H, S, D)
    q[..., 0] = 1.0
    k = 0.1 * torch.randn(B, H, S, D)
    k[:, :, 0, 0] = 200.0 * D**0.5  # key 0's logit is 200 above the others' (|logit| < 0.5)
    v = torch.randn(B, H, S, D)
    v[..., 0] = 1.0  # the output's first column is each row's probability sum
    q, k, v = (t.to(dtype) for t in (q, k, v))
    chosen = torch.zeros(B, H, 1, dtype=torch.long)
    qd, kd, vd = (t.double().numpy() for t in (q, k, v))  # float64 from the rounded inputs
    p = np_softmax(qd @ kd.transpose(0, 1, 3, 2) / np.sqrt(D))
    assert (p[..., 1:] < 1e-80).all()  # underflows to 0 in float32
    expected = expected_probabilities(p, one_hot(chosen.numpy(), S), eta, dose)
    assert np.isfinite(expected).all()
    edit = softmax.Edit(chosen, "score", eta, dose)
    _, mass, probs = softmax.attention(q, k, v, [edit], image=slice(0, S), keep=True)
    assert torch.isfinite(probs).all() and torch.isfinite(mass).all()
    np.testing.assert_allclose(probs.double().sum(-1).numpy(), 1, atol=1e-6)
    np.testing.assert_allclose(probs.double().numpy(), expected, rtol=1e-5, atol=1e-12)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bfloat16 outputs
    for lse in (None, softmax.image_query_mass(q, k, slice(0, S), lse=True)[1]):
        out = softmax.edited_attention(q, k, v, [edit], lse)
        assert out.dtype == dtype and torch.isfinite(out).all()
        np.testing.assert_allclose(out[..., 0].double().numpy(), 1, **tolerance)  # the row sums
        np.testing.assert_allclose(out.double().numpy(), expected @ vd, **tolerance)
    assert torch.equal(softmax.attend(q, k, v, chosen, "score", eta, dose=dose), softmax.edited_attention(q, k, v, [edit]))


def test_logsumexp_from_the_mass_pass_matches_float64_and_leaves_the_mass_unchanged():
    torch.manual_seed(0)
    B, H, S, D = 2, 3, 40, 8
    q, k = 3 * torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    image = slice(9, 33)  # text queries on both sides
    for chunk_elements in (None, B * H * S * 5, 1):
        mass, lse = softmax.image_query_mass(q, k, image, chunk_elements, lse=True)
        assert torch.equal(mass, softmax.image_query_mass(q, k, image, chunk_elements))
        scores = q.double().numpy() @ k.double().numpy().transpose(0, 1, 3, 2) / np.sqrt(D)
        top = scores.max(-1, keepdims=True)
        expected = (top + np.log(np.exp(scores - top).sum(-1, keepdims=True)))[..., 0]
        np.testing.assert_allclose(lse.double().numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(softmax.query_logsumexp(q, k, chunk_elements).double().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_edits_match_the_explicit_softmax_and_float64(dtype):
    """`edited_attention` (one SDPA call) against float64 and against the explicit chunked softmax, for
    every path, dose and eta, and a score and a value edit combined."""
    torch.manual_seed(0)
    B, H, S, D = 2, 3, 48, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    k[:, :, 5] *= 4  # a key that draws much of the mass
    q, k, v = (t.to(dtype) for t in (q, k, v))
    qd, kd, vd = (t.double().numpy() for t in (q, k, v))
    p = np_softmax(qd @ kd.transpose(0, 1, 3, 2) / np.sqrt(D))
    chosen = torch.stack([torch.randperm(S)[:3] for _ in range(B * H)]).view(B, H, 3)
    chosen[:, :, 0] = 5
    mask = one_hot(chosen.numpy(), S)
    tolerance = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for path in attention.PATHS:
        for dose in attention.DOSES:
            for eta in (0.0, 0.01, 0.3, 1.0):
                edits = [softmax.Edit(chosen, path, eta, dose)]
                if path == "score":
                    expected = expected_probabilities(p, mask, eta, dose) @ vd
                else:
                    replacement = np.zeros_like(vd) if path == "value_zero" else np.broadcast_to(vd.mean(2, keepdims=True), vd.shape)
                    expected = p @ np.where(mask[:, :, 0, :, None], replacement, vd)
                fused = softmax.edited_attention(q, k, v, edits)
                assert fused.dtype == dtype and fused.shape == q.shape
                np.testing.assert_allclose(fused.double().numpy(), expected, **tolerance)
                explicit = softmax.attention(q, k, v, edits)[0]
                np.testing.assert_allclose(fused.double().numpy(), explicit.double().numpy(), **tolerance)
    padded = chosen.clone()
    padded[..., 2] = padded[..., 0]  # a key listed twice (sinks.MassMatched pads its lists so) counts once
    for eta in (0.0, 0.3):
        edits = [softmax.Edit(padded, "score", eta)]
        expected = expected_probabilities(p, one_hot(padded.numpy(), S), eta, "redistribute") @ vd
        np.testing.assert_allclose(softmax.edited_attention(q, k, v, edits).double().numpy(), expected, **tolerance)
    edits = [softmax.Edit(chosen, "score", 0.1), softmax.Edit(chosen[..., :1], "value_zero")]
    expected = expected_probabilities(p, mask, 0.1, "redistribute") @ np.where(one_hot(chosen[..., :1].numpy(), S)[:, :, 0, :, None], 0, vd)
    np.testing.assert_allclose(softmax.edited_attention(q, k, v, edits).double().numpy(), expected, **tolerance)


@pytest.mark.parametrize("family", ["organism", "flux", "sd3", "sd3.5", "pixart"])
def test_capture_and_intervention_project_q_k_v_once_and_capture_stays_bit_identical(request, family):
    """Each attention call a context acts on projects q, k and v once (the copied projections serve the
    measurement and the output): the capture's output is the stock processor's, bit for bit."""
    adapter, run = family_run(request, family)
    base = run()
    modules = adapter.attention_modules()
    layer = attention.layers(adapter)[0]
    module = modules[layer]
    projection = module.to_qkv if getattr(module, "fused_projections", False) else module.to_q
    calls, stock_calls = [], []
    handle = projection.register_forward_hook(lambda *a: calls.append(1))
    try:
        run()
        stock_calls = list(calls)
        assert stock_calls
        calls.clear()
        with attention.capture(adapter, layers=layer) as cap:
            images = run()
        assert torch.equal(images, base) and cap.captured
        assert len(calls) == len(stock_calls)  # not twice: the capture's projection is the output's
        calls.clear()
        with attention.intervene(adapter, KeyIntervention("sink", k=1, eta=0.01, layers=layer)):
            run()
        assert len(calls) == len(stock_calls)
    finally:
        handle.remove()


# -- (i) the chunked path: 1, 2 and many chunks agree ----------------------------------------------------------------


def test_one_two_and_many_chunks_give_the_same_mass_and_outputs(organism, monkeypatch):
    pipe, adapter = organism
    layer = "transformer_blocks.1.attn"
    keys = 96
    heads = adapter.transformer.config.num_attention_heads
    sizes = []
    logits = softmax.logits
    monkeypatch.setattr(softmax, "logits", lambda q, k, out=None: sizes.append(q.shape[2]) or logits(q, k, out))
    iv = KeyIntervention("sink", k=2, eta=0.01, layers=layer)

    def once(chunk_elements):
        sizes.clear()
        with attention.capture(adapter, layers=layer, chunk_elements=chunk_elements) as plain:
            generate(pipe)
        capture_sizes = list(sizes)
        with attention.intervene(adapter, iv, chunk_elements=chunk_elements) as ctx, \
                attention.capture(adapter, layers=layer, cfg="both", chunk_elements=chunk_elements) as cap:
            images = generate(pipe)
        return capture_sizes, images, plain, cap, ctx

    one = once(None)  # CHUNK_ELEMENTS = 2**23: one chunk
    two = once(heads * keys * 32)  # 32 of the 64 image queries of the conditional sample per chunk
    monkeypatch.setattr(softmax, "CHUNK_ELEMENTS", 1)  # read at call time: one query per chunk
    many = once(None)
    assert one[0] == [64] * STEPS and two[0] == [32, 32] * STEPS and many[0] == [1] * 64 * STEPS
    # the same up to float rounding: chunk sums add in another order, and a one-query chunk runs BLAS's
    # matrix-vector kernel (here 2 chunks give bit-identical images, many differ by ~3e-6)
    for other in (two, many):
        torch.testing.assert_close(other[1], one[1], rtol=0, atol=1e-5)
        for step in range(STEPS):
            for a, b in ((other[2], one[2]), (other[3], one[3])):
                torch.testing.assert_close(a.mass(layer, step), b.mass(layer, step), rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(a.mass_after(layer, step), b.mass_after(layer, step), rtol=1e-5, atol=1e-7)
            assert torch.equal(other[4].chosen[(layer, step)], one[4].chosen[(layer, step)])


# -- (j) processors come back after an error, in every family ----------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("family", ["flux", "sd3", "sd3.5", "pixart"])
def test_processors_restored_after_an_error_in_every_family(family, error):
    adapter, run = family_run(None, family)
    before = {p: m.processor for p, m in adapter.attention_modules().items()}
    base = run()
    score, value = KeyIntervention("sink", k=1, eta=0.1), KeyIntervention("sink", k=1, path="value_mean")
    stacks = [[lambda: attention.capture(adapter)], [lambda: attention.intervene(adapter, score)],
              [lambda: attention.intervene(adapter, score), lambda: attention.capture(adapter, keep_probabilities=True)],
              [lambda: attention.intervene(adapter, value), lambda: attention.intervene(adapter, score),
               lambda: attention.capture(adapter)]]
    calls = []

    def fail_at_second_step(module, args, output):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise error("stop")

    handle = adapter.blocks[-1].module.register_forward_hook(fail_at_second_step)
    try:
        for i, stack_of in enumerate(stacks):
            with pytest.raises(error):
                with contextlib.ExitStack() as stack:
                    for make in stack_of:
                        stack.enter_context(make())
                    run()
            assert len(calls) == 2 * (i + 1)  # the error came at the second step, mid-generation
            assert all(m.processor is before[p] for p, m in adapter.attention_modules().items())
            assert not any(m._forward_pre_hooks for m in adapter.transformer.modules())
    finally:
        handle.remove()
    assert torch.equal(run(), base)


# -- (k) score-path and value-path interventions nest into one edit ---------------------------------------------------


def test_score_and_value_interventions_nest_in_either_order_and_same_path_nesting_is_refused(organism, base):
    pipe, adapter = organism
    layer = "single_transformer_blocks.1.attn"
    score = KeyIntervention("sink", k=1, eta=0.1, layers=layer)
    value = KeyIntervention("sink", k=1, path="value_zero", layers=layer)
    with attention.intervene(adapter, score) as a, attention.intervene(adapter, value) as b:
        both = generate(pipe)
    with attention.intervene(adapter, value), attention.intervene(adapter, score):
        assert torch.equal(generate(pipe), both)
    for step in range(STEPS):  # both chose their keys from the unedited probabilities
        assert torch.equal(a.chosen[(layer, step)], b.chosen[(layer, step)])
    for alone in (score, value):
        with attention.intervene(adapter, alone):
            assert (generate(pipe) - both).abs().max() > 1e-5
    with pytest.raises(ValueError, match=r"^cannot nest two score-path interventions on single_transformer_blocks.1.attn "
                                         r"at the same steps .*one score-path and one value-path intervention combine$"):
        with attention.intervene(adapter, score), attention.intervene(adapter, KeyIntervention("random", k=1, layers=layer)):
            pass
    with pytest.raises(ValueError, match=r"cannot nest two value-path interventions"):
        with attention.intervene(adapter, value), attention.intervene(adapter, dataclasses.replace(value, path="value_mean")):
            pass
    # the same path at different steps nests
    with attention.intervene(adapter, dataclasses.replace(score, steps=0)) as first, \
            attention.intervene(adapter, dataclasses.replace(score, steps=[1, 2])) as rest:
        generate(pipe)
    assert set(first.chosen) == {(layer, 0)} and set(rest.chosen) == {(layer, 1), (layer, 2)}
    with pytest.raises(ValueError, match=r"outside attention.capture\(\)"):
        with attention.capture(adapter), attention.intervene(adapter, score):
            pass
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in adapter.transformer.attn_processors.values())
    assert torch.equal(generate(pipe), base)


# -- (l) steps and layers that never ran are refused ---------------------------------------------------------------------


def test_steps_that_never_ran_are_refused(organism):
    pipe, adapter = organism
    with pytest.raises(ValueError, match=r"^intervene asked for step\(s\) \[5, 7\], but the steps that ran were 0\.\.2$"):
        with attention.intervene(adapter, KeyIntervention(steps=[1, 5, 7])):
            generate(pipe)
    with pytest.raises(ValueError, match=r"^capture asked for step\(s\) \[3\], but the steps that ran were 0\.\.2$"):
        with attention.capture(adapter, layers="transformer_blocks.0.attn", steps=[0, 3]):
            generate(pipe)
    with pytest.raises(ValueError, match=r"^capture asked for layer\(s\) \['transformer_blocks.0.attn'\], but the layers "
                                         r"that ran were none \(was the pipeline called inside the context\?\)$"):
        with attention.capture(adapter, layers="transformer_blocks.0.attn"):
            pass
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in adapter.transformer.attn_processors.values())


def test_layers_that_never_ran_are_refused(monkeypatch):
    adapter, run = family_run(None, "pixart")
    skipped = "transformer_blocks.1.attn1"
    module = adapter.attention_modules()[skipped]
    monkeypatch.setattr(module, "forward", lambda hidden_states, *args, **kwargs: torch.zeros_like(hidden_states))
    with pytest.raises(ValueError, match=r"^capture asked for layer\(s\) \['transformer_blocks.1.attn1'\], "
                                         r"but the layers that ran were \['transformer_blocks.0.attn1'\]$"):
        with attention.capture(adapter, layers=["transformer_blocks.0.attn1", skipped]):
            run()
    with pytest.raises(ValueError, match=r"^intervene asked for layer\(s\) \['transformer_blocks.1.attn1'\], "
                                         r"but the layers that ran at steps \[1\] were none$"):
        with attention.intervene(adapter, KeyIntervention(layers=skipped, steps=1)):
            run()
    with attention.capture(adapter) as cap:  # every layer (none named): the ones that ran are captured
        run()
    assert {layer for layer, _ in cap.captured} == {"transformer_blocks.0.attn1"}
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in adapter.attention_modules().values())
