"""mabook.transport: record, transport, baselines; mabook.text_transport: pairs, scores and the chapter-4 comparison.

The endpoints are checked bitwise: alpha = 0 is the target; alpha = 1 with every channel at every
step and the AdaLN conditioning is the source's image; without the conditioning every block output
is the source's but the image is not. Inside a generation, plain torch hooks (no mabook code) read
what each tap hands on to the next module: inside a mask the source's values and outside the
block's own, lerp(target, source, alpha) at an intermediate alpha (also with a channel at 3e3),
exactly the chosen channels of a subset. A record's memory is the storage its tensors hold, counted
here. Scores and summaries are checked against numpy and against the world's own renders, not
against the code's own formulas.
"""

import contextlib
import dataclasses
import re

import numpy as np
import pytest
import torch

import mabook
from mabook import probe, record_memory, text_transport, transport, world
from mabook.text_transport import Method, Pair

torch.set_num_threads(1)
SOURCE = "a large cyan square at the right on a white background"
TARGET = "a small yellow circle at the center on a gray background"
STEPS = 3


@pytest.fixture(scope="module")
def adapter(trained_organism):
    return trained_organism[1]


@pytest.fixture(scope="module")
def full(adapter):
    """Every channel at every tap of both streams and every step, and the conditioning; two units."""
    return transport.record(adapter, [SOURCE, TARGET], seeds=[0], channels="all", num_inference_steps=STEPS)


def image_taps(adapter):
    return [str(t) for t in probe.taps(adapter, ["img"])]


def assert_no_hooks(adapter):
    for name, module in adapter.transformer.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr), f"{name or 'transformer'}.{attr} not empty"


def render(caption) -> np.ndarray:
    return world.render(world.parse_caption(caption)).image.astype(np.float32) / 255


# -- raw observation (no mabook code): what a block returned, and what the next module received ------


