"""Held-out selection (issue 22): the channel sets and the edits' values of chapter 2 come from
prompts held out from the evaluated ones, not from the units they are then tested on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mabook import disruption, world
from mabook.config import read_prompts
from mabook.experiments import disrupt

STEPS = 2


def test_an_integer_selection_set_is_the_next_held_out_captions_disjoint_from_the_evaluated():
    evaluated = read_prompts(["4"])
    selected = read_prompts(["3"], skip=4)
    assert evaluated == world.heldout_captions(4, n_objects=1, seed=0)  # unchanged by the option
    assert selected == world.heldout_captions(7, n_objects=1, seed=0)[4:]
    assert not set(evaluated) & set(selected)

    config = disrupt.Config(prompts=["4"])
    assert config.selection_list == world.heldout_captions(12, n_objects=1, seed=0)[4:]  # the default: 8 more
    assert disrupt.Config(prompts=["4"], selection_prompts=["same"]).selection_list is None
    with pytest.raises(ValueError, match=r"the selection prompts share 1 prompt\(s\) with the evaluated ones \(e\.g\. "):
        disrupt.Config(prompts=["4"], selection_prompts=[evaluated[2], selected[0]])


def test_the_mean_edit_sets_the_held_out_prompts_mean_not_the_evaluated_units(trained_organism):
    """The value "mean" writes into the top channels at block 0 is the held-out prompts' mean at that
    step, computed here with a raw forward hook and numpy (both guidance halves, every image token)."""
    pipe, adapter = trained_organism
    evaluated, held_out = world.heldout_captions(4, n_objects=1, seed=0)[:2], world.heldout_captions(4, n_objects=1, seed=0)[2:]
    base = disruption.baseline(adapter, evaluated, [0], STEPS, batch_size=2, selection_prompts=held_out)
    assert base.selector is base.selection

    calls = []
    block = pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_hook(lambda module, args, output: calls.append(output[1].detach().double().numpy()))
    try:
        adapter.generate([(p, 0) for p in held_out], STEPS, 2)
    finally:
        handle.remove()
    assert len(calls) == STEPS  # one [uncond; cond] call per step
    expected = [c.reshape(-1, c.shape[-1]).mean(0) for c in calls]  # (channels,) per step

    (cond,) = disruption.conditions(base, [2], ["top"], op="mean")
    tap = next(name for name, _ in cond.channels if name.startswith("transformer_blocks.0"))  # block 0's image stream
    channels = dict(cond.channels)[tap]
    by_step = {e.steps[0]: e.value.numpy() for e in cond.edits(base.selector) if str(e.tap) == tap}
    assert sorted(by_step) == list(range(STEPS))
    for step in range(STEPS):
        np.testing.assert_allclose(by_step[step], expected[step][list(channels)], rtol=1e-5, atol=1e-6)
        own = base.stats.get("mean", next(t for t in base.stats.layers("img") if str(t) == tap), step)
        assert not np.allclose(own[list(channels)].numpy(), by_step[step], rtol=1e-3)  # the evaluated units differ

    # the top set itself is chosen on the held-out statistics: |mean over tokens| per sample, averaged
    abs_mean = np.concatenate([np.abs(c.mean(1)) for c in calls]).mean(0)  # over samples of both halves, steps
    assert set(channels) == set(np.argsort(-abs_mean)[:2].tolist())
    assert torch.is_tensor(base.selection.get("abs_mean", next(iter(base.selection.layers("img")))))


def test_selection_prompts_on_the_evaluated_units_are_refused_before_generating(trained_organism):
    _, adapter = trained_organism
    prompts = world.heldout_captions(2, n_objects=1, seed=0)
    with pytest.raises(ValueError, match="share 1 prompt"):
        disruption.baseline(adapter, prompts, [0], STEPS, selection_prompts=[prompts[1]])
