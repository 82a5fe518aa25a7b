"""Issue 22's transport design: masks chosen by a rule that never sees the truth (the truth-matched
mask only as a labelled oracle), flip-rate baselines beside every "took", the same conditioning
treatment for every method, and text-stream / both-stream transport.

The mask rule is checked on planted cases whose answer is known (labels and features built here),
and on a real record with every reader of the truth replaced by one that fails. The flip rates are
checked on the world's own renders and on hand-made rows. Streams are checked inside a generation
with plain torch hooks (no mabook code): a text-stream transport hands the source's text tokens to
every next block and leaves the image stream as the target's until the text has acted on it.
"""

import argparse
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mabook import image_transport, judge, probe, spatial, text_transport, transport, world
from mabook.text_transport import Method, Pair

torch.set_num_threads(1)
SOURCE = "a large cyan square at the right on a white background"
TARGET = "a small yellow circle at the center on a gray background"
STEPS = 3
GRID = (8, 8)


@pytest.fixture(scope="module")
def adapter(trained_organism):
    return trained_organism[1]


@pytest.fixture(scope="module")
def full(adapter):
    """Every channel at every tap of both streams and every step, and the conditioning; two units."""
    return transport.record(adapter, [SOURCE, TARGET], seeds=[0], channels="all", num_inference_steps=STEPS)


def taps_of(adapter, stream):
    return [str(t) for t in probe.taps(adapter, [stream])]


def assert_no_hooks(adapter):
    for name, module in adapter.transformer.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr), f"{name or 'transformer'}.{attr} not empty"


def planted(box: tuple[slice, slice], inside: int = 1, outside: int = 0) -> np.ndarray:
    labels = np.full(GRID, outside)
    labels[box] = inside
    return labels.ravel()


# -- the mask rule: truth-free by default -------------------------------------------------------------


@pytest.mark.parametrize("box", [
    (slice(3, 5), slice(3, 5)),  # a small object in the middle
    (slice(1, 7), slice(1, 7)),  # an object larger than its background (36 of 64 tokens)
    (slice(2, 6), slice(0, 3)),  # an object touching the left edge
])
@pytest.mark.parametrize("object_label", [0, 1])
def test_the_border_rule_finds_a_planted_object_whatever_its_label_and_size(box, object_label):
    labels = planted(box, inside=object_label, outside=1 - object_label)
    truth = planted(box).astype(bool)
    assert np.array_equal(transport.border_foreground(labels, GRID), truth)
    if truth.sum() > 32:  # here "the smaller cluster" would have called the background foreground
        assert (~truth).sum() < truth.sum()


def test_the_border_rule_on_three_clusters_and_a_constant_map():
    labels = planted((slice(1, 3), slice(1, 3)))
    labels[planted((slice(5, 7), slice(4, 7))).astype(bool)] = 2
    assert np.array_equal(transport.border_foreground(labels, GRID), labels != 0)  # both objects
    assert not transport.border_foreground(np.zeros(64, int), GRID).any()  # one cluster: all background
    with pytest.raises(ValueError, match="labels has 63 tokens; the 8x8 grid has 64"):
        transport.border_foreground(np.zeros(63, int), GRID)


def planted_record(n_units: int = 3) -> transport.Record:
    """A Record built by hand: one image tap, one step, two channels; unit u has a square of value 9
    (plus noise) in channel 0 at a place of its own, channel 1 is noise."""
    rng = np.random.default_rng(0)
    boxes = [(slice(1, 4), slice(2, 5)), (slice(3, 7), slice(3, 7)), (slice(0, 3), slice(5, 8))]
    x = rng.normal(0, 0.1, (n_units, 64, 2)).astype(np.float32)
    for u in range(n_units):
        x[u, planted(boxes[u]).astype(bool), 0] += 9
    tap = "transformer_blocks.0.img"
    values = {(tap, 0): {"cond": torch.from_numpy(x.reshape(-1, 2))}}
    fake = SimpleNamespace(grid=lambda height=None, width=None: GRID, family=SimpleNamespace(name="flux"))
    rec = transport.Record(fake, [(f"a photo number {u}", 0) for u in range(n_units)], np.zeros((n_units, 32, 32, 3)),
                           {tap: [0, 1]}, [0], values, torch.ones(n_units, 64, dtype=torch.bool), 0, 1)
    rec.boxes = boxes
    return rec


def test_kmeans_mask_by_the_border_rule_is_each_units_planted_square():
    rec = planted_record()
    mask = transport.kmeans_mask(rec, "transformer_blocks.0.img", 0)
    assert np.array_equal(mask.numpy(), np.stack([planted(b).astype(bool) for b in rec.boxes]))
    with pytest.raises(ValueError, match="mask rule 'oracle' matches clusters to the truth, which only shapes-world captions"):
        transport.kmeans_mask(rec, "transformer_blocks.0.img", 0, rule="oracle")
    with pytest.raises(ValueError, match=r"unknown mask rule 'smallest'; allowed: \['border', 'oracle'\]"):
        transport.kmeans_mask(rec, "transformer_blocks.0.img", 0, rule="smallest")


