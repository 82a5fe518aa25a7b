"""mabook.transport: record, transport, baselines.

The endpoints are checked bitwise: alpha = 0 is the target; alpha = 1 with every channel at every
tap and step is the source once the one conditioning that is not a block output (the pooled text
embedding of the final AdaLN) is made equal -- and, with it left alone, the last hidden states are
still the source's bitwise.
"""

import dataclasses

import numpy as np
import pytest
import torch

from mabook import probe, transport

torch.set_num_threads(1)
SOURCE = "a large cyan square at the right on a white background"
TARGET = "a small yellow circle at the center on a gray background"
STEPS = 3


@pytest.fixture(scope="module")
def adapter(trained_organism):
    return trained_organism[1]


@pytest.fixture(scope="module")
def full(adapter):
    """Every channel at every tap of both streams and every step, two units."""
    return transport.record(adapter, [SOURCE, TARGET], seeds=[0], num_inference_steps=STEPS)


def assert_no_hooks(adapter):
    for name, module in adapter.transformer.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr), f"{name or 'transformer'}.{attr} not empty"


def test_alpha_zero_reproduces_target_exactly(full):
    out = transport.transport(full, [TARGET, SOURCE], alpha=0.0, stream="both")
    assert torch.equal(torch.from_numpy(out.images), torch.from_numpy(out.target))
    assert all(r["pixel_mse"] == 0 for r in out.table)
    assert_no_hooks(full.adapter)


def test_alpha_one_all_channels_copies_every_block_output(adapter, full):
    """Every block output of both streams becomes the source's, bitwise; the image still differs,
    because the final AdaLN reads the target's pooled text embedding (an input, not a block output)."""
    out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, stream="both")
    last = str(probe.taps(adapter, ["img"])[-1])
    seen = {}
    box = {}
    # the editor first: forward hooks run in registration order, so the observer sees the edited output
    with probe.edit(adapter, transport._edits(full, box, list(full.channels), full.steps, 1.0, None, 0, 2)) as ed:
        box["editor"] = ed
        with probe.hooks(adapter, lambda tap, step, h: seen.setdefault(step, h.clone()), taps=[last], cfg="both"):
            transport.disruption._generate(adapter, [(TARGET, 0), (SOURCE, 0)], STEPS, 16, {})
    for step in range(STEPS):
        src = torch.cat([full.dense(last, step, role, 0, 2) for role in ("uncond", "cond")])
        assert torch.equal(seen[step], src)
    assert np.abs(out.images - full.images).max() > 1e-3  # documented: the pooled path is not transported


def test_alpha_one_with_equal_pooled_embedding_reproduces_source_exactly(adapter, monkeypatch):
    pipe = adapter.pipe
    encode = pipe.encode_prompt
    _, pooled_source = encode([SOURCE])

    def same_pooled(prompts):  # token embeddings differ, pooled vectors of non-empty prompts are the source's
        embeds, pooled = encode(prompts)
        keep = torch.tensor([p != "" for p in prompts])[:, None]
        return embeds, torch.where(keep, pooled_source.expand_as(pooled), pooled)

    monkeypatch.setattr(pipe, "encode_prompt", same_pooled)
    rec = transport.record(adapter, [SOURCE], seeds=[3], num_inference_steps=STEPS)
    out = transport.transport(rec, [TARGET], alpha=1.0, stream="both")
    assert not np.array_equal(out.target, rec.images)  # the text tokens alone make a different image
    assert torch.equal(torch.from_numpy(out.images), torch.from_numpy(rec.images))