@contextlib.contextmanager
def observe(adapter, block_paths):
    """Plain torch hooks at FLUX blocks: per transformer call (one per step here: the organism
    batches [uncond; cond] in one call), `before[path]` is the image output as the block returned it
    (this hook is registered before any mabook editor, so it runs first) and `after[path]` the image
    input of the next module (the next block's `hidden_states`, or `norm_out`'s first argument):
    the block output once every edit was applied. Enter it before calling mabook."""
    t = adapter.transformer
    order = [f"transformer_blocks.{i}" for i in range(len(t.transformer_blocks))]
    order += [f"single_transformer_blocks.{i}" for i in range(len(t.single_transformer_blocks))] + ["norm_out"]
    seen = {"before": {p: [] for p in block_paths}, "after": {p: [] for p in block_paths}}
    handles = []

    def before(path):
        def hook(module, args, output):
            seen["before"][path].append(output[1].detach().clone())  # FLUX blocks return (text, image)

        return hook

    def after(path):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            seen["after"][path].append(x.detach().clone())

        return hook

    try:
        for path in block_paths:
            handles.append(t.get_submodule(path).register_forward_hook(before(path)))
            following = t.get_submodule(order[order.index(path) + 1])
            handles.append(following.register_forward_pre_hook(after(path), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


OBSERVED = ["transformer_blocks.0", "transformer_blocks.3", "single_transformer_blocks.3"]  # first, middle, last


@pytest.fixture(scope="module")
def plain(adapter):
    """Image outputs of the OBSERVED blocks per step, from plain pipeline calls (each unit its own
    generator seeded 0, as transport draws its noise): the sources [SOURCE, TARGET] and the targets
    [TARGET, SOURCE], each (4, 64, C) = [uncond; cond]; and the target images."""
    out = {}
    for name, prompts in (("source", [SOURCE, TARGET]), ("target", [TARGET, SOURCE])):
        with observe(adapter, OBSERVED) as seen:
            images = adapter.pipe(prompts, num_inference_steps=STEPS, output_type="np",
                                  generator=[torch.Generator().manual_seed(0) for _ in prompts]).images
        assert all(len(v) == STEPS for v in seen["before"].values())
        out[name], out[name + "_images"] = seen["before"], np.asarray(images, dtype=np.float32)
    return out


# -- exactness ----------------------------------------------------------------------------------


def test_alpha_zero_reproduces_target_exactly(full):
    out = transport.transport(full, [TARGET, SOURCE], alpha=0.0, stream="both")
    assert torch.equal(torch.from_numpy(out.images), torch.from_numpy(out.target))
    assert all(r["pixel_mse"] == 0 for r in out.table)
    assert_no_hooks(full.adapter)


@pytest.mark.parametrize("stream", ["both", "img"])
def test_alpha_one_all_channels_with_conditioning_reproduces_source_exactly(full, stream):
    assert full.conditioning  # channels="all" keeps the conditioning by default; moving it is asked for
    out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, stream=stream, conditioning=True)
    assert not np.array_equal(out.target, full.images)
    assert torch.equal(torch.from_numpy(out.images), torch.from_numpy(full.images))  # bitwise
    assert all(r["conditioning"] for r in out.table)
    assert_no_hooks(full.adapter)


def test_without_the_conditioning_every_block_output_is_the_source_but_not_the_image(adapter, full):
    """The final AdaLN (norm_out) then modulates the source's hidden states with the target's pooled text."""
    out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, stream="both", conditioning=False)
    last = image_taps(adapter)[-1]
    taps = [t for t in full.channels if not t.endswith(".temb")]
    seen, box = {}, {}
    # the editor first: forward hooks run in registration order, so the observer sees the edited output
    with probe.edit(adapter, transport._edits(full, box, taps, full.steps, 1.0, None, 0, 2)) as ed:
        box["editor"] = ed
        with probe.hooks(adapter, lambda tap, step, h: seen.setdefault(step, h.clone()), taps=[last], cfg="both"):
            adapter.generate([(TARGET, 0), (SOURCE, 0)], STEPS, 16)
    for step in range(STEPS):
        src = torch.cat([full.dense(last, step, role, 0, 2) for role in ("uncond", "cond")])
        assert torch.equal(seen[step], src)
    assert np.abs(out.images - full.images).max() > 1e-3
    assert not any(r["conditioning"] for r in out.table)