def test_the_border_rule_never_reads_the_truth_and_the_oracle_does(full, monkeypatch):
    tap = taps_of(full.adapter, "img")[4]
    expected = transport.kmeans_mask(full, tap, STEPS - 1, channels=[66, 5, 9, 100])

    def sees_the_answer(*args, **kwargs):
        raise AssertionError("read the truth")

    for module, name in ((spatial, "truth"), (spatial, "assign"), (world, "render"), (world, "parse_caption"),
                         (judge, "judge"), (judge, "applies")):
        monkeypatch.setattr(module, name, sees_the_answer)
    got = transport.kmeans_mask(full, tap, STEPS - 1, channels=[66, 5, 9, 100])
    assert torch.equal(got, expected) and got.any(1).all()
    with pytest.raises(AssertionError, match="read the truth"):
        transport.kmeans_mask(full, tap, STEPS - 1, rule="oracle", channels=[66, 5, 9, 100])


# -- flip-rate baselines --------------------------------------------------------------------------------


def render(caption) -> np.ndarray:
    return world.render(world.parse_caption(caption)).image.astype(np.float32) / 255


def test_score_gives_flip_rates_and_the_chance_of_landing_on_the_source():
    """On the world's renders: the source's render took and flipped the differing attribute; a flip
    lands on the source's value by chance once in VALUES[a] - 1, so size (two values) is all chance."""
    assert text_transport.VALUES == {"color": 7, "shape": 3, "size": 2, "position": 9}
    for pair in text_transport.pairs("one_attribute", 4, seed=0):  # colour, shape, size, position in turn
        (a,) = pair.differs
        took = text_transport.score(pair, render(pair.source), render(pair.target))
        assert took[f"took_{a}"] == took[f"flipped_{a}"] == 1
        assert took[f"chance_{a}"] == pytest.approx(1 / (text_transport.VALUES[a] - 1))
        assert took[f"over_chance_{a}"] == pytest.approx(0 if a == "size" else 1 - 1 / (text_transport.VALUES[a] - 1))
        kept = text_transport.score(pair, render(pair.target), render(pair.target))
        assert kept[f"took_{a}"] == kept[f"flipped_{a}"] == kept[f"chance_{a}"] == 0
        others = [b for b in world.ATTRIBUTES if b != a]
        assert all(np.isnan(took[f"{m}_{b}"]) for b in others for m in ("took", "flipped", "chance", "over_chance"))


def test_summary_puts_the_no_transport_baseline_beside_every_took():
    took = {"top": [1, 1, 0, np.nan], "target image": [0, 1, 0, 0]}
    rows = [{"kind": "k", "pair": i, "method": m, "alpha": None if m == "target image" else 1.0, "took_color": v,
             "kept_target": 1.0} for m, vs in took.items() for i, v in enumerate(vs)]
    s = {r["method"]: r for r in text_transport.summary(rows, by=("method", "alpha"), metrics=("took_color", "kept_target"),
                                                        baseline=text_transport.FLIP_BASELINE)}
    top = s["top"]
    assert top["took_color"] == pytest.approx(2 / 3) and top["baseline"] == "target image"
    assert top["took_color_baseline"] == pytest.approx(1 / 3)  # over the pairs both have: 0, 1, 2
    assert top["took_color_over_baseline"] == pytest.approx(1 / 3) and top["n_took_color_over_baseline"] == 3
    lo, hi = top["took_color_over_baseline_ci"]
    assert 0 <= lo <= 1 / 3 <= hi <= 1
    assert "kept_target_baseline" not in top  # only "took" metrics have a flip baseline
    assert s["target image"]["took_color_over_baseline"] == 0
    plain = text_transport.summary(rows, by=("method", "alpha"), metrics=("took_color",))
    assert not any(k.endswith("_baseline") or k == "baseline" for r in plain for k in r)
    with pytest.raises(ValueError, match=r"baseline 'no such method' has no rows; allowed: None or one of the methods"):
        text_transport.summary(rows, by=("method",), metrics=("took_color",), baseline="no such method")


# -- the same conditioning for every method ---------------------------------------------------------------


