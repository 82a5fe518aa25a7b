"""The table of bad inputs (issue 14): every CLI verb and every public function the chapters call.

Each row is (what is called, the error class expected, a fragment of its message). Function rows
call the function on the committed organism (or the small objects built from it once per module:
a 2-step baseline, capture and record); CLI rows run `mabook VERB ...` in-process and expect exit
code 2, exactly one line on stderr that holds the fragment, and no traceback. One CLI row runs the
installed entry point in a subprocess, as a user would (`--model nosuch`, offline).

A row that fails means an error became unclear (or stopped being raised): fix the function, not
the row. `pytest tests/test_bad_input.py -q` prints how many rows there are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mabook import (
    attention,
    cli,
    discovery,
    disruption,
    judge,
    linear_probes,
    models,
    organism,
    probe,
    sink_links,
    sinks,
    spatial,
    stats,
    transport,
    world,
)
from mabook.attention import KeyIntervention
from mabook.probe import Edit
from mabook.processors import Processor
from mabook.statistics import Statistics

torch.set_num_threads(1)
CAPTION = "a large red circle at the top left on a black background"
OTHER = "a small blue square at the center on a white background"
TAP = "transformer_blocks.1.img"
STEPS = 2


@pytest.fixture(scope="module")
def ctx(trained_organism, tmp_path_factory):
    """The organism and small objects built from it once: what the function rows call into."""
    pipe, adapter = trained_organism
    tmp = tmp_path_factory.mktemp("bad-input")
    base = disruption.baseline(adapter, [CAPTION], [0], STEPS, batch_size=1)
    cap = spatial.capture(adapter, [CAPTION, OTHER], [0], STEPS, taps=[TAP], steps=[1])
    rec = transport.record(adapter, [CAPTION], [0], taps=[TAP], channels=[0, 1], num_inference_steps=STEPS)
    # files: a corrupt statistics file, a truncated one, a checkpoint whose bytes changed, a corrupt card
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not safetensors")
    garbage_png = tmp / "garbage.png"
    garbage_png.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of an image")
    good = tmp / "stats.safetensors"
    base.stats.save(good)
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ckpt_dir = tmp / "ckpt"
    ckpt_dir.mkdir()
    corrupt = ckpt_dir / "corrupt.safetensors"
    corrupt.write_bytes(organism.CHECKPOINT.read_bytes()[:-16] + b"\x00" * 16)
    organism.card_path(corrupt).write_text(organism.card_path(organism.CHECKPOINT).read_text())
    bad_card = ckpt_dir / "badcard.safetensors"
    bad_card.write_bytes(organism.CHECKPOINT.read_bytes())
    organism.card_path(bad_card).write_text('{"file": "badcard.safetensors", "sha2')
    no_config = tmp / "empty-model-dir"
    no_config.mkdir()
    prompt_file = tmp / "blank.txt"
    prompt_file.write_text("\n  \n")
    a_file = tmp / "a-file"
    a_file.write_text("x")
    return SimpleNamespace(pipe=pipe, adapter=adapter, bare=models.adapter_for(pipe.transformer), base=base, cap=cap,
                           rec=rec, stats=base.stats, tmp=tmp, garbage=garbage, garbage_png=garbage_png, truncated=truncated,
                           corrupt=corrupt, bad_card=bad_card, no_config=no_config, prompt_file=prompt_file, a_file=a_file,
                           image=np.zeros((32, 32, 3), np.float32))


def _enter(context):
    """Build and enter a context manager (errors in the arguments surface on building or entering)."""
    with context:
        pass


def _collect_steps(c, steps):
    with probe.collect(c.adapter, taps=[TAP], capture=[(TAP, steps)]):
        c.pipe(CAPTION, num_inference_steps=STEPS)


def _edit_run(c, edits):
    with probe.edit(c.adapter, edits):
        c.pipe(CAPTION, num_inference_steps=STEPS)


def row(id, call, error, fragment):
    return pytest.param(call, error, fragment, id=id)


FUNCTION_ROWS = [
    # -- models.load / organism.load ----------------------------------------------------------------------
    row("load-unknown-id", lambda c: models.load("org/nosuch-model"), models.ModelNotFoundError, "cannot load model 'org/nosuch-model'"),
    row("load-unknown-id-says-what-to-pass", lambda c: models.load("nosuch"), OSError, "pass 'organism'"),
    row("load-missing-directory", lambda c: models.load("./no/such/dir"), OSError, "does not exist"),
    row("load-malformed-id", lambda c: models.load("bad id!"), OSError, "not a valid hub id"),
    row("load-wrong-type", lambda c: models.load(42), TypeError, "must be a str or Path"),
    row("load-dtype-str", lambda c: models.load("organism", dtype="float32"), TypeError, "dtype must be a torch.dtype"),
    row("load-bad-device", lambda c: models.load("organism", device="gpu"), ValueError, "device 'gpu' is not a torch device"),
    row("load-dir-without-model", lambda c: models.load(c.no_config), FileNotFoundError, "neither a pipeline"),
    row("load-path-for-non-organism", lambda c: models.load("org/x", path="y.safetensors"), ValueError, "path= is only for the organism"),
    row("load-cpu-offload-on-cpu", lambda c: models.load("org/x", cpu_offload=True), ValueError, "cpu_offload=True"),
    row("organism-missing-checkpoint", lambda c: organism.load(c.tmp / "none.safetensors"), FileNotFoundError, "organism checkpoint not found"),
    row("organism-corrupt-checkpoint", lambda c: organism.load(c.corrupt), organism.ChecksumError, "the file is corrupt or was replaced"),
    row("organism-corrupt-card", lambda c: organism.load(c.bad_card), ValueError, "checkpoint card"),
    row("load-organism-missing-path", lambda c: models.load("organism", path=c.tmp / "none.safetensors"), FileNotFoundError, "not found"),
    row("adapter-for-non-dit", lambda c: models.adapter_for(torch.nn.Linear(2, 2)), models.UnsupportedModelError, "unsupported model"),
    row("grid-wrong-size", lambda c: c.adapter.grid(64, 64), ValueError, "32x32 images only"),
    # -- probe ------------------------------------------------------------------------------------------------
    row("tap-unknown", lambda c: probe.resolve(c.adapter, "transformer_blocks.9.img"), ValueError, "unknown tap 'transformer_blocks.9.img'"),
    row("tap-wrong-type", lambda c: probe.resolve(c.adapter, 3), TypeError, "a tap must be a Tap"),
    row("tap-unknown-stream", lambda c: probe.Tap("transformer_blocks.0", "pixels"), ValueError, "unknown stream 'pixels'"),
    row("taps-unknown-stream", lambda c: probe.taps(c.adapter, ["image"]), ValueError, "unknown stream 'image'"),
    row("collect-unknown-cfg", lambda c: probe.collect(c.adapter, cfg="conditional"), ValueError, "unknown cfg 'conditional'"),
    row("collect-negative-step", lambda c: probe.collect(c.adapter, steps=[-1]), ValueError, "non-negative ints"),
    row("collect-capture-not-pair", lambda c: probe.collect(c.adapter, capture=[TAP]), TypeError, "(tap, step) pairs"),
    row("collect-capture-step-never-ran", lambda c: _collect_steps(c, 7), ValueError, "asked for step(s) [7]"),
    row("hooks-guidance-batch-type", lambda c: probe.hooks(c.adapter, print, guidance_batch="yes"), TypeError, "guidance_batch"),
    row("edit-not-an-edit", lambda c: probe.edit(c.adapter, [("tap", [0])]), TypeError, "edits must be Edit objects"),
    row("edit-no-channels", lambda c: probe.edit(c.adapter, Edit(TAP, [])), ValueError, "has no channels"),
    row("edit-channel-out-of-range", lambda c: probe.edit(c.adapter, Edit(TAP, [128])), ValueError, "channel 128"),
    row("edit-channel-negative", lambda c: probe.edit(c.adapter, Edit(TAP, [-1])), ValueError, "allowed: ints in [0, 128)"),
    row("edit-channel-float", lambda c: probe.edit(c.adapter, Edit(TAP, [1.5])), ValueError, "channel 1.5"),
    row("edit-channels-str", lambda c: probe.edit(c.adapter, Edit(TAP, "0")), TypeError, "must be an int or a list of ints"),
    row("collect-taps-int", lambda c: probe.collect(c.adapter, taps=5), TypeError, "taps must be a tap, a list of taps"),
    row("collect-steps-word", lambda c: probe.collect(c.adapter, steps="all"), TypeError, "steps must be an int, a list of ints or None"),
    row("edit-unknown-op", lambda c: probe.edit(c.adapter, Edit(TAP, [0], "erase")), ValueError, "unknown edit op 'erase'"),
    row("edit-scale-without-value", lambda c: probe.edit(c.adapter, Edit(TAP, [0], "scale")), ValueError, "needs a value"),
    row("edit-set-value-wrong-size", lambda c: probe.edit(c.adapter, Edit(TAP, [0, 1], "set", value=torch.zeros(3))), ValueError,
        "has 3 elements, expected 1 or 2"),
    row("edit-unknown-tap", lambda c: probe.edit(c.adapter, Edit("blocks.0.img", [0])), ValueError, "unknown tap"),
    row("edit-step-never-ran", lambda c: _edit_run(c, Edit(TAP, [0], steps=[9])), ValueError, "asked for step(s) [9]"),
    row("edit-token-mask-wrong-shape", lambda c: _edit_run(c, Edit(TAP, [0], token_mask=torch.ones(5, dtype=torch.bool))),
        ValueError, "token_mask"),
    row("edit-callable-wrong-shape", lambda c: _edit_run(c, Edit(TAP, [0], lambda x: x[:, :1])), ValueError, "must return a tensor of shape"),
    row("statistics-missing-file", lambda c: Statistics.load(c.tmp / "none.safetensors"), FileNotFoundError, "statistics file not found"),
    row("statistics-corrupt-file", lambda c: Statistics.load(c.garbage), ValueError, "truncated or corrupt"),
    row("statistics-truncated-file", lambda c: Statistics.load(c.truncated), ValueError, "truncated or corrupt"),
    row("statistics-not-mabook", lambda c: Statistics.load(organism.CHECKPOINT), ValueError, "not a mabook statistics file"),
    row("statistics-unknown-name", lambda c: c.stats.get("p99", TAP), ValueError, "p99"),
    row("statistics-unknown-step", lambda c: c.stats.get("abs_mean", TAP, 99), ValueError, "99"),
    row("statistics-merge-empty", lambda c: Statistics.merge([]), TypeError, "non-empty sequence of Statistics"),
    # -- discovery ------------------------------------------------------------------------------------------
    row("collect-statistics-str-prompts", lambda c: discovery.collect_statistics(c.adapter, CAPTION), TypeError, "non-empty list of str"),
    row("collect-statistics-empty-list", lambda c: discovery.collect_statistics(c.adapter, []), TypeError, "non-empty list of str"),
    row("collect-statistics-empty-prompt", lambda c: discovery.collect_statistics(c.adapter, [""]), ValueError, "non-empty"),
    row("collect-statistics-zero-steps", lambda c: discovery.collect_statistics(c.adapter, [CAPTION], 0), ValueError, "num_inference_steps"),
    row("collect-statistics-zero-batch", lambda c: discovery.collect_statistics(c.adapter, [CAPTION], 1, batch_size=0), ValueError,
        "batch_size must be an int >= 1"),
    row("collect-statistics-bare-transformer", lambda c: discovery.collect_statistics(c.bare, [CAPTION]), ValueError, "needs a pipeline"),
    row("check-k-zero", lambda c: discovery.check_k(0, 128), ValueError, "k=0 is out of range; allowed: 1 <= k <= 128"),
    row("check-k-too-large", lambda c: discovery.check_k(129, 128), ValueError, "k=129 is out of range"),
    row("check-k-float", lambda c: discovery.check_k(2.0, 128), TypeError, "k must be an int"),
    row("check-k-bool", lambda c: discovery.check_k(True, 128), TypeError, "k must be an int"),
    row("top-k-too-large", lambda c: discovery.top_k(np.zeros(4), 5), ValueError, "k=5 is out of range"),
    row("random-k-all-excluded", lambda c: discovery.random_k(4, 2, exclude=[0, 1, 2]), ValueError, "only 1 channels remain"),
    row("massive-channels-no-stream", lambda c: discovery.massive_channels(c.stats, 2, stream="txt"), ValueError, "no 'txt' taps"),
    row("massive-channels-k-too-large", lambda c: discovery.massive_channels(c.stats, 500), ValueError, "k=500 is out of range"),
    row("stability-one-set", lambda c: discovery.stability([[1, 2]]), ValueError, "at least 2 sets"),
    row("stability-bad-confidence", lambda c: discovery.stability([[1], [2]], confidence=95), ValueError, "confidence must be in (0, 1)"),
    # -- disruption -----------------------------------------------------------------------------------------
    row("baseline-empty-prompts", lambda c: disruption.baseline(c.adapter, [], [0], 1), ValueError, "non-empty list of str"),
    row("baseline-prompt-str", lambda c: disruption.baseline(c.adapter, CAPTION, [0], 1), ValueError, "non-empty list of str"),
    row("baseline-empty-prompt", lambda c: disruption.baseline(c.adapter, [" "], [0], 1), ValueError, "every prompt must be a non-empty str"),
    row("baseline-negative-seed", lambda c: disruption.baseline(c.adapter, [CAPTION], [-1], 1), ValueError, "non-negative ints"),
    row("baseline-no-seeds", lambda c: disruption.baseline(c.adapter, [CAPTION], [], 1), ValueError, "non-empty list of non-negative ints"),
    row("baseline-zero-steps", lambda c: disruption.baseline(c.adapter, [CAPTION], [0], 0), ValueError, "num_inference_steps must be an int >= 1"),
    row("baseline-float-steps", lambda c: disruption.baseline(c.adapter, [CAPTION], [0], 2.5), ValueError, "num_inference_steps"),
    row("baseline-zero-batch", lambda c: disruption.baseline(c.adapter, [CAPTION], [0], 1, batch_size=0), ValueError, "batch_size"),
    row("baseline-bare-transformer", lambda c: disruption.baseline(c.bare, [CAPTION], [0], 1), ValueError, "needs a pipeline"),
    row("conditions-k-zero", lambda c: disruption.conditions(c.base, [0]), ValueError, "k=0 is out of range"),
    row("conditions-k-too-large", lambda c: disruption.conditions(c.base, [129]), ValueError, "k=129 is out of range"),
    row("conditions-no-ks", lambda c: disruption.conditions(c.base, []), ValueError, "ks must be a non-empty list"),
    row("conditions-unknown-op", lambda c: disruption.conditions(c.base, [1], op="erase"), ValueError, "unknown op 'erase'"),
    row("conditions-scale-without-value", lambda c: disruption.conditions(c.base, [1], op="scale"), ValueError, "needs a numeric value"),
    row("conditions-unknown-kind", lambda c: disruption.conditions(c.base, [1], kinds=["middle"]), ValueError, "unknown channel set kind"),
    row("conditions-zero-random", lambda c: disruption.conditions(c.base, [1], n_random=0), ValueError, "n_random must be an int >= 1"),
    row("conditions-unknown-window", lambda c: disruption.conditions(c.base, [1], layer_part="first"), ValueError, "unknown window part"),
    row("channel-set-unknown-kind", lambda c: disruption.channel_set(c.stats, 2, "largest"), ValueError, "unknown channel set kind 'largest'"),
    row("channel-set-k-zero", lambda c: disruption.channel_set(c.stats, 0, "top"), ValueError, "k=0 is out of range"),
    row("run-no-conditions", lambda c: disruption.run(c.base, []), ValueError, "non-empty list of Condition"),
    row("run-not-a-condition", lambda c: disruption.run(c.base, ["top-1"]), TypeError, "must be Condition objects"),
    row("summary-empty-table", lambda c: disruption.summary([]), ValueError, "empty"),
    row("unit-values-unknown-metric", lambda c: disruption.unit_values(c.base.metrics, "fid"), ValueError, "no metric 'fid'"),
    # -- spatial --------------------------------------------------------------------------------------------
    row("capture-text-tap", lambda c: spatial.capture(c.adapter, [CAPTION], taps=["transformer_blocks.0.txt"]), ValueError,
        "spatial maps need an image tap"),
    row("capture-empty-steps", lambda c: spatial.capture(c.adapter, [CAPTION], steps=[]), ValueError, "steps must be a non-empty list"),
    row("capture-empty-prompts", lambda c: spatial.capture(c.adapter, []), ValueError, "non-empty list of str"),
    row("features-not-captured", lambda c: c.cap.features(TAP, 0), ValueError, "was not captured"),
    row("features-channel-out-of-range", lambda c: c.cap.features(TAP, 1, [200]), ValueError, "channel 200 is out of range"),
    row("features-empty-channels", lambda c: c.cap.features(TAP, 1, []), ValueError, "the channel set is empty"),
    row("features-repeated-channel", lambda c: c.cap.features(TAP, 1, [3, 3]), ValueError, "repeats a channel"),
    row("channel-sets-k-too-large", lambda c: spatial.channel_sets(c.cap.stats, 200), ValueError, "k=200 is out of range"),
    row("channel-sets-unknown-kind", lambda c: spatial.channel_sets(c.cap.stats, 2, ["best"]), ValueError, "unknown channel set kind 'best'"),
    row("kmeans-K-one", lambda c: spatial.kmeans(np.zeros((64, 4)), 1), ValueError, "K=1 is out of range; allowed: 2 <= K < 64"),
    row("kmeans-K-too-large", lambda c: spatial.kmeans(np.zeros((64, 4)), 64), ValueError, "K=64 is out of range"),
    row("kmeans-K-float", lambda c: spatial.kmeans(np.zeros((64, 4)), 2.5), ValueError, "must be an int"),
    row("kmeans-1d-features", lambda c: spatial.kmeans(np.zeros(64), 2), ValueError, "features must be (image_tokens, channels)"),
    row("kmeans-no-channels", lambda c: spatial.kmeans(np.zeros((64, 0)), 2), ValueError, "the channel set is empty"),
    row("threshold-unknown-rule", lambda c: spatial.threshold(np.zeros(64), "mean"), ValueError, "unknown threshold rule 'mean'"),
    row("label-map-wrong-size", lambda c: spatial.label_map(np.zeros(63), (8, 8)), ValueError, "63 labels do not fill a 8x8 token grid"),
    row("downsample-mismatched-grid", lambda c: spatial.downsample(np.zeros((32, 32)), (5, 5)), ValueError, "does not split into 5x5"),
    row("truth-not-a-caption", lambda c: spatial.truth("a cat", (8, 8)), ValueError, "needs a shapes-world caption"),
    row("truth-unknown-source", lambda c: spatial.truth(CAPTION, (8, 8), source="drawn"), ValueError, "unknown ground-truth source"),
    row("truth-judged-without-image", lambda c: spatial.truth(CAPTION, (8, 8), source="judged"), ValueError, "needs the generated image"),
    row("measure-no-sets", lambda c: spatial.measure(c.cap, {}), ValueError, "sets must be a non-empty dict"),
    row("measure-K-too-large", lambda c: spatial.measure(c.cap, spatial.channel_sets(c.cap.stats, 2, ["top"]), n_clusters=[64]),
        ValueError, "K=64 is out of range"),
    row("summary-unknown-metric", lambda c: spatial.summary([{"set": "a"}], metrics=["dice"]), ValueError, "unknown metric 'dice'"),
    row("summary-no-rows", lambda c: spatial.summary([]), ValueError, "no rows to summarise"),
    row("split-prompts-one-prompt", lambda c: linear_probes.split_prompts(["a", "a"]), ValueError, "at least 2 distinct prompts"),
    row("split-prompts-bad-fraction", lambda c: linear_probes.split_prompts(["a", "b"], 1.5), ValueError, "test_fraction must be in (0, 1)"),
    row("embed-too-few-samples", lambda c: linear_probes.embed(np.zeros((5, 3)), n_neighbors=10), ValueError, "n_neighbors=10 is out of range"),
    # -- attention ------------------------------------------------------------------------------------------
    row("key-intervention-unknown-keys", lambda c: KeyIntervention("heaviest"), ValueError, "unknown keys 'heaviest'"),
    row("key-intervention-unknown-path", lambda c: KeyIntervention(path="logit"), ValueError, "unknown path 'logit'"),
    row("key-intervention-k-zero", lambda c: KeyIntervention(k=0), ValueError, "k must be an int >= 1"),
    row("key-intervention-eta-above-one", lambda c: KeyIntervention(eta=1.5), ValueError, "eta must be a number in [0, 1]"),
    row("key-intervention-eta-negative", lambda c: KeyIntervention(eta=-0.1), ValueError, "eta must be a number in [0, 1]"),
    row("key-intervention-eta-str", lambda c: KeyIntervention(eta="0"), ValueError, "eta must be a number"),
    row("key-intervention-negative-seed", lambda c: KeyIntervention(seed=-1), ValueError, "seed must be a non-negative int"),
    row("key-intervention-negative-step", lambda c: KeyIntervention(steps=[-2]), ValueError, "non-negative ints"),
    row("intervene-unknown-layer", lambda c: attention.intervene(c.adapter, KeyIntervention(layers="blocks.0.attn")), ValueError,
        "has no attention"),
    row("intervene-not-an-intervention", lambda c: attention.intervene(c.adapter, "sink"), TypeError, "must be a KeyIntervention"),
    row("intervene-k-above-keys", lambda c: _run_intervention(c, KeyIntervention(k=500)), ValueError, "k=500 is larger than allowed"),
    row("capture-empty-layers", lambda c: attention.capture(c.adapter, layers=[]), ValueError, "non-empty list of attention module paths"),
    row("capture-layers-int", lambda c: attention.capture(c.adapter, layers=5), TypeError, "layers must be None (all)"),
    row("capture-steps-word", lambda c: attention.capture(c.adapter, steps="all"), TypeError, "steps must be an int"),
    row("capture-unknown-cfg", lambda c: attention.capture(c.adapter, cfg="all"), ValueError, "unknown cfg 'all'"),
    row("capture-bad-chunk", lambda c: attention.capture(c.adapter, chunk_elements=0), ValueError, "chunk_elements must be an int >= 1"),
    row("capture-intervene-inside", lambda c: _nested(c), ValueError, "outside attention.capture()"),
    row("attention-run-empty", lambda c: sinks.run(c.base, []), ValueError, "non-empty list of KeyIntervention"),
    row("attention-run-not-interventions", lambda c: sinks.run(c.base, [1]), TypeError, "KeyIntervention or Combined objects"),
    row("sink-link-step-out-of-range", lambda c: sink_links.sink_activation_link(c.base, step=STEPS), ValueError, "step must be an int in"),
    # -- transport ------------------------------------------------------------------------------------------
    row("record-empty-prompts", lambda c: transport.record(c.adapter, []), ValueError, "non-empty list of str"),
    row("record-step-outside", lambda c: transport.record(c.adapter, [CAPTION], steps=[5], num_inference_steps=2), ValueError,
        "outside the 2 steps"),
    row("record-channels-out-of-range", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[128],
                                                                  num_inference_steps=1), ValueError, "distinct ints in [0, 128)"),
    row("record-channels-empty", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[], num_inference_steps=1),
        ValueError, "at least one"),
    row("record-channels-word", lambda c: transport.record(c.adapter, [CAPTION], channels="top", num_inference_steps=1), ValueError,
        "channels must be 'all'"),
    row("record-channels-not-named", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], num_inference_steps=1), ValueError,
        "record needs channels: a list of ints (the same at every tap), {tap name: ints}, or 'all'"),
    row("record-over-max-bytes", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[0, 1], max_bytes=100,
                                                           num_inference_steps=1), ValueError, "keeps ~1.02 kB, over max_bytes=100"),
    row("record-max-bytes-negative", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[0], max_bytes=-1,
                                                               num_inference_steps=1), ValueError, "max_bytes must be a number of bytes >= 0"),
    row("record-channels-missing-tap", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels={"x": [0]},
                                                                 num_inference_steps=1), ValueError, "no set for tap"),
    row("record-mask-wrong-shape", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[0], token_mask=np.ones((1, 10), bool),
                                                             num_inference_steps=1), ValueError, "expected (units, tokens) = (1, 64)"),
    row("record-mask-not-bool", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[0], token_mask=np.ones((1, 64)),
                                                          num_inference_steps=1), ValueError, "must be bool"),
    row("record-mask-empty", lambda c: transport.record(c.adapter, [CAPTION], taps=[TAP], channels=[0], token_mask=np.zeros((1, 64), bool),
                                                       num_inference_steps=1), ValueError, "is empty for unit(s) [0]"),
    row("transport-alpha-above-one", lambda c: transport.transport(c.rec, [OTHER], 1.5), ValueError, "alpha must be a number in [0, 1]"),
    row("transport-alpha-str", lambda c: transport.transport(c.rec, [OTHER], "1"), ValueError, "alpha must be a number"),
    row("transport-unknown-stream", lambda c: transport.transport(c.rec, [OTHER], stream="pixels"), ValueError, "unknown stream 'pixels'"),
    row("transport-targets-mismatch", lambda c: transport.transport(c.rec, [OTHER, OTHER]), ValueError, "one target prompt and seed per"),
    row("transport-empty-target", lambda c: transport.transport(c.rec, [""]), ValueError, "every target prompt must be a non-empty str"),
    row("transport-other-schedule", lambda c: transport.transport(c.rec, [OTHER], num_inference_steps=5), ValueError, "must share the schedule"),
    row("transport-step-not-recorded", lambda c: transport.transport(c.rec, [OTHER], steps=[7]), ValueError, "were not recorded"),
    row("transport-no-tap-on-stream", lambda c: transport.transport(c.rec, [OTHER], stream="txt"), ValueError, "no tap on stream 'txt'"),
    row("transport-channel-subset", lambda c: transport.transport(c.rec, [OTHER], channels={TAP: [5]}), ValueError, "were not recorded"),
    row("kmeans-mask-not-recorded", lambda c: transport.kmeans_mask(c.rec, "transformer_blocks.0.img", 0), ValueError,
        "not a recorded image tap"),
    row("pixel-blend-shapes", lambda c: transport.pixel_blend(np.zeros((1, 32, 32, 3)), np.zeros((2, 32, 32, 3)), 0.5), ValueError,
        "differ in shape"),
    row("pixel-blend-alpha", lambda c: transport.pixel_blend(np.zeros((1, 4, 4, 3)), np.zeros((1, 4, 4, 3)), -0.5), ValueError,
        "alpha must be a number in [0, 1]"),
    # -- reference images (image-conditioned transport: mabook.inversion) ------------------------------------
    row("reference-missing-file", lambda c: _inversion().check_references(c.adapter, c.tmp / "none.png"), FileNotFoundError,
        "no such file"),
    row("reference-corrupt-file", lambda c: _inversion().check_references(c.adapter, c.garbage_png), OSError,
        "cannot identify image file"),
    row("reference-wrong-size", lambda c: _inversion().check_references(c.adapter, np.zeros((16, 16, 3), np.uint8)), ValueError,
        "allowed: 32x32"),
    row("reference-out-of-range", lambda c: _inversion().check_references(c.adapter, c.image + 2), ValueError, "must lie in [0, 1]"),
    row("reference-none-given", lambda c: _inversion().check_references(c.adapter, []), ValueError, "no reference images"),
    # -- stats ----------------------------------------------------------------------------------------------
    row("bootstrap-one-value", lambda c: stats.bootstrap_ci([1.0]), ValueError, "at least 2 values"),
    row("bootstrap-empty", lambda c: stats.bootstrap_ci([]), ValueError, "at least 2 values"),
    row("bootstrap-bad-confidence", lambda c: stats.bootstrap_ci([1.0, 2.0, 3.0], confidence=1.5), ValueError, "confidence must be in (0, 1)"),
    row("bootstrap-nan", lambda c: stats.bootstrap_ci([1.0, float("nan"), 2.0]), ValueError, "finite"),
    row("bootstrap-words", lambda c: stats.bootstrap_ci(["a", "b"]), ValueError, "numbers"),
    row("paired-ratio-mismatched", lambda c: stats.paired_ratio_ci([1.0, 2.0], [1.0, 2.0, 3.0]), ValueError, "same length"),
    # -- world and judge ------------------------------------------------------------------------------------
    row("caption-unparsable", lambda c: world.parse_caption("a red cat"), ValueError, "cannot parse caption 'a red cat'"),
    row("caption-not-str", lambda c: world.parse_caption(None), TypeError, "caption must be a str"),
    row("object-unknown-colour", lambda c: world.ObjectSpec("purple", "circle", "large", "center"), ValueError, "unknown color 'purple'"),
    row("scene-three-objects", lambda c: world.Scene((world.ObjectSpec("red", "circle", "large", "center"),) * 3), ValueError,
        "1 or 2 objects"),
    row("scene-unknown-background", lambda c: world.Scene((world.ObjectSpec("red", "circle", "large", "center"),), "green"), ValueError,
        "unknown background 'green'"),
    row("sample-negative-n", lambda c: world.sample(-1), ValueError, "n must be a non-negative int"),
    row("sample-unknown-split", lambda c: world.sample(1, split="test"), ValueError, "unknown split 'test'"),
    row("sample-three-objects", lambda c: world.sample(1, n_objects=3), ValueError, "n_objects must be 1, 2 or None"),
    row("heldout-zero-objects", lambda c: world.heldout_captions(2, 0), ValueError, "n_objects must be 1, 2"),
    row("heldout-negative-n", lambda c: world.heldout_captions(-1, 1), ValueError, "n must be a non-negative int"),
    row("judge-wrong-shape", lambda c: judge.judge(np.zeros((32, 32)), CAPTION), ValueError, "image must be (H, W, 3)"),
    row("judge-wrong-size", lambda c: judge.judge(np.zeros((16, 16, 3)), CAPTION), ValueError, "image must be 32x32"),
    row("judge-out-of-range", lambda c: judge.judge(c.image + 2, CAPTION), ValueError, "float images must lie in [0, 1]"),
    row("judge-bad-caption", lambda c: judge.judge(c.image, "a dog"), ValueError, "cannot parse caption"),
    # -- the CLI's prompt reader ----------------------------------------------------------------------------
    row("prompts-blank-file", lambda c: cli.read_prompts([str(c.prompt_file)]), ValueError, "has no non-empty lines"),
    row("prompts-missing-file", lambda c: cli.read_prompts(["prompts.txt"]), FileNotFoundError, "prompt file 'prompts.txt' not found"),
    row("prompts-empty-string", lambda c: cli.read_prompts([""]), ValueError, "prompt 1 of 1 is empty"),
    row("prompts-zero", lambda c: cli.read_prompts(["0"]), ValueError, "--prompts N must be >= 1"),
]


def _inversion():
    from mabook import inversion

    return inversion


def _run_intervention(c, iv):
    with attention.intervene(c.adapter, iv):
        c.pipe(CAPTION, num_inference_steps=1)


def _nested(c):
    with attention.capture(c.adapter), attention.intervene(c.adapter, KeyIntervention()):
        pass


@pytest.mark.parametrize("call,error,fragment", FUNCTION_ROWS)
def test_function_rejects_bad_input_clearly(ctx, call, error, fragment):
    with pytest.raises(error) as info:
        result = call(ctx)
        if hasattr(result, "__enter__"):  # a context manager: some checks run on entering it
            _enter(result)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message.strip(), f"a multi-line message: {message!r}"
    # every hook and processor is gone after a refused call
    assert not any(getattr(m, a) for m in ctx.adapter.transformer.modules()
                   for a in ("_forward_hooks", "_forward_pre_hooks"))
    assert not any(isinstance(m.processor, Processor) for m in ctx.adapter.attention_modules().values())


# -- the CLI: every verb, one line, exit code 2, no traceback -------------------------------------------------------


def verbs() -> dict:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def cli_row(id, argv, fragment):
    return pytest.param(argv, fragment, id=id)


GEN = ["--num-inference-steps", "1"]  # any row that got as far as generating would stay cheap
CLI_ROWS = [
    # every verb: an unknown model id, an empty prompt
    *[cli_row(f"{verb}-unknown-model", [verb, "--model", "org/nosuch-model", *extra], "cannot load model 'org/nosuch-model'")
      for verb, extra in (("discover", []), ("disrupt", []), ("cluster", []), ("sinks", []),
                          ("transport", ["--source", CAPTION, "--target", OTHER]))],
    *[cli_row(f"{verb}-empty-prompt", [verb, "--prompts", "", *GEN], "prompt 1 of 1 is empty")
      for verb in ("discover", "disrupt", "cluster", "sinks")],
    cli_row("transport-empty-source", ["transport", "--source", " ", "--target", OTHER], "--source is empty"),
    cli_row("discover-missing-model-dir", ["discover", "--model", "./no/such/model"], "does not exist"),
    cli_row("discover-missing-prompt-file", ["discover", "--prompts", "prompts.txt"], "prompt file 'prompts.txt' not found"),
    cli_row("discover-missing-checkpoint", ["discover", "--checkpoint", "nope.safetensors"], "organism checkpoint not found"),
    cli_row("discover-checkpoint-with-hub-model", ["discover", "--model", "org/x", "--checkpoint", "a.safetensors"],
            "--checkpoint is for --model organism only"),
    cli_row("discover-k-zero", ["discover", "--k", "0", *GEN], "k=0 is out of range; allowed: 1 <= k <= 128"),
    cli_row("discover-k-too-large", ["discover", "--k", "129", *GEN], "k=129 is out of range"),
    cli_row("discover-zero-steps", ["discover", "--num-inference-steps", "0"], "--num-inference-steps must be >= 1, got 0"),
    cli_row("discover-zero-batch", ["discover", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    cli_row("discover-negative-seed", ["discover", "--seed", "-1"], "--seed must be a non-negative int"),
    cli_row("discover-bad-cfg", ["discover", "--cfg", "half"], "invalid choice: 'half'"),
    cli_row("discover-k-not-int", ["discover", "--k", "four"], "invalid int value: 'four'"),
    cli_row("discover-bad-device", ["discover", "--device", "gpu"], "--device 'gpu'"),
    cli_row("discover-cuda-without-cuda", ["discover", "--device", "cuda"], "allowed: 'cpu'") if not torch.cuda.is_available()
    else cli_row("discover-bad-dtype", ["discover", "--dtype", "float8"], "invalid choice: 'float8'"),
    cli_row("disrupt-k-too-large", ["disrupt", "--k", "500", *GEN], "k=500 is out of range; allowed: 1 <= k <= 128"),
    cli_row("disrupt-unknown-op", ["disrupt", "--op", "erase"], "unknown --op 'erase'"),
    cli_row("disrupt-scale-without-value", ["disrupt", "--op", "scale"], "--op scale needs --value"),
    cli_row("disrupt-zero-random", ["disrupt", "--n-random", "0"], "--n-random must be >= 1"),
    cli_row("disrupt-unknown-kind", ["disrupt", "--kinds", "middle"], "invalid choice: 'middle'"),
    cli_row("disrupt-negative-seed", ["disrupt", "--seeds", "-3"], "--seeds must be non-negative ints, got -3"),
    cli_row("cluster-K-one", ["cluster", "--k", "1", *GEN], "K=1 is out of range; allowed: 2 <= K < 64"),
    cli_row("cluster-unknown-tap", ["cluster", "--tap", "transformer_blocks.9.img", *GEN], "unknown tap 'transformer_blocks.9.img'"),
    cli_row("cluster-text-tap", ["cluster", "--tap", "transformer_blocks.0.txt", *GEN], "spatial maps need an image tap"),
    cli_row("cluster-step-never-runs", ["cluster", "--step", "4", "--num-inference-steps", "2"], "step 4 never runs"),
    cli_row("cluster-unknown-kind", ["cluster", "--kind", "middle"], "unknown --kind 'middle'"),
    cli_row("cluster-channels-too-many", ["cluster", "--n-channels", "300", *GEN], "k=300 is out of range"),
    cli_row("cluster-zero-channels", ["cluster", "--n-channels", "0"], "--n-channels must be >= 1"),
    cli_row("sinks-eta-above-one", ["sinks", "--eta", "1.5", *GEN], "eta must be a number in [0, 1]"),
    cli_row("sinks-eta-half-default-controls", ["sinks", "--eta", "0.5", *GEN],
            "--controls random-mass (a default) needs --eta 0 or 1 under --dose redistribute, got --eta 0.5"),
    cli_row("sinks-k-zero", ["sinks", "--k", "0", *GEN], "k must be an int >= 1"),
    cli_row("sinks-unknown-layer", ["sinks", "--layer", "transformer_blocks.0.ff", *GEN], "has no attention"),
    cli_row("sinks-unknown-path", ["sinks", "--path", "logits"], "invalid choice: 'logits'"),
    cli_row("sinks-unknown-dose", ["sinks", "--dose", "halve"], "invalid choice: 'halve'"),
    cli_row("sinks-zero-top", ["sinks", "--top", "0"], "--top must be >= 1"),
    cli_row("sinks-zero-random", ["sinks", "--n-random", "0"], "--n-random must be >= 1"),
    cli_row("transport-alpha-above-one", ["transport", "--source", CAPTION, "--target", OTHER, "--alpha", "1.5"],
            "alpha must be a number in [0, 1]"),
    cli_row("transport-negative-k", ["transport", "--source", CAPTION, "--target", OTHER, "--k", "-1"], "--k must be >= 0"),
    cli_row("transport-k-too-large", ["transport", "--source", CAPTION, "--target", OTHER, "--k", "500", *GEN],
            "--k 500 is out of range"),
    cli_row("transport-unknown-stream", ["transport", "--source", CAPTION, "--target", OTHER, "--stream", "pixels"],
            "invalid choice: 'pixels'"),
    cli_row("transport-missing-source", ["transport", "--target", OTHER], "give --source (a prompt) or --reference"),
    cli_row("sweep-unknown-experiment", ["sweep", "explode"], "unknown experiment 'explode'"),
    cli_row("sweep-unknown-model", ["sweep", "discover", "--model", "org/nosuch-model"], "cannot load model 'org/nosuch-model'"),
    cli_row("sweep-empty-prompt", ["sweep", "disrupt", "--prompts", ""], "prompt 1 of 1 is empty"),
    cli_row("sweep-zero-stop-after", ["sweep", "discover", "--stop-after", "0"], "--stop-after must be >= 1"),
    cli_row("sweep-unknown-dose", ["sweep", "sinks", "--dose", "halve"], "invalid choice: 'halve'"),
    cli_row("no-verb", [], "the following arguments are required: command"),
    cli_row("unknown-verb", ["explode"], "invalid choice: 'explode'"),
]


@pytest.fixture
def offline(monkeypatch):
    """The hub client offline (as in CI): an unknown model id fails at once, without a network round trip."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("argv,fragment", CLI_ROWS)
