"""`mabook.realshape`: the quick bench runs and writes strict JSON, the FLOP formula equals torch's own
count on tiny blocks of every family, the plan's fit decisions on hand-computed cases, and the
chapters' workloads read from their notebooks."""

import json
import math
from dataclasses import replace

import pytest
import torch

from mabook import bench, realshape
from mabook.models import FAMILIES

GIB = 2**30


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_quick_bench_writes_strict_json_and_the_plan(tmp_path, capsys):
    out, page = tmp_path / "realshape.json", tmp_path / "page.md"
    assert bench.main(["realshape", "--quick", "--resolutions", "64", "--out", str(out)]) == 0
    doc = strict(out.read_text())
    assert {"date", "machine", "versions", "settings", "peak_memory", "runs", "parameters"} <= set(doc)
    assert doc["versions"]["torch"] == torch.__version__ and doc["settings"]["quick"] is True
    assert [(r["model"], r["resolution"]) for r in doc["runs"]] == [("FLUX.1-dev", 64), ("SD3.5 medium", 64)]
    for r in doc["runs"]:
        assert set(r["modes"]) == set(realshape.MODES) and r["modes"]["bare"]["wall_ratio"] == r["modes"]["bare"]["cpu_ratio"] == 1.0
        assert all(v["per_block_s"] > 0 and v["peak_bytes"] >= 0 and len(v["seconds"]) == 1 for v in r["modes"].values())
        checks = r["checks"]
        assert checks["outputs_finite"] and checks["probe_unchanged"] and checks["capture_unchanged"] and checks["record_unchanged"]
        assert checks["intervention_changed_output"] and checks["mass_sum_max_error"] < 1e-5
        assert checks["recorded_tensors"] == r["blocks"]  # one image tap per block
    # the full models' parameters, built on the meta device: FLUX.1-dev's transformer is the "12B" of its card
    assert doc["parameters"]["FLUX.1-dev transformer"]["parameters"] == pytest.approx(11.9e9, rel=0.01)
    assert doc["parameters"]["T5-XXL encoder"]["parameters"] == pytest.approx(4.76e9, rel=0.01)
    assert "wrote" in capsys.readouterr().out

    page.write_text(f"intro\n\n{realshape.BEGIN}\nold table\n{realshape.END}\n\ntail\n")
    assert bench.main(["realshape", "--plan-only", "--out", str(out), "--md", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("\ntail\n") and "old table" not in text
    assert "| FLUX.1-dev | A100 80 GB | " in text and "#### Which GPU holds which model" in text  # (tiny widths: any verdict)
    assert text.count(realshape.BEGIN) == text.count(realshape.END) == 1


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match=r"--resolutions must be .*multiples of 16.*got \[500\]"):
        realshape.run(resolutions=[500])
    with pytest.raises(ValueError, match="--repeats must be >= 1, got 0"):
        realshape.run(repeats=0, resolutions=[64], quick=True)
    with pytest.raises(ValueError, match=r"unknown bench model 'sd3'; allowed: \['flux', 'sd3.5-medium'\]"):
        realshape.run(models=("sd3",))


# -- FLOPs: the formula against torch's own count, one tiny model per family ------------------

T = 8
TINY = {
    "FLUX.1-dev": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    # block 0 dual attention, block 2 the last (context_pre_only)
    "SD3.5 medium": {**realshape.SD35_MEDIUM, **dict(sample_size=8, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
                                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                                     pooled_projection_dim=16, pos_embed_max_size=16, dual_attention_layers=(0,))},
    "PixArt-Σ": dict(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                     caption_channels=24, cross_attention_dim=32, use_additional_conditions=False),
    "SANA 1.6B": dict(in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                      num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
                      mlp_ratio=2.5, sample_size=4, patch_size=1),
}


@pytest.mark.parametrize("name", list(TINY))
def test_block_flops_equal_torchs_flop_counter(name):
    import diffusers
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config, image_tokens = TINY[name], 16
    model = replace(realshape.BY_NAME[name], config=config, text_tokens=T)
    torch.manual_seed(0)
    transformer = getattr(diffusers, FAMILIES[model.family].transformer_class)(**config).eval()
    side = math.isqrt(image_tokens)
    if model.family in ("flux", "sd3"):
        kwargs = realshape._inputs(model, config, image_tokens, "cpu", torch.float32)
    elif model.family == "pixart":
        kwargs = dict(hidden_states=torch.randn(1, 4, 2 * side, 2 * side), encoder_hidden_states=torch.randn(1, T, 24),
                      timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        kwargs = dict(hidden_states=torch.randn(1, 4, side, side), encoder_hidden_states=torch.randn(1, T, 24),
                      timestep=torch.tensor([500]))
    # the math backend: scores and attention x values as matmuls the counter sees (CPU's fused kernel has no FLOP formula)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        transformer(**kwargs, return_dict=False)
    counts = counter.get_flop_counts()
    cls = type(transformer).__name__
    blocks = [f"{cls}.{lst}.{i}" for lst in FAMILIES[model.family].block_lists for i in range(len(getattr(transformer, lst)))]
    assert [sum(counts[b].values()) for b in blocks] == realshape.block_flops(model, image_tokens)


def test_flux_dev_step_flops_from_the_shapes():
    flux = realshape.BY_NAME["FLUX.1-dev"]
    D, N = 3072, 4096 + 512  # 1024²: 64 x 64 image tokens
    per_token_block = 12 * D * D  # each token meets 12 D² weights per block (double: its stream's half; single: qkv, MLP, out)
    expected = 2 * 57 * (N * per_token_block + 2 * N * N * D) + 2 * (19 * 12 + 38 * 3) * D * D
    assert realshape.step_flops(flux, 1024) == expected
    assert 70e12 < expected < 80e12
    assert realshape.step_flops(realshape.BY_NAME["SD3.5 medium"], 512) == 2 * sum(realshape.block_flops(
        realshape.BY_NAME["SD3.5 medium"], 1024))  # CFG: two samples per step


# -- the plan ---------------------------------------------------------------------------------

PIPE = {"transformer": 4 * GIB, "text encoder": 2 * GIB, "VAE": GIB // 8}  # bf16: 8 + 4 + 0.25 = 12.25 GiB


@pytest.mark.parametrize("memory_gib, activation_gib, verdict", [
    (14, 0, "bf16"),  # 13 GiB usable >= 12.25
    (14, 1, "bf16 + offload"),  # 12 < 12.25, the largest component (8) fits
    (10, 0, "bf16 + offload"),
    (6, 0, "8-bit + offload"),  # 5 usable: transformer 4 GiB in 8-bit
    (4, 0, "4-bit + offload"),  # 3 usable: 4 GiB params x 0.5625 = 2.25
    (3, 0, "does not fit"),  # 2 usable < 2.25
])
def test_fit_by_hand(memory_gib, activation_gib, verdict):
    assert realshape.ASSUMPTIONS["reserved_gib"] == 1.0 and realshape.ASSUMPTIONS["bytes_per_parameter"]["4-bit"] == 0.5625
    assert realshape.fit(PIPE, memory_gib * GIB, activation_gib * GIB) == verdict


def test_vaes_stay_bfloat16_and_weight_bytes_follow_the_verdict():
    vae_heavy = {"transformer": GIB, "VAE KL-16": 2 * GIB}  # a 4 GiB VAE is never quantized: nothing fits 3 GiB usable
    assert realshape.fit(vae_heavy, 4 * GIB) == "does not fit"
    assert realshape.weight_bytes(PIPE, "bf16") == 2 * (6 * GIB + GIB // 8)
    assert realshape.weight_bytes(PIPE, "8-bit + offload") == 6 * GIB + 2 * (GIB // 8)


@pytest.mark.parametrize("chapter", realshape.CHAPTERS)
def test_workloads_read_from_the_notebooks(chapter):
    for full in (False, True):
        v = realshape.chapter_parameters(chapter, full)
        assert v["resolution"] >= 256 and v["NUM_INFERENCE_STEPS"] >= 1 and 1 <= v["real_prompts"] <= v.get("N_PROMPTS", 99)
        items = realshape.workload(chapter, v)
        assert items and all(mode in (*realshape.MODES, "edit", "intervene-1-layer") and gens >= 1 and calls >= 1
                             for mode, gens, calls in items)
    one = realshape.chapter_parameters("01_channel_discovery", False)
    assert realshape.workload("01_channel_discovery", one) == [("probe", one["real_prompts"] * len(one["SEEDS"]),
                                                               one["real_prompts"] + len(one["SEEDS"]) - 1)]


def test_minutes_add_offload_copies_and_refuse_what_does_not_fit():
    flux, gpu = realshape.BY_NAME["FLUX.1-dev"], ("X", 81920, 100.0)
    rates = {"probe": 1.5}
    compute = 10 * 20 * realshape.step_flops(flux, 512) * 1.5 / (100e12 * realshape.ASSUMPTIONS["achieved_fraction"]) / 60
    items = [("probe", 10, 3)]
    assert realshape.chapter_minutes(flux, gpu, "bf16", items, rates, 512, 20, 1e10) == pytest.approx(compute)
    copies = 3 * 1e10 / (realshape.ASSUMPTIONS["host_to_device_gb_per_s"] * 1e9) / 60
    assert realshape.chapter_minutes(flux, gpu, "bf16 + offload", items, rates, 512, 20, 1e10) == pytest.approx(compute + copies)
    assert realshape.chapter_minutes(flux, gpu, "does not fit", items, rates, 512, 20, 1e10) is None
    assert realshape.chapter_minutes(flux, gpu, "bf16", items, {"probe": None}, 512, 20, 1e10) is None