def test_no_method_moves_the_conditioning_unless_asked_and_asking_applies_to_every_method(adapter):
    pairs = {"one_attribute": text_transport.pairs("one_attribute", 2, seed=0)}
    top = {t: [66, 5] for t in taps_of(adapter, "img")}
    methods = [Method("top-2", channels=top), Method("all channels", channels="all"),
               Method("all channels + conditioning", channels="all", conditioning=True), Method("pixel blend", "pixel")]
    c = text_transport.compare(adapter, pairs, methods, alphas=(1.0,), num_inference_steps=STEPS, batch_size=2)
    label = {r["method"]: r["conditioning"] for r in c.rows}
    assert label == {"top-2": False, "all channels": False, "all channels + conditioning": True, "pixel blend": None,
                     "source image": None, "target image": None}
    assert np.array_equal(c.images[("all channels + conditioning", None, 1.0)], c.sources)  # the exactness check
    assert not np.array_equal(c.images[("all channels", None, 1.0)], c.sources)  # norm_out reads the target's temb
    on = text_transport.compare(adapter, pairs, methods[:2], alphas=(1.0,), num_inference_steps=STEPS, batch_size=2,
                                conditioning=True)
    assert {r["method"]: r["conditioning"] for r in on.rows if r["method_kind"] == "channels"} == {"top-2": True, "all channels": True}
    assert np.array_equal(on.images[("all channels", None, 1.0)], c.sources)
    assert not np.array_equal(on.images[("top-2", None, 1.0)], c.images[("top-2", None, 1.0)])
    assert_no_hooks(adapter)


# -- text-stream and both-stream transport ------------------------------------------------------------------


def test_text_stream_at_alpha_zero_is_the_target_bitwise(full):
    out = transport.transport(full, [TARGET, SOURCE], 0.0, stream="txt")
    assert np.array_equal(out.images, out.target) and all(r["stream"] == "txt" for r in out.table)


@contextlib.contextmanager
def block_inputs(adapter):
    """Plain torch pre-hooks at every block but the first: per call, the text and image inputs the
    block received (the previous block's outputs, after every edit); and a forward hook at block 0
    keeping its image output as returned (registered first: before any editor)."""
    t = adapter.transformer
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    seen = {"txt": {i: [] for i in range(1, len(blocks))}, "img": {i: [] for i in range(1, len(blocks))}, "block0_img": []}

    def pre(i):
        def hook(module, args, kwargs):
            seen["txt"][i].append(kwargs["encoder_hidden_states"].detach().clone())
            seen["img"][i].append(kwargs["hidden_states"].detach().clone())

        return hook

    handles = [blocks[0].register_forward_hook(lambda m, a, out: seen["block0_img"].append(out[1].detach().clone()))]
    handles += [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks) if i]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_text_stream_transport_hands_on_the_source_text_and_leaves_the_image_stream_alone(adapter, full):
    """alpha = 1, every text channel: every block after the first receives the source's text tokens
    (block i - 1's recorded text output) at every step; at the first step, before the text has acted
    on any image token, the image stream is the unedited target's."""
    with block_inputs(adapter) as plain:
        target = adapter.generate([(TARGET, 0), (SOURCE, 0)], STEPS, 16)
    with block_inputs(adapter) as seen:
        out = transport.transport(full, [TARGET, SOURCE], 1.0, stream="txt", target_images=target)
    blocks = [b.path for b in adapter.blocks]
    for i in range(1, len(blocks)):
        for step in range(STEPS):
            source = torch.cat([full.dense(f"{blocks[i - 1]}.txt", step, role, 0, 2) for role in ("uncond", "cond")])
            assert torch.equal(seen["txt"][i][step], source), (blocks[i], step)
        assert not torch.equal(plain["txt"][i][0], seen["txt"][i][0])
    assert torch.equal(seen["block0_img"][0], plain["block0_img"][0])  # block 0's image output: its inputs are the target's
    assert torch.equal(seen["img"][1][0], plain["img"][1][0])  # and it is handed on unedited
    assert not torch.equal(seen["img"][2][0], plain["img"][2][0])  # block 1 read the source's text: the image moved
    assert not np.array_equal(out.images, target)
    assert_no_hooks(adapter)


def test_streams_in_a_comparison_and_the_both_stream_endpoint(adapter):
    """Through compare: the record keeps the text stream when a method moves it; alpha = 0 is the
    target on every stream; alpha = 1 with every channel of both streams and the conditioning is
    the source bitwise (an endpoint check independent of the image-stream one)."""
    pairs = {kind: text_transport.pairs(kind, 1, seed=0) for kind in ("one_attribute", "one_object_of_two")}
    txt_top = {t: [97, 86] for t in taps_of(adapter, "txt")}
    img_top = {t: [66, 5] for t in taps_of(adapter, "img")}
    methods = [Method("top-2 text", channels=txt_top, stream="txt"), Method("top-2 both", channels=img_top | txt_top, stream="both"),
               Method("all, both streams + conditioning", channels="all", stream="both", conditioning=True),
               Method("all, text stream", channels="all", stream="txt")]
    c = text_transport.compare(adapter, pairs, methods, alphas=(0.0, 1.0), num_inference_steps=STEPS, batch_size=2)
    for m in methods:
        assert np.array_equal(c.images[(m.name, None, 0.0)], c.targets)
    assert np.array_equal(c.images[("all, both streams + conditioning", None, 1.0)], c.sources)
    assert not np.array_equal(c.images[("all, text stream", None, 1.0)], c.targets)
    labels = {r["method"]: (r["stream"], r["conditioning"]) for r in c.rows if r["method_kind"] == "channels"}
    assert labels == {"top-2 text": ("txt", False), "top-2 both": ("both", False),
                      "all, both streams + conditioning": ("both", True), "all, text stream": ("txt", False)}
    assert_no_hooks(adapter)