def test_conditioning_is_recorded_as_the_transformer_computes_it(adapter, full):
    """The recorded temb equals time_text_embed(timestep, pooled text embedding), computed here directly."""
    pipe = adapter.pipe
    cond = str(probe.conditioning_tap(adapter))
    assert cond == "time_text_embed.temb" and full.channels[cond] == list(range(adapter.width))
    pipe.scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        _, pooled = pipe.encode_prompt([SOURCE, TARGET])
        _, empty = pipe.encode_prompt(["", ""])
        for step, t in enumerate(pipe.scheduler.timesteps):
            timestep = (t / 1000).expand(2) * 1000  # as the pipeline passes it and FluxTransformer2DModel scales it
            for role, p in (("cond", pooled), ("uncond", empty)):
                expected = adapter.transformer.time_text_embed(timestep, p)
                torch.testing.assert_close(full.dense(cond, step, role, 0, 2)[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_channel_sets_record_no_conditioning_by_default(adapter):
    rec = transport.record(adapter, [SOURCE], [0], taps=image_taps(adapter), channels=[5], num_inference_steps=1)
    assert not rec.conditioning and "time_text_embed.temb" not in rec.channels
    with pytest.raises(ValueError, match="conditioning=True, but this record did not keep the conditioning"):
        transport.transport(rec, [TARGET], conditioning=True)


def test_a_subset_of_an_all_channel_record_equals_a_record_of_the_subset(adapter, full):
    chans = {t: [66, 5] for t in image_taps(adapter)}
    small = transport.record(adapter, [SOURCE, TARGET], [0], taps=image_taps(adapter), channels=chans, num_inference_steps=STEPS)
    a = transport.transport(small, [TARGET, SOURCE], alpha=0.7)
    b = transport.transport(full, [TARGET, SOURCE], alpha=0.7, channels=chans, target_images=a.target)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, a.target)
    assert b.table[0]["k"] == 2 and not b.table[0]["conditioning"]
    with pytest.raises(ValueError, match=r"channels \[7\] at transformer_blocks.0.img were not recorded"):
        transport.transport(small, [TARGET, SOURCE], channels=[66, 7])


def held_bytes(rec) -> int:
    """Bytes of the storages the record's tensors keep alive (each storage once): a small view of a
    full-width hidden state would count at its full size."""
    storages = {}
    for by_role in rec.values.values():
        for v in by_role.values():
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


def test_record_memory_grows_with_k_not_width(adapter, full):
    taps = image_taps(adapter)
    one = transport.record(adapter, [SOURCE], [0], taps=taps, channels=[5], num_inference_steps=STEPS)
    eight = transport.record(adapter, [SOURCE], [0], taps=taps, channels=list(range(8)), num_inference_steps=STEPS)
    # counted here: 8 image taps x 3 steps x 2 guidance halves x 64 tokens x k channels x 4 bytes (float32)
    expected = lambda k, tokens=64: len(taps) * STEPS * 2 * tokens * k * 4
    assert len(taps) == 8 and held_bytes(one) == one.nbytes == expected(1)
    assert held_bytes(eight) == eight.nbytes == expected(8)
    # every channel (full: two units, both streams, the conditioning): the image taps alone hold width / k times more
    image_values = dataclasses.replace(full, values={k: v for k, v in full.values.items() if k[0] in taps})
    assert held_bytes(image_values) == 2 * expected(adapter.width)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :16] = True
    quarter = transport.record(adapter, [SOURCE], [0], taps=taps, channels=[5], token_mask=mask,
                               num_inference_steps=STEPS)
    assert held_bytes(quarter) == quarter.nbytes == expected(1, tokens=16)
    kept, everything = quarter.dense(taps[0], 1, "cond", 0, 1), one.dense(taps[0], 1, "cond", 0, 1)
    np.testing.assert_array_equal(kept[0, :16], everything[0, :16])
    assert not kept[0, 16:].any()


def test_unit_seeds_pair_each_prompt_with_its_own_noise(adapter):
    paired = transport.record(adapter, [SOURCE, TARGET], taps=image_taps(adapter)[:1], channels=[1], unit_seeds=[3, 4],
                              num_inference_steps=1)
    assert paired.units == [(SOURCE, 3), (TARGET, 4)]
    alone = transport.record(adapter, [TARGET], [4], taps=image_taps(adapter)[:1], channels=[1], num_inference_steps=1)
    np.testing.assert_allclose(paired.images[1], alone.images[0], atol=1e-4)  # same noise; batch size changes rounding only
    with pytest.raises(ValueError, match=r"unit_seeds must be one non-negative int per prompt \(2\)"):
        transport.record(adapter, [SOURCE, TARGET], unit_seeds=[1], num_inference_steps=1)


