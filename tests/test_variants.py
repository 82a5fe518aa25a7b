"""mabook.organism.variants: each counterfactual organism changes what it says, builds, and its factor works."""

from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np
import pytest
import torch

from mabook import organism, train
from mabook.organism import variants


def test_every_variant_names_real_fields_and_builds():
    organism_fields = {f.name for f in fields(organism.OrganismConfig)}
    train_fields = {f.name for f in fields(train.TrainConfig)}
    for v in variants.VARIANTS.values():
        assert set(v.organism) <= organism_fields and set(v.train) <= train_fields, v.name
        assert v.predictions, f"{v.name} has no prediction written down"
    assert variants.VARIANTS["control"].organism == {} and variants.VARIANTS["control"].train == {}
    with pytest.raises(ValueError, match="unknown variant 'shallow'; allowed:"):
        variants.check("shallow")


def test_no_timestep_organism_ignores_the_timestep_and_norm_affine_starts_as_the_plain_norm():
    torch.manual_seed(0)
    plain = organism.build_transformer(organism.OrganismConfig())
    torch.manual_seed(0)
    constant = organism.build_transformer(organism.OrganismConfig(timestep_conditioning=False))
    torch.manual_seed(0)
    affine = organism.build_transformer(organism.OrganismConfig(norm_affine=True))
    cfg = organism.OrganismConfig()
    x = torch.randn(2, cfg.grid ** 2, cfg.in_channels)
    text, pooled = torch.randn(2, cfg.max_text_length, 128), torch.randn(2, 128)
    ids = dict(img_ids=organism.image_ids(cfg.grid), txt_ids=torch.zeros(cfg.max_text_length, 3), return_dict=False)

    def run(model, t):
        with torch.no_grad():
            return model(x, text, pooled, torch.full((2,), t), **ids)[0]

    # the constant-timestep organism gives one output whatever t is, and the plain one's at t = 0.5
    assert torch.equal(run(constant, 0.1), run(constant, 0.9))
    assert torch.allclose(run(constant, 0.1), run(plain, organism.CONSTANT_TIMESTEP / 1000), atol=1e-6)
    assert not torch.allclose(run(plain, 0.1), run(plain, 0.9))
    # affine norms: new parameters (a scale and a bias per norm), and at initialisation the same function
    extra = {k for k in affine.state_dict()} - {k for k in plain.state_dict()}
    assert extra and all(k.endswith((".weight", ".bias")) and "norm" in k for k in extra)
    affine.load_state_dict({**affine.state_dict(), **plain.state_dict()})
    assert torch.allclose(run(affine, 0.3), run(plain, 0.3), atol=1e-6)


def test_a_variant_checkpoint_saves_and_loads_with_its_config(tmp_path):
    torch.manual_seed(0)
    cfg = organism.OrganismConfig(timestep_conditioning=False, norm_affine=True)
    pipe = organism.build_pipeline(cfg)
    path = tmp_path / "v.safetensors"
    organism.save(pipe, path)
    loaded = organism.load(path)
    assert asdict(loaded.organism_config) == asdict(cfg)
    assert type(loaded.transformer.time_text_embed.time_proj).__name__ == "ConstantTimesteps"


VARIANT_DIR = organism.CHECKPOINT_DIR / "variants"


@pytest.mark.parametrize("path", sorted(VARIANT_DIR.glob("*.safetensors")), ids=lambda p: p.stem)
def test_committed_variant_checkpoints_are_what_their_recipe_says(path):
    """Each committed counterfactual organism loads hash-checked, and its card's configs are the
    committed recipe with exactly its variant's changes (same seed and data)."""
    v = variants.check(path.stem)
    pipe = organism.load(path)
    expected_organism = {**asdict(organism.OrganismConfig()), **v.organism}
    assert json_ready(asdict(pipe.organism_config)) == json_ready(expected_organism)
    expected_train = {**asdict(train.TrainConfig()), "steps": variants.CONTROL_STEPS, **v.train}
    # threads is how the run was executed, not the recipe (long-schedule resumed on two threads at step 4550)
    recipe = lambda config: {k: val for k, val in config.items() if k not in ("save_at", "threads")}  # noqa: E731
    assert recipe(pipe.card["train_config"]) == recipe(json_ready(expected_train))
    assert pipe.card["step"] == expected_train["steps"]


def json_ready(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d))


def test_gated_mlp_organism_gates_every_mlp_at_the_same_parameter_count(tmp_path):
    x = 30 * torch.randn(3, 10)  # SwiGLU against its formula written out in numpy, at massive magnitudes
    a, b = x[:, :5].numpy().astype("float64"), x[:, 5:].numpy().astype("float64")
    np.testing.assert_allclose(organism.SwiGLU()(x).numpy(), a * b / (1 + np.exp(-b)), rtol=1e-5, atol=1e-6)

    plain = organism.build_transformer(organism.OrganismConfig())
    gated = organism.build_transformer(organism.OrganismConfig(mlp="swiglu"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(gated) / count(plain) - 1) < 0.01  # the 2/3 rule: same budget, only the MLP's form changes
    assert all(isinstance(blk.act_mlp, organism.SwiGLU) for blk in gated.single_transformer_blocks)
    assert all(blk.ff.net[0].__class__.__name__ == "SwiGLU" for blk in gated.transformer_blocks)
    # it saves and loads with its own architecture
    cfg = organism.OrganismConfig(mlp="swiglu")
    pipe = organism.build_pipeline(cfg)
    organism.save(pipe, tmp_path / "gated.safetensors", {"step": 0})
    again = organism.load(tmp_path / "gated.safetensors")
    assert again.organism_config.mlp == "swiglu"
    for (k, p), (_, q) in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(p.half().float(), q), k  # the checkpoint stores fp16
    with pytest.raises(ValueError, match="OrganismConfig.mlp='relu': expected one of gelu, swiglu"):
        organism.OrganismConfig(mlp="relu")
