"""mabook.attention: capture is a no-op, mass matches an independent softmax, interventions act, processors come back.

The independent computation re-derives q and k from the attention module's own weights by hand
(RMS norm, FLUX's rotary embedding) and takes the softmax in float64 numpy.
"""

import numpy as np
import pytest
import torch
from test_models import built

import mabook
from mabook import attention, world
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
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


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


def test_keys_are_labelled_text_pad_and_image_with_grid_positions(organism):
    pipe, adapter = organism
    with attention.capture(adapter, layers="transformer_blocks.0.attn", steps=0) as cap:
        generate(pipe)
    layout = cap.keys("transformer_blocks.0.attn")
    tokens = len(pipe.tokenizer(PROMPT[0])["input_ids"])
    assert layout.pad_from == tokens
    kinds = layout.kinds()
    assert list(kinds[:tokens]) == ["text"] * tokens and set(kinds[tokens:32]) == {"pad"} and set(kinds[32:]) == {"image"}
    assert layout.label(32) == {"kind": "image", "index": 0, "row": 0, "col": 0}
    assert layout.label(32 + 8 * 3 + 5) == {"kind": "image", "index": 29, "row": 3, "col": 5}
    rows = attention.mass_by_kind(cap)
    assert len(rows) == adapter.transformer.config.num_attention_heads
    assert all(abs(r["text"] + r["pad"] + r["image"] - 1) < 1e-5 for r in rows)


def test_sinks_are_the_top_keys_and_movement_covers_every_head(organism):
    pipe, adapter = organism
    layer = "single_transformer_blocks.1.attn"
    with attention.capture(adapter, layers=layer) as cap:
        generate(pipe)
    rows = attention.sinks(cap, k=2)
    heads = adapter.transformer.config.num_attention_heads
    assert len(rows) == STEPS * heads * 2
    for r in rows:
        mass = cap.mass(layer, r["step"])[r["head"]]
        assert r["key"] == int(mass.topk(2).indices[r["rank"]]) and r["mass"] == pytest.approx(float(mass[r["key"]]))
    moves = attention.movement(cap, k=2)
    assert [m["head"] for m in moves] == list(range(heads))
    assert all(0 <= m["top1_stays"] <= 1 and 0 <= m["topk_jaccard"] <= 1 for m in moves)


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
    result = attention.run(small_base, ivs)
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
    ratios = {(r["op"], r["control"]): r for r in attention.paired_ratios(result.table)}
    random_damage = (mse[ivs[1].name] + mse[ivs[2].name]) / 2  # random sets averaged per unit
    r = ratios[("score eta=0", "random")]
    assert r["ratio"] == pytest.approx(mse[ivs[0].name].mean() / random_damage.mean(), rel=1e-3)
    assert r["ci"][0] <= r["ratio"] * 1.001 and r["n_units"] == n and r["window"] == f"{layer}, all steps"
    b = ratios[("score eta=0", "bottom")]
    assert b["ratio"] == pytest.approx(mse[ivs[0].name].mean() / mse[ivs[3].name].mean(), rel=1e-3)
    summary = {(s["kind"], s["op"]): s for s in disruption.summary(result.table)}
    assert summary[("sink", "score eta=0")]["n_units"] == n
    with pytest.raises(ValueError, match="distinct"):
        attention.run(small_base, [ivs[0], ivs[0]])


def test_labels():
    assert attention.op_label(KeyIntervention(eta=0.25)) == "score eta=0.25"
    assert attention.op_label(KeyIntervention(path="value_mean")) == "value_mean"
    assert attention.window_label(KeyIntervention()) == "all layers, all steps"
    assert attention.window_label(KeyIntervention(layers=["a.attn", "b.attn"], steps=[3, 1])) == "2 layers, steps 1,3"


def test_sink_activation_link_matches_numpy(organism, small_base):
    from scipy.stats import rankdata

    pipe, adapter = organism
    layer, step = "single_transformer_blocks.1.attn", 1
    assert str(attention.feeding_tap(adapter, layer)) == "single_transformer_blocks.0.img"
    with pytest.raises(ValueError, match="first block"):
        attention.feeding_tap(adapter, "transformer_blocks.0.attn")
    link = attention.sink_activation_link(small_base, layer, step=step)[layer]
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
    assert set(attention.sink_activation_link(small_base, step=0)) == set(attention.layers(adapter)[1:])


def test_sink_shift_identity_edit_keeps_every_sink(organism, small_base):
    pipe, adapter = organism
    tap = "transformer_blocks.1.img"
    edits = {"identity": [mabook.probe.Edit(tap, [0], "scale", value=1.0)],
             "zero-all": [mabook.probe.Edit(tap, list(range(adapter.width)), "zero")]}
    rows = attention.sink_shift(small_base, edits, layers=["transformer_blocks.2.attn", "single_transformer_blocks.3.attn"])
    assert len(rows) == 2 * 2 * len(small_base.units)
    ident = [r for r in rows if r["edit"] == "identity"]
    assert all(r["top1_same"] == 1 and r["kind_same"] == 1 for r in ident)
    assert all(r["old_sink_mass"] == pytest.approx(r["sink_mass"]) for r in ident)
    wiped = [r for r in rows if r["edit"] == "zero-all"]
    assert np.mean([r["top1_same"] for r in wiped]) < 1
    assert all(0 <= r["top1_same"] <= 1 and r["old_sink_mass"] <= r["edited_sink_mass"] + 1e-12 for r in rows)
    with pytest.raises(ValueError, match="non-empty"):
        attention.sink_shift(small_base, {})