def test_masked_transport_leaves_other_tokens_alone_at_its_tap(adapter, full, plain):
    """alpha = 1 inside a per-unit mask at step 0: at every observed image tap the tokens inside hold
    the source's values (every channel), the tokens outside what the block itself computed; steps
    outside the window are not touched. Checked bitwise on raw hook captures."""
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :8] = True  # unit 0: the top row of tokens
    mask[1, 40:56] = True  # unit 1: two rows lower down (a mask mixed up between units would show)
    with observe(adapter, OBSERVED) as seen:
        out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, mask=mask, steps=[0], conditioning=False,
                                  target_images=plain["target_images"])
    inside = mask.repeat(2, 1)  # (4, 64): the per-image mask on both guidance halves
    for path in OBSERVED:
        before, after, source = seen["before"][path], seen["after"][path], plain["source"][path]
        assert torch.equal(after[0][inside], source[0][inside]), path
        assert torch.equal(after[0][~inside], before[0][~inside]), path
        assert not torch.equal(after[0][inside], before[0][inside]), path
        for step in range(1, STEPS):
            assert torch.equal(after[step], before[step]), (path, step)
    # the first tap at step 0 saw nothing edited yet: its own output is the unedited target's
    assert torch.equal(seen["before"][OBSERVED[0]][0], plain["target"][OBSERVED[0]][0])
    assert [r["masked_tokens"] for r in out.table] == [8, 16] and out.images.shape == full.images.shape
    assert {"took_source_color", "kept_target_position", "differs_size", "ssim"} <= set(out.table[0])
    assert_no_hooks(adapter)


def test_intermediate_alpha_is_the_lerp_of_target_and_source_at_the_tap(adapter, full, plain):
    """alpha = 0.3 (not symmetric: source and target swapped would show) with every image channel at every
    step: what the next module receives is (1 - alpha) * what the block computed + alpha * the source's,
    in float64 numpy, to float32 rounding -- also with a real-model massive channel: the source's
    channel 66 moved to ~3e3 at one tap (as planted in the record and in the expectation alike)."""
    alpha, tap, massive = 0.3, OBSERVED[1] + ".img", 66
    planted = {k: ({r: v.clone() for r, v in by.items()} if k[0] == tap else by) for k, by in full.values.items()}
    for by_role in (planted[(tap, step)] for step in range(STEPS)):
        for v in by_role.values():
            v[:, massive] += 3e3
    rec = dataclasses.replace(full, values=planted)
    with observe(adapter, OBSERVED) as seen:
        transport.transport(rec, [TARGET, SOURCE], alpha=alpha, conditioning=False, target_images=plain["target_images"])
    for path in OBSERVED:
        for step in range(STEPS):
            before = seen["before"][path][step].double().numpy()
            source = plain["source"][path][step].double().numpy()
            if path + ".img" == tap:
                source[..., massive] += 3e3
            expected = before + alpha * (source - before)
            scale = np.maximum(np.abs(before), np.abs(source))
            got = seen["after"][path][step].double().numpy()
            assert np.all(np.abs(got - expected) <= 4 * np.finfo(np.float32).eps * scale + 1e-7), (path, step)
            assert np.abs(got - before).max() > 1e-2  # it moved
    assert np.abs(seen["after"][tap[:-4]][0][..., massive].numpy()).max() > 0.3 * 3e3 - 20
    assert_no_hooks(adapter)


def test_a_channel_subset_at_alpha_one_replaces_exactly_those_channels(adapter, full, plain):
    chans = [66, 5, 9]
    others = [c for c in range(adapter.width) if c not in chans]
    with observe(adapter, OBSERVED) as seen:
        out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, channels=chans, target_images=plain["target_images"])
    assert out.table[0]["k"] == 3 and not out.table[0]["conditioning"]
    for path in OBSERVED:
        for step in range(STEPS):
            before, after, source = seen["before"][path][step], seen["after"][path][step], plain["source"][path][step]
            assert torch.equal(after[..., chans], source[..., chans]), (path, step)
            assert torch.equal(after[..., others], before[..., others]), (path, step)
            assert not torch.equal(before[..., chans], source[..., chans])
    assert_no_hooks(adapter)


def test_kmeans_mask_feeds_a_masked_transport(full):
    tap = str(probe.taps(full.adapter, ["img"])[3])
    mask = transport.kmeans_mask(full, tap, STEPS - 1, channels=[66, 5, 9, 100])
    assert mask.shape == (2, 64) and mask.dtype == torch.bool and mask.any(1).all() and not mask.all()
    out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, mask=mask, conditioning=False)
    assert [r["masked_tokens"] for r in out.table] == mask.sum(1).tolist()


