"""mabook.origins: the timestep-swap test separates the AdaLN timestep from the input's noise level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mabook import models, organism, origins

torch.set_num_threads(1)


def _eval(pipe):
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return pipe


def _least_squares_shares(v: np.ndarray) -> tuple[float, float]:
    """Independent: R^2 of row dummies alone and of column dummies alone, by least squares."""
    I, J = v.shape
    y = v.reshape(-1) - v.mean()
    rows = np.kron(np.eye(I), np.ones((J, 1)))
    cols = np.kron(np.ones((I, 1)), np.eye(J))
    out = []
    for X in (rows, cols):
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        out.append(1 - ((y - X @ beta) ** 2).sum() / (y**2).sum())
    return out[0], out[1]


def test_two_way_shares_match_least_squares_and_add_to_one():
    rng = np.random.default_rng(0)
    v = 3e3 + rng.normal(size=(5, 4)) + np.arange(5)[:, None] * 2.0 + np.arange(4)[None, :] * 0.5  # a real-model level
    shares = origins.two_way_shares(v)
    r2_rows, r2_cols = _least_squares_shares(v)
    assert shares["embedding"] == pytest.approx(r2_rows, abs=1e-9)
    assert shares["input"] == pytest.approx(r2_cols, abs=1e-9)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert origins.two_way_shares(np.outer(np.arange(3.0), np.ones(4)))["embedding"] == pytest.approx(1.0)
    assert origins.two_way_shares(np.full((3, 3), 7.0)) == {"embedding": 0.0, "input": 0.0, "interaction": 0.0}


@pytest.mark.parametrize("timestep_conditioning", [True, False])
def test_a_constant_timestep_organism_has_no_embedding_share(timestep_conditioning):
    torch.manual_seed(0)
    cfg = organism.OrganismConfig(num_layers=1, num_single_layers=1, timestep_conditioning=timestep_conditioning)
    pipe = _eval(organism.build_pipeline(cfg))
    swap = origins.timestep_swap(pipe, models.adapter_for(pipe), n_captions=2, timesteps=(0.8, 0.5, 0.2))
    assert swap.values.shape == (2, 3, 3) and swap.taps == ["transformer_blocks.0.img", "single_transformer_blocks.0.img"]
    for row in swap.decomposition():
        if timestep_conditioning:
            assert row["embedding"] > 0
        else:  # the AdaLN never sees the timestep: every row of the table is the same, bit for bit
            assert row["embedding"] == pytest.approx(0.0, abs=1e-12)
    if not timestep_conditioning:
        assert (swap.values == swap.values[:, :1, :]).all()


def test_a_cell_is_the_channel_mean_of_a_raw_forward_hook():
    torch.manual_seed(1)
    pipe = _eval(organism.build_pipeline(organism.OrganismConfig(num_layers=1, num_single_layers=1)))
    adapter = models.adapter_for(pipe)
    swap = origins.timestep_swap(pipe, adapter, n_captions=2, timesteps=(0.8, 0.3))
    # recompute cell (embedding 0.8, input 0.3) at the double block with a plain forward hook
    from mabook import world

    samples = world.sample(2, seed=0, n_objects=1, split="heldout")
    x0 = organism.patchify(world.to_tensor_batch(samples), pipe.organism_config.patch_size)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[1].clone()))
    try:
        with torch.no_grad():
            organism.velocity(pipe, 0.7 * x0 + 0.3 * noise, [s.caption for s in samples], torch.full((2,), 0.8))
    finally:
        handle.remove()
    expected = seen[0][..., swap.channels[0]].double().mean().item()  # image stream: FLUX double blocks return (txt, img)
    assert swap.values[0, 0, 1] == pytest.approx(expected, rel=1e-5)


def test_timestep_swap_refuses_other_families_and_bad_levels():
    torch.manual_seed(0)
    pipe = _eval(organism.build_pipeline(organism.OrganismConfig(num_layers=1, num_single_layers=1)))
    adapter = models.adapter_for(pipe)
    with pytest.raises(ValueError, match=r"timesteps must be at least two levels in \[0, 1\], got \(0.5, 1.5\)"):
        origins.timestep_swap(pipe, adapter, timesteps=(0.5, 1.5))
    with pytest.raises(ValueError, match="n_captions must be an int >= 1, got 0"):
        origins.timestep_swap(pipe, adapter, n_captions=0)


def test_emergence_reads_the_medians_of_a_card():
    card = {"emergence": [
        {"step": 250, "ema": [{"ratio": 2.0, "max_abs": 1.0, "norm_share": 0.1}, {"ratio": 4.0, "max_abs": 3.0, "norm_share": 0.3},
                              {"ratio": 9.0, "max_abs": 2.0, "norm_share": 0.2}]},
        {"step": 500, "ema": [{"ratio": 5.0, "max_abs": 7.0}]},  # logged before the share existed
    ]}
    assert origins.emergence(card) == [{"step": 250, "norm_share": 0.2, "ratio": 4.0, "max_abs": 3.0},
                                       {"step": 500, "norm_share": None, "ratio": 5.0, "max_abs": 7.0}]


@pytest.mark.filterwarnings("ignore")
def test_measure_selects_on_other_prompts_and_reports_every_part():
    torch.manual_seed(0)
    pipe = _eval(organism.build_pipeline(organism.OrganismConfig(num_layers=1, num_single_layers=1)))
    pipe.set_progress_bar_config(disable=True)
    out = origins.measure(pipe, n_prompts=3, num_inference_steps=2, n_random=2)
    assert out["selection"]["captions_seed"] != out["evaluation_captions_seed"]
    assert [row["tap"] for row in out["layers"]] == ["transformer_blocks.0.img", "single_transformer_blocks.0.img"]
    d = out["damage"]["pixel_mse"]
    assert d["n_prompts"] == 3 and d["top_zero_ci"][0] <= d["top_zero"] <= d["top_zero_ci"][1]
    assert sum(out["sinks"]["top1_kind"].values()) == pytest.approx(1.0)
    assert sum(out["sinks"]["mass"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(out["timestep_swap"]) == 2