def test_record_memory_grows_with_k_not_width(adapter):
    taps = [str(t) for t in probe.taps(adapter, ["img"])]
    one = transport.record(adapter, [SOURCE], [0], taps=taps, channels=[5], num_inference_steps=STEPS)
    eight = transport.record(adapter, [SOURCE], [0], taps=taps, channels=list(range(8)), num_inference_steps=STEPS)
    assert eight.nbytes == 8 * one.nbytes
    assert one.nbytes == transport.bytes_recorded(len(taps), 64, STEPS, 1, bytes_per_value=4)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :16] = True
    quarter = transport.record(adapter, [SOURCE], [0], taps=taps, channels=[5], token_mask=mask,
                               num_inference_steps=STEPS)
    assert quarter.nbytes * 4 == one.nbytes
    kept, everything = quarter.dense(taps[0], 1, "cond", 0, 1), one.dense(taps[0], 1, "cond", 0, 1)
    np.testing.assert_array_equal(kept[0, :16], everything[0, :16])


def test_masked_transport_leaves_other_tokens_alone_at_its_tap(adapter, full):
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :8] = True  # the top row of tokens
    out = transport.transport(full, [TARGET, SOURCE], alpha=0.5, mask=mask, steps=[0])
    assert out.images.shape == full.images.shape and out.table[0]["masked_tokens"] == 8
    assert {"took_source_color", "kept_target_position", "differs_size", "ssim"} <= set(out.table[0])


def test_baselines(adapter, full):
    s, t = full.images[:1], full.images[1:]
    np.testing.assert_allclose(transport.pixel_blend(s, t, 0.25), 0.75 * t + 0.25 * s, atol=1e-7)
    chans = {"transformer_blocks.0.img": [0, 1, 2]}
    rand = transport.random_channels(adapter, chans, seed=1)
    assert len(rand["transformer_blocks.0.img"]) == 3 and not set(rand["transformer_blocks.0.img"]) & {0, 1, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=1.5), "alpha must be a number in \\[0, 1\\], got 1.5"),
    (dict(alpha=-0.1), "alpha must be a number in \\[0, 1\\], got -0.1"),
    (dict(num_inference_steps=STEPS + 1), f"num_inference_steps {STEPS + 1} differs from the source's {STEPS}"),
    (dict(mask=torch.zeros(2, 64, dtype=torch.bool)), "mask is empty for unit\\(s\\) \\[0, 1\\]"),
    (dict(mask=torch.ones(2, 16, dtype=torch.bool)),
     "mask has shape \\(2, 16\\); expected \\(units, tokens\\) = \\(2, 64\\)"),
    (dict(stream="pooled"), "unknown stream 'pooled'; allowed: \\['img', 'txt', 'both'\\]"),
    (dict(steps=[STEPS + 2]), f"steps \\[{STEPS + 2}\\] were not recorded"),
])
def test_bad_input_is_refused_clearly(full, kwargs, message):
    with pytest.raises(ValueError, match=message):
        transport.transport(full, [TARGET, SOURCE], **kwargs)


def test_different_token_grids_are_refused(full):
    other = dataclasses.replace(full, token_mask=torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="token grid 8x8 \\(64 tokens\\) differs from the source's 16 tokens"):
        transport.transport(other, [TARGET, SOURCE])


def test_no_hook_survives_an_exception(adapter, full):
    broken = dataclasses.replace(full, values={k: {r: v[:-1] for r, v in by.items()} for k, by in full.values.items()})
    with pytest.raises(Exception):
        transport.transport(broken, [TARGET, SOURCE], alpha=0.5, target_images=full.images)
    assert_no_hooks(adapter)
    with pytest.raises(ValueError, match="token_mask is empty"):
        transport.record(adapter, [SOURCE], [0], token_mask=torch.zeros(1, 64, dtype=torch.bool), num_inference_steps=STEPS)
    assert_no_hooks(adapter)


def test_kmeans_mask_feeds_a_masked_transport(full):
    tap = str(probe.taps(full.adapter, ["img"])[3])
    mask = transport.kmeans_mask(full, tap, STEPS - 1)
    assert mask.shape == (2, 64) and mask.dtype == torch.bool and mask.any(1).all() and not mask.all()
    out = transport.transport(full, [TARGET, SOURCE], alpha=1.0, mask=mask)
    assert [r["masked_tokens"] for r in out.table] == mask.sum(1).tolist()