# -- baselines ----------------------------------------------------------------------------------


def test_pixel_blend_and_random_channels(adapter, full):
    s, t = full.images[:1], full.images[1:]
    np.testing.assert_allclose(transport.pixel_blend(s, t, 0.25), 0.75 * t + 0.25 * s, atol=1e-7)
    chans = {"transformer_blocks.0.img": [0, 1, 2]}
    rand = transport.random_channels(adapter, chans, seed=1)
    assert len(rand["transformer_blocks.0.img"]) == 3 and not set(rand["transformer_blocks.0.img"]) & {0, 1, 2}


def test_embedding_blend_endpoints_are_exact_and_the_middle_is_the_mixed_embedding(adapter, full):
    pipe = adapter.pipe
    target = transport.transport(full, [TARGET, SOURCE], alpha=0.0).target
    assert np.array_equal(transport.embedding_blend(adapter, [SOURCE, TARGET], [TARGET, SOURCE], 0.0, [0, 0], STEPS), target)
    assert np.array_equal(transport.embedding_blend(adapter, [SOURCE, TARGET], [TARGET, SOURCE], 1.0, [0, 0], STEPS), full.images)
    with torch.no_grad():  # the middle: mixed in numpy, float64, then generated through the pipeline
        (se, sp), (te, tp) = pipe.encode_prompt([SOURCE]), pipe.encode_prompt([TARGET])
    mix = lambda a, b: torch.from_numpy((0.7 * a.numpy().astype(np.float64) + 0.3 * b.numpy()).astype(np.float32))
    expected = pipe(prompt_embeds=mix(te, se), pooled_prompt_embeds=mix(tp, sp), num_inference_steps=STEPS,
                    generator=[torch.Generator().manual_seed(0)], output_type="np").images
    got = transport.embedding_blend(adapter, [SOURCE], [TARGET], 0.3, [0], STEPS)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - target[:1]).max() > 1e-3


def test_embedding_blend_is_the_organisms_only():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    bare = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    with pytest.raises(NotImplementedError, match="organism only, not 'flux'"):
        transport.embedding_blend(mabook.adapter_for(bare), [SOURCE], [TARGET], 0.5, [0])


# -- pairs, scores, summaries -------------------------------------------------------------------


@pytest.mark.parametrize("kind, n_objects, n_differ", [("one_attribute", 1, 1), ("two_attributes", 1, 2),
                                                      ("one_object_of_two", 2, 1)])
def test_pairs_differ_exactly_in_the_named_attributes(kind, n_objects, n_differ):
    ps = text_transport.pairs(kind, 12, seed=3)
    assert len({(p.source, p.target) for p in ps}) == 12 and ps == text_transport.pairs(kind, 12, seed=3)
    for p in ps:
        s, t = world.parse_caption(p.source), world.parse_caption(p.target)
        assert len(s.objects) == len(t.objects) == n_objects and s.background == t.background
        diff = {(i, a) for i, (o, q) in enumerate(zip(s.objects, t.objects)) for a in world.ATTRIBUTES
                if getattr(o, a) != getattr(q, a)}
        assert len({i for i, _ in diff}) == 1 and {a for _, a in diff} == set(p.differs) and len(p.differs) == n_differ
        if n_objects == 2:
            assert not world.overlaps(*s.objects) and s.objects[0].color != s.objects[1].color
    counts = {a: sum(a in p.differs for p in ps) for a in world.ATTRIBUTES}
    assert max(counts.values()) - min(counts.values()) <= 2  # the attributes take turns


def test_pairs_bad_input():
    with pytest.raises(ValueError, match="unknown pair kind 'three'; allowed"):
        text_transport.pairs("three", 2)
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        text_transport.pairs("one_attribute", 0)