def test_masks_by_rule_in_a_comparison(adapter):
    """Each mask rule a method uses gets its masks; the oracle rows are labelled as such."""
    pairs = {"one_attribute": text_transport.pairs("one_attribute", 2, seed=0)}
    taps = taps_of(adapter, "img")
    top = {t: [66, 5] for t in taps}
    methods = [Method("top-2 in union mask", channels=top, mask="union"),
               Method("top-2 in oracle union mask", channels=top, mask="union", mask_rule="oracle")]
    c = text_transport.compare(adapter, pairs, methods, alphas=(1.0,), num_inference_steps=STEPS, batch_size=2,
                               mask_at=(taps[4], 1), mask_channels=top)
    assert list(c.masks) == ["border", "oracle"] and c.masks["oracle"]["source"].shape == (2, 64)
    assert {r["method"]: r["mask_rule"] for r in c.rows} == {"top-2 in union mask": "border",
                                                            "top-2 in oracle union mask": "oracle",
                                                            "source image": None, "target image": None}


# -- bad values: one line naming the value and what is allowed ------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(channels="all", stream="pooled"), r"unknown stream 'pooled'; allowed: \['img', 'txt', 'both'\]"),
    (dict(channels="all", mask="union", mask_rule="truth"), r"unknown mask rule 'truth'; allowed: \['border', 'oracle'\]"),
    (dict(channels="all", conditioning="yes"), r"conditioning must be True, False or None \(compare's\), got 'yes'"),
    (dict(kind="pixel", stream="txt"), r"of kind 'pixel' moves no channels; allowed: stream, conditioning and mask None"),
    (dict(channels="all", mask="union", stream="txt"), r"mask 'union' selects image tokens; allowed with stream 'img' or 'both'"),
])
def test_bad_method_options_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as refused:
        Method("m", **kwargs)
    assert "\n" not in str(refused.value)


def test_bad_comparison_options_are_refused_before_generating(adapter):
    pairs = {"one_attribute": [Pair(SOURCE, TARGET, ("color",))]}
    with pytest.raises(ValueError, match=r"conditioning must be True or False \(what every method that leaves it None does\), got 1"):
        text_transport.compare(adapter, pairs, [Method("m", channels="all")], conditioning=1, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"unknown stream 'text'; allowed"):
        text_transport.compare(adapter, pairs, [Method("m", channels="all")], stream="text", num_inference_steps=1)
    with pytest.raises(ValueError, match=r"stream 'txt'; allowed: None or 'img' \(a reference's record keeps the image stream"):
        image_transport.compare(adapter, pairs, [Method("m", channels="all", stream="txt")], num_inference_steps=1)


# -- the command line: options generated from its config ------------------------------------------------------------


def test_the_transport_verb_has_the_mask_rule_and_states_its_conditioning():
    from mabook.experiments import transport as verb

    parser = argparse.ArgumentParser()
    verb.Config.add_arguments(parser)
    args = parser.parse_args(["--target", "b", "--source", "a", "--mask", "union", "--mask-rule", "oracle", "--stream", "both"])
    config = verb.Config.from_args(args)
    assert (config.mask_rule, config.stream) == ("oracle", "both")
    with pytest.raises(SystemExit):
        parser.parse_args(["--target", "b", "--mask-rule", "smallest"])
    with pytest.raises(ValueError, match=r"--mask-rule oracle chooses a mask's foreground; allowed with --mask source, target or union"):
        verb.Config(source="a", target="b", mask_rule="oracle")
    assert verb.Config(source="a", target="b", k=0).with_conditioning  # auto: the all-channel exactness check
    assert not verb.Config(source="a", target="b", k=16).with_conditioning
    assert verb.Config(source="a", target="b", k=16, conditioning="on").with_conditioning
    assert not verb.Config(source="a", target="b", k=0, conditioning="off").with_conditioning


def test_every_mask_rule_is_defined_for_tables():
    assert list(transport.MASK_RULE_DEFINITIONS) == list(transport.MASK_RULES)
    assert transport.MASK_RULE_DEFINITIONS["border"].startswith("truth-free")
    assert transport.MASK_RULE_DEFINITIONS["oracle"].startswith("sees the truth")