def test_cli_bad_input_is_one_line_exit_2_no_traceback(tmp_path, capsys, offline, argv, fragment):
    out = ["--out", str(tmp_path / "out")] if argv and argv[0] in verbs() else []
    try:
        code = cli.main([*argv, *out])
    except SystemExit as e:  # argparse: a malformed command line
        code = e.code
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment in lines[0] and lines[0].startswith("mabook"), lines[0]
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not written, f"a refused run wrote files: {written}"


def test_cli_unknown_model_from_the_installed_command_is_one_line(tmp_path):
    """As a user types it (the issue's example), in a fresh process, offline: one line, what was tried, what to pass."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mabook.cli", "discover", "--model", "nosuch", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    for said in ("cannot load model 'nosuch'", "not a local directory", "Hugging Face cache", "HF_HUB_OFFLINE=1", "pass 'organism'"):
        assert said in line, line


def test_debug_shows_the_traceback(tmp_path, offline):
    with pytest.raises(ValueError, match="k=0 is out of range"):
        cli.main(["discover", "--k", "0", "--out", str(tmp_path), "--debug"])
    with pytest.raises(ValueError, match="k=0 is out of range"):
        cli.main(["--debug", "discover", "--k", "0", "--out", str(tmp_path)])


def test_the_table_covers_every_verb():
    covered = {p.values[0][0] for p in CLI_ROWS if p.values[0]}
    assert set(verbs()) <= covered, f"verbs without a bad-input row: {set(verbs()) - covered}"
    print(f"\nbad-input table: {len(FUNCTION_ROWS)} function rows + {len(CLI_ROWS)} CLI rows (+1 subprocess row) = "
          f"{len(FUNCTION_ROWS) + len(CLI_ROWS) + 1} rows")


def test_the_dose_choices_are_the_attention_doses():
    """`--dose` is refused at parse time (before loading a model) from the same list KeyIntervention checks."""
    sweeps = next(a for a in verbs()["sweep"]._actions if isinstance(a, argparse._SubParsersAction)).choices
    for parser in (verbs()["sinks"], sweeps["sinks"]):
        (action,) = [a for a in parser._actions if a.dest == "dose"]
        assert tuple(action.choices) == attention.DOSES and action.default == KeyIntervention().dose