def test_score_on_the_worlds_own_renders():
    pair = text_transport.pairs("one_object_of_two", 4, seed=0)[1]
    src, tgt = render(pair.source), render(pair.target)
    took = text_transport.score(pair, src, tgt)
    assert took["took_source"] == 1 and took["kept_target"] == 1 and took["other_kept"] == 1
    assert took["outside_change"] == 0 and took["other_change"] == 0  # the renders differ only where the captions do
    assert took["pixel_mae"] == pytest.approx(float(np.abs(src - tgt).mean()), abs=1e-7)
    kept = text_transport.score(pair, tgt, tgt)
    assert kept["took_source"] == 0 and kept["kept_target"] == 1 and kept["pixel_mae"] == 0
    assert np.isnan(kept[f"took_{next(a for a in world.ATTRIBUTES if a not in pair.differs)}"])
    # one pixel far from every object changes: outside_change is that change spread over the outside pixels
    s, t = world.parse_caption(pair.source), world.parse_caption(pair.target)
    i = text_transport.changed_objects(pair)[0]
    from scipy import ndimage
    region = ndimage.binary_dilation(world.render(s).masks[i] | world.render(t).masks[i])
    y, x = np.argwhere(~region & ~world.render(t).foreground)[0]
    noisy = tgt.copy()
    noisy[y, x] = 1 - noisy[y, x]
    expected = np.abs(noisy - tgt).mean(-1)[~region].mean()
    assert text_transport.score(pair, noisy, tgt)["outside_change"] == pytest.approx(expected, rel=1e-6)


def test_summary_averages_seeds_per_pair_then_bootstraps():
    rows = [{"kind": "k", "pair": i, "method": "random", "alpha": 1.0, "took_source": v}
            for i, vs in enumerate([(0, 1), (1, 1), (0, 0), (1, 0)]) for v in vs]
    rows += [{"kind": "k", "pair": i, "method": "top", "alpha": 1.0, "took_source": float(i % 2), "other_kept": np.nan}
             for i in range(4)]
    s = {r["method"]: r for r in text_transport.summary(rows, metrics=("took_source", "other_kept"))}
    per_pair = np.array([0.5, 1, 0, 0.5])  # seeds averaged within each pair
    assert s["random"]["took_source"] == pytest.approx(per_pair.mean()) and s["random"]["n_pairs"] == 4
    lo, hi = s["random"]["took_source_ci"]
    assert lo <= per_pair.mean() <= hi and lo >= per_pair.min() and hi <= per_pair.max()
    assert np.isnan(s["top"]["other_kept"]) and s["top"]["n_other_kept"] == 0
    d = text_transport.paired_difference(rows, {"method": "top"}, {"method": "random"})
    assert d["difference"] == pytest.approx(np.mean(np.array([0, 1, 0, 1]) - per_pair)) and d["n_pairs"] == 4


# -- the chapter-4 comparison -------------------------------------------------------------------


