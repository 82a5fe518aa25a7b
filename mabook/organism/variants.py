"""Counterfactual organisms: the committed recipe with one thing changed, and what each reading predicts.

Each variant is plain data: the `OrganismConfig` and `TrainConfig` fields it changes from the
committed organism (same shapes world, same seed, same step budget unless the step budget is the
factor), and the predictions written down before any of them was trained (2026-12-02, commit
3c4cce3, the commit that added the variants' code). The chapter "Where do massive activations come
from?" reads its table from here and its numbers from `mabook/results/origins.json`.

Train one (resumable; one thread, as the committed organism):

    python -m mabook.train --variant no-timestep --state runs/no-timestep/state \\
        --out runs/no-timestep/organism-no-timestep.safetensors

What this is not: a hyper-parameter search. A variant changes one factor a reading names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREDICTIONS_DATE = "2026-12-02"
PREDICTIONS_COMMIT = "3c4cce3"


@dataclass(frozen=True)
class Variant:
    name: str
    factor: str  # the one thing changed, in words
    organism: dict = field(default_factory=dict)  # OrganismConfig fields changed
    train: dict = field(default_factory=dict)  # TrainConfig fields changed (besides steps=6000, the committed budget)
    predictions: dict = field(default_factory=dict)  # reading -> what it predicts for the top channel's LayerNorm share
    written: str = f"{PREDICTIONS_DATE}, commit {PREDICTIONS_COMMIT}"  # when the predictions were written, before training


CONTROL_STEPS = 6000  # the committed organism's budget (its card's train_config)

VARIANTS = {v.name: v for v in (
    Variant("control", "the committed recipe (checkpoint b9e76a98fb00)", predictions={
        "measured": "top channel 66 in every image block, LayerNorm share 0.26-0.42 (outside measurement)"}),
    Variant("no-timestep", "the AdaLN modulation sees one constant timestep (t = 0.5); the noise level is "
            "only in the input", organism={"timestep_conditioning": False}, predictions={
        "detail guidance": "the channel is driven by the timestep embedding: without it, no massive channel "
                           "(share near the uniform 1/128)",
        "implicit parameter": "the channel is a pre-norm artefact: it appears as in the control"}),
    Variant("norm-affine", "every LayerNorm has a learnable scale and bias (explicit constants)",
            organism={"norm_affine": True}, predictions={
        "implicit parameter": "a learnable constant is available: the channel shrinks (share below the control's)",
        "detail guidance": "no change: the channel follows the timestep, not the norm's parameters"}),
    Variant("long-schedule", "twice the steps (12000): the share was still growing when the learning rate decayed",
            train={"steps": 2 * CONTROL_STEPS}, predictions={
        "emergence": "the share keeps growing with training: above the control's at 6000 steps of a 12000-step "
                     "schedule and higher again at the end"}),
    Variant("high-lr", "twice the learning rate (1.2e-3) and no weight decay",
            train={"lr": 1.2e-3, "weight_decay": 0.0}, predictions={
        "emergence": "larger updates and no decay pulling weights to 0: a steeper share curve than the control's"}),
    Variant("gated-mlp", "every MLP gated (SwiGLU, a * silu(b)) at the same parameter count (hidden width "
            "2/3 of 4x)", organism={"mlp": "swiglu"}, predictions={
        "implicit parameter": "a product of two projections of the same token is a quadratic amplifier (the Spike "
                              "paper): a larger share, reached sooner, than the control's",
        "detail guidance": "no change: the channel follows the timestep, not the MLP's form"},
            written="2026-12-02 18:50 UTC, before its training started (the commit that adds this variant)"),
    Variant("deep", "8 double + 8 single blocks (twice the depth): a longer residual stream, as real DiTs",
            organism={"num_layers": 8, "num_single_layers": 8}, predictions={
        "implicit parameter": "more blocks to amplify and carry a spike: a larger share than the control's"}),
)}


def check(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; allowed: {list(VARIANTS)}")
    return VARIANTS[name]