def test_compare_runs_every_method_on_the_same_pairs(adapter):
    pairs = {kind: text_transport.pairs(kind, 1, seed=0) for kind in text_transport.PAIR_KINDS}
    taps = image_taps(adapter)
    top = {t: [66, 5] for t in taps}
    methods = [Method("top-2", channels=top), Method("all channels + conditioning", channels="all", conditioning=True),
               Method("pixel blend", "pixel"), Method("text embedding blend", "embedding"),
               Method("top-2 in union mask", channels=top, mask="union"), Method("top-2, step 0", channels=top, steps=(0,), alphas=(1.0,))]
    c = text_transport.compare(adapter, pairs, methods, alphas=(0.0, 1.0), num_inference_steps=STEPS, batch_size=2, chunk=2,
                          mask_at=(taps[4], 1), mask_channels=top)
    assert c.sources.shape == c.targets.shape == (3, 32, 32, 3) and c.masks["border"]["union"].shape == (3, 64)
    for m in methods[:5]:
        assert np.array_equal(c.images[(m.name, None, 0.0)], c.targets)
    for name in ("all channels + conditioning", "pixel blend", "text embedding blend"):
        assert np.array_equal(c.images[(name, None, 1.0)], c.sources)
    assert ("top-2, step 0", None, 0.0) not in c.images
    assert {r["method"] for r in c.rows} >= {"source image", "target image", "top-2 in union mask"}
    assert len([r for r in c.rows if r["method"] == "top-2"]) == 3 * 2
    union = c.masks["border"]
    assert all((union["union"] == (union["source"] | union["target"])).flatten()) and list(c.masks) == ["border"]
    assert_no_hooks(adapter)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), "alpha must be a number in \\[0, 1\\], got 1.5"),
    (dict(alpha=-0.1), "alpha must be a number in \\[0, 1\\], got -0.1"),
    (dict(num_inference_steps=STEPS + 1), f"num_inference_steps {STEPS + 1} differs from the source's {STEPS}"),
    (dict(mask=torch.zeros(2, 64, dtype=torch.bool)), "mask is empty for unit\\(s\\) \\[0, 1\\]"),
    (dict(mask=torch.ones(2, 16, dtype=torch.bool)),
     "mask has shape \\(2, 16\\); expected \\(units, tokens\\) = \\(2, 64\\)"),
    (dict(stream="pooled"), "unknown stream 'pooled'; allowed: \\['img', 'txt', 'both'\\]"),
    (dict(steps=[STEPS + 2]), f"steps \\[{STEPS + 2}\\] were not recorded"),
    (dict(conditioning="yes"), "conditioning must be True or False, got 'yes'"),
    (dict(conditioning=None), "conditioning must be True or False, got None"),
    (dict(stream="txt", mask=torch.ones(2, 64, dtype=torch.bool)), "mask selects image tokens; stream 'txt' has none"),
])
def test_bad_input_is_refused_clearly(full, kwargs, message):
    with pytest.raises(ValueError, match=message):
        transport.transport(full, [TARGET, SOURCE], **kwargs)


def test_different_token_grids_are_refused(full):
    other = dataclasses.replace(full, token_mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="token grid 8x8 \\(64 tokens\\) differs from the source's 16 tokens"):
        transport.transport(other, [TARGET, SOURCE])


def test_bad_comparisons_are_refused(adapter):
    pairs = {"one_attribute": [Pair(SOURCE, TARGET, ("color",))]}
    with pytest.raises(ValueError, match="unknown mask 'object'; allowed: None \\(whole image\\) or \\['source', 'target', 'union'\\]"):
        Method("m", channels="all", mask="object")
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\], got 2"):
        Method("m", channels="all", alphas=(2,))
    with pytest.raises(ValueError, match="need mask_at=\\(image tap, step\\) and mask_channels"):
        text_transport.compare(adapter, pairs, [Method("m", channels="all", mask="source")], num_inference_steps=1)
    with pytest.raises(ValueError, match="distinct \\(name, seed\\)"):
        text_transport.compare(adapter, pairs, [Method("m", "pixel"), Method("m", "pixel")], num_inference_steps=1)


def test_no_hook_survives_an_exception(adapter, full):
    broken = dataclasses.replace(full, values={k: {r: v[..., :-1] for r, v in by.items()} for k, by in full.values.items()})
    with pytest.raises(ValueError, match=r"source values at transformer_blocks\.0\.img step 0 have shape \(4, 64, 127\), "
                                         r"the target \(4, 64, 128\): different token grids or batches"):
        transport.transport(broken, [TARGET, SOURCE], alpha=0.5, conditioning=False, target_images=full.images)
    assert_no_hooks(adapter)
    with pytest.raises(ValueError, match="token_mask is empty"):
        transport.record(adapter, [SOURCE], [0], channels="all", token_mask=torch.zeros(1, 64, dtype=torch.bool),
                         num_inference_steps=STEPS)
    assert_no_hooks(adapter)


# -- memory: the caller names the channels; every channel of a real model needs max_bytes ------------------------------


def test_record_estimates_before_generating_the_bytes_it_then_holds(adapter, full):
    """`record_bytes` (from the arguments alone) is what the record holds, counted as storage: every
    channel of both streams and the conditioning, and a channel pair under a token mask."""
    assert record_memory.record_bytes(adapter, full.channels, full.steps, full.token_mask, full.pipe_kwargs) == held_bytes(full)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :10], mask[1, 5:40] = True, True
    rec = transport.record(adapter, [SOURCE, TARGET], [0], taps=[*image_taps(adapter), "transformer_blocks.0.txt"],
                           channels=[3, 9], token_mask=mask, num_inference_steps=2)
    assert record_memory.record_bytes(adapter, rec.channels, rec.steps, rec.token_mask, rec.pipe_kwargs) == held_bytes(rec)


def test_every_channel_of_a_real_model_needs_max_bytes():
    """Tiny FLUX (family flux: 3 blocks, 16 channels, 4x4 image tokens, TEXT_LEN text tokens, no
    guidance batch): "all" is refused with the bytes it would take, which is what it then holds."""
    from test_models import TEXT_LEN, built

    pipe, call = built("flux")
    flux = mabook.adapter_for(pipe)
    kwargs = dict(num_inference_steps=2, **call)
    with pytest.raises(ValueError) as refused:
        transport.record(flux, ["a red circle"], [0], channels="all", **kwargs)
    message = str(refused.value)
    need = int(re.search(r"pass max_bytes >= (\d+) to allow it", message).group(1))
    # 3 blocks x 2 streams: (16 image + TEXT_LEN text tokens) x 16 channels, and the conditioning (1 token x 16), x 2 steps x 4 bytes
    assert need == (3 * (16 + TEXT_LEN) * 16 + 16) * 2 * 4
    assert message.startswith("record: channels='all' of flux keeps ~") and "\n" not in message
    rec = transport.record(flux, ["a red circle"], [0], channels="all", max_bytes=need, **kwargs)
    assert held_bytes(rec) == rec.nbytes == need
    with pytest.raises(ValueError, match=rf"over max_bytes={need - 1}; allowed: fewer channels"):
        transport.record(flux, ["a red circle"], [0], channels="all", max_bytes=need - 1, **kwargs)
    named = transport.record(flux, ["a red circle"], [0], channels=[1, 2], **kwargs)  # named channels: no allowance needed
    assert held_bytes(named) == 3 * (16 + TEXT_LEN) * 2 * 2 * 4


def test_record_bytes_of_flux_1_dev_at_1024_is_45_gb():
    """The figure of issue 23, from FLUX.1-dev's published shapes: 19 + 38 blocks with both streams,
    3072 channels, 4096 image + 512 text tokens, 28 steps, one guidance half, bfloat16."""
    from types import SimpleNamespace

    fake = SimpleNamespace(family=mabook.models.FAMILIES["flux"], transformer=torch.nn.Linear(1, 1).to(torch.bfloat16), pipe=None)
    blocks = [f"transformer_blocks.{i}" for i in range(19)] + [f"single_transformer_blocks.{i}" for i in range(38)]
    channels = {f"{b}.{s}": range(3072) for b in blocks for s in ("img", "txt")}
    need = record_memory.record_bytes(fake, channels, range(28), torch.ones(1, 4096, dtype=torch.bool), {})
    assert need == 57 * (4096 + 512) * 3072 * 28 * 2 == 45_185_236_992
    assert record_memory.size_text(need) == "45.2 GB"


def test_the_transport_verb_states_the_all_channel_allowance_in_gb():
    from mabook.experiments import transport as verb

    assert verb.Config(source="a", target="b", k=0, max_record_gb=2.5).max_bytes == 2_500_000_000
    assert verb.Config(source="a", target="b").max_bytes is None
    with pytest.raises(ValueError, match=r"--max-record-gb must be > 0, got 0"):
        verb.Config(source="a", target="b", max_record_gb=0)
