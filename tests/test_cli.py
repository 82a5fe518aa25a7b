"""mabook.cli: `mabook discover` writes statistics and the top-k table; bad input is one clear line."""

import contextlib
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mabook import cli, organism
from mabook.statistics import Statistics

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("organism") / "organism.safetensors"
    organism.save(organism.build_pipeline(), path)
    return path


def test_discover_writes_statistics_and_topk_table(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["discover", "--checkpoint", str(checkpoint), "--prompts", "3", "--out", str(out), "--k", "2",
                     "--num-inference-steps", "2", "--batch-size", "2"])
    assert code == 0
    stats = Statistics.load(out / "stats.safetensors")
    assert stats.steps == [0, 1] and len(stats.layers("img")) == 8
    table = json.loads((out / "topk.json").read_text())
    assert len(table["layers"]) == 8 and len(table["layers"][0]["top"]) == 2
    assert len(table["settings"]["prompts"]) == 3
    rows = list(csv.DictReader(open(out / "topk.csv")))
    assert rows[0]["tap"] == "transformer_blocks.0.img"
    assert "single_transformer_blocks.3.img" in capsys.readouterr().out


def test_prompts_from_file_and_literal(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a small red circle at the top on a black background\n\n")
    assert cli.read_prompts([str(f)]) == ["a small red circle at the top on a black background"]
    assert cli.read_prompts(["x", "y"]) == ["x", "y"]
    assert len(cli.read_prompts(["5"])) == 5


def test_k_out_of_range_is_one_clear_error_line(checkpoint, tmp_path, capsys):
    code = cli.main(["discover", "--checkpoint", str(checkpoint), "--prompts", "1", "--out", str(tmp_path),
                     "--k", "0", "--num-inference-steps", "1"])
    assert code == 2
    assert "k=0 is out of range; allowed: 1 <= k <= 128" in capsys.readouterr().err


def test_module_entry_point_shows_help():
    out = subprocess.run([sys.executable, "-m", "mabook.cli", "discover", "--help"], capture_output=True, text=True, check=True)
    assert "--prompts" in out.stdout


def test_bench_probe_prints_ratio_and_memory(checkpoint, capsys):
    from mabook import bench

    code = bench.main(["probe", "--checkpoint", str(checkpoint), "--repeats", "1", "--batch-size", "2", "--num-inference-steps", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "wall-time ratio:" in out and "statistics memory:" in out and "storing every tapped hidden state" in out


def test_bench_subcommand_is_one_registered_function(capsys):
    from mabook import bench

    @bench.subcommand("echo-test", help="test only", arguments=[bench.arg("--word", default="hi")])
    def echo(args):
        print(args.word)
        return 0

    try:
        assert bench.main(["echo-test", "--word", "ok"]) == 0
        assert capsys.readouterr().out.strip() == "ok"
    finally:
        del bench.COMMANDS["echo-test"]


def test_disrupt_writes_table_summary_and_grid(checkpoint, tmp_path, capsys):
    out = tmp_path / "disrupt"
    code = cli.main(["disrupt", "--checkpoint", str(checkpoint), "--prompts", "2", "--out", str(out), "--k", "1", "2",
                     "--n-random", "2", "--num-inference-steps", "2"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert len(rows) == 2 * (1 + 2 * (3 + 2 + 2))  # units x (baseline + k x (top, 2 bottoms, 2 random, 2 energy-matched))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint_sha256"] == organism.sha256(checkpoint)
    assert {r["control"] for r in summary["paired_ratios"]} == {"bottom_abs_mean", "bottom_rms", "random", "energy"}
    from PIL import Image

    assert Image.open(out / "grid.png").size[0] > 0
    assert "top / random" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--k", "500"], "k=500 is out of range; allowed: 1 <= k <= 128"),
    (["--op", "erase"], "unknown --op 'erase'"),
    (["--prompts", ""], "prompt 1 of 1 is empty"),
])
def test_disrupt_bad_input_is_one_line(checkpoint, tmp_path, capsys, argv, message):
    code = cli.main(["disrupt", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--num-inference-steps", "1",
                     *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cluster_writes_masks_and_iou_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "cluster"
    code = cli.main(["cluster", "--checkpoint", str(checkpoint), "--prompts", "3", "--out", str(out), "--tap",
                     "single_transformer_blocks.1.img", "--step", "1", "--k", "2", "--num-inference-steps", "2"])
    assert code == 0
    payload = json.loads((out / "iou.json").read_text())
    assert payload["settings"]["tap"] == "single_transformer_blocks.1.img" and payload["settings"]["step"] == 1
    assert len(payload["channels"]) == 4 and payload["grid"] == [8, 8]
    assert {r["source"] for r in payload["rows"]} == {"rendered", "judged"} and len(payload["rows"]) == 3 * 2
    assert 0 <= payload["summary"]["rendered"]["token_iou"] <= 1
    from PIL import Image

    assert Image.open(out / "masks.png").size[0] > 0 and Image.open(out / "mask_02.png").size == (32, 32)
    assert "IoU vs rendered" in capsys.readouterr().out


def test_cluster_on_prompts_outside_the_world_writes_masks_only(checkpoint, tmp_path, capsys):
    out = tmp_path / "cluster"
    code = cli.main(["cluster", "--checkpoint", str(checkpoint), "--prompts", "red", "blue circle", "--out", str(out),
                     "--num-inference-steps", "2"])
    assert code == 0
    payload = json.loads((out / "iou.json").read_text())
    assert payload["rows"] == [] and payload["summary"] == {} and payload["settings"]["step"] == 1
    assert (out / "mask_01.png").is_file() and "masks only, no IoU" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--k", "1"], "K=1 is out of range; allowed: 2 <= K < 64"),
    (["--tap", "transformer_blocks.9.img"], "unknown tap 'transformer_blocks.9.img'"),
    (["--tap", "transformer_blocks.0.txt"], "spatial maps need an image tap"),
    (["--step", "4"], "step 4 never runs: --num-inference-steps 2 runs steps 0..1"),
    (["--kind", "middle"], "unknown --kind 'middle'"),
])
def test_cluster_bad_input_is_one_line(checkpoint, tmp_path, capsys, argv, message):
    code = cli.main(["cluster", "--checkpoint", str(checkpoint), "--prompts", "1", "--out", str(tmp_path / "x"),
                     "--num-inference-steps", "2", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bench_spatial_prints_capture_kmeans_and_umap_costs(checkpoint, capsys):
    from mabook import bench

    code = bench.main(["spatial", "--checkpoint", str(checkpoint), "--batch-size", "2", "--num-inference-steps", "2",
                       "--umap-points", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "s per image" in out and "K-means + IoU" in out


def test_sinks_writes_sink_tables_summary_and_grid(checkpoint, tmp_path, capsys):
    out = tmp_path / "sinks"
    code = cli.main(["sinks", "--checkpoint", str(checkpoint), "--prompts", "2", "--out", str(out), "--k", "1", "2",
                     "--n-random", "2", "--num-inference-steps", "2"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert len(rows) == 2 * (1 + 2 * (1 + 1 + 2 + 2))  # units x (baseline + k x (sink, bottom, 2 random, 2 mass-matched random))
    assert {r["kind"] for r in csv.DictReader(open(out / "sinks.csv"))} <= {"text", "pad", "image"}
    summary = json.loads((out / "summary.json").read_text())
    assert {r["control"] for r in summary["paired_ratios"]} == {"random", "bottom", "random-mass"}  # the default controls
    assert "sink / random" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--eta", "1.5"], "eta"),
    (["--layer", "transformer_blocks.0.ff"], "has no attention"),
])
def test_sinks_bad_input_is_one_line(checkpoint, tmp_path, capsys, argv, message):
    code = cli.main(["sinks", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--num-inference-steps", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bench_attention_prints_time_and_memory_against_sdpa(capsys):
    from mabook import bench

    code = bench.main(["attention", "--heads", "1", "--image-tokens", "64", "--text-tokens", "8", "--head-dim", "8",
                       "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "x SDPA" in out and all(v in out for v in ("sdpa", "capture", "intervene"))


def test_bench_train_prints_steps_per_second_and_budget(capsys):
    from mabook import bench

    assert bench.main(["train", "--steps", "1", "--threads", "1", "--target-steps", "6000"]) == 0
    out = capsys.readouterr().out
    assert "1 thread(s):" in out and "6000 steps ~" in out and "emergence probe:" in out


def test_transport_writes_strip_and_table(checkpoint, tmp_path, capsys):
    out = tmp_path / "transport"
    code = cli.main(["transport", "--checkpoint", str(checkpoint), "--source", "a large red circle at the top left on a black background",
                     "--target", "a small blue square at the center on a white background", "--alpha", "0", "1",
                     "--k", "4", "--num-inference-steps", "2", "--out", str(out)])
    assert code == 0 and (out / "strip.png").is_file()
    table = json.loads((out / "transport.json").read_text())["table"]
    assert sorted({r["alpha"] for r in table}) == [0.0, 1.0]
    assert "alpha=0" in capsys.readouterr().out


def test_transport_from_a_reference_image_writes_strip_and_table(checkpoint, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from mabook import world

    image = tmp_path / "ref.png"
    Image.fromarray(world.render(world.parse_caption("a large red circle at the top left on a black background")).image).save(image)
    out = tmp_path / "reference"
    code = cli.main(["transport", "--checkpoint", str(checkpoint), "--reference", str(image), "--target",
                     "a small blue square at the center on a white background", "--alpha", "0", "1", "--k", "4",
                     "--baselines", "--num-inference-steps", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "transport.json").read_text())
    assert summary["strip_rows"][:2] == ["reference", "reconstruction"] and "pixel blend alpha=1" in summary["strip_rows"]
    assert sorted(r["alpha"] for r in summary["table"]) == [0.0, 1.0] and summary["table"][0]["pixel_mse"] == 0
    assert 0 <= summary["reconstruction_error"]["mae"] <= 1 and summary["inversion"]["evaluations"] >= 4
    # only the top-4 are recorded (8 image taps x 2 steps x 2 guidance halves x 64 tokens x 4 channels x 4 bytes), not all 128
    assert summary["settings"]["recorded_bytes"] == 8 * 2 * 2 * 64 * 4 * 4
    assert np.asarray(Image.open(out / "strip.png")).shape[1] == (32 + 2) * 4 + 2 * 4
    Image.new("RGB", (40, 32)).save(tmp_path / "wide.png")
    code = cli.main(["transport", "--checkpoint", str(checkpoint), "--reference", str(tmp_path / "wide.png"), "--target", "b",
                     "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "is 40x32 (width x height); allowed: 32x32" in err and len(err.strip().splitlines()) == 1


def test_transport_bad_alpha_is_one_line(checkpoint, tmp_path, capsys):
    code = cli.main(["transport", "--checkpoint", str(checkpoint), "--source", "a", "--target", "b", "--alpha", "1.5",
                     "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "alpha" in err and len(err.strip().splitlines()) == 1


def test_transport_mask_window_and_baselines(checkpoint, tmp_path, capsys):
    out = tmp_path / "masked"
    code = cli.main(["transport", "--checkpoint", str(checkpoint), "--source", "a large red circle at the top left on a black background",
                     "--target", "a small blue square at the center on a white background", "--alpha", "0.5", "1",
                     "--k", "4", "--mask", "union", "--window", "late", "--baselines", "--num-inference-steps", "3",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "transport.json").read_text())
    methods = {(r["method"], r["alpha"]) for r in summary["table"]}
    assert methods == {(m, a) for m in ("transport", "pixel blend", "text embedding blend") for a in (0.5, 1.0)}
    masked = [r for r in summary["table"] if r["method"] == "transport"]
    assert all(0 < r["masked_tokens"] < 64 for r in masked) and not summary["settings"]["conditioning"]
    assert summary["strip_rows"][-1] == "text embedding blend alpha=1"


def test_transport_all_channels_at_alpha_one_is_the_source(checkpoint, tmp_path, capsys):
    """--k 0 moves every channel and the AdaLN conditioning: the image is the source's, as the
    text-embedding blend at alpha = 1 (the source's own embeddings) is."""
    out = tmp_path / "all"
    code = cli.main(["transport", "--checkpoint", str(checkpoint), "--source", "a large red circle at the top left on a black background",
                     "--target", "a small blue square at the center on a white background", "--alpha", "1", "--k", "0",
                     "--baselines", "--num-inference-steps", "2", "--out", str(out)])
    assert code == 0
    table = json.loads((out / "transport.json").read_text())["table"]
    by = {r["method"]: r["pixel_mse"] for r in table}
    assert by["transport"] == by["text embedding blend"] == by["pixel blend"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--mask", "all"], "invalid choice: 'all'"),
    (["--mask-step", "9"], "--mask-step 9 is out of range; allowed: 0 <= step < 2"),
    (["--mask-channels", "0"], "--mask-channels must be >= 1, got 0"),
    (["--mask", "union", "--stream", "txt"], "--mask union selects image tokens; allowed with --stream img or both"),
])
def test_transport_bad_mask_arguments_are_one_line(checkpoint, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if argv == ["--mask", "all"] else contextlib.nullcontext():
        code = cli.main(["transport", "--checkpoint", str(checkpoint), "--source", "a", "--target", "b",
                         "--num-inference-steps", "2", "--out", str(tmp_path / "x"), *argv])
        assert code == 2
    assert message in capsys.readouterr().err


def test_bench_transport_prints_flux_arithmetic_and_measured_bytes(checkpoint, capsys):
    from mabook import bench

    code = bench.main(["transport", "--checkpoint", str(checkpoint), "--batch-size", "1", "--num-inference-steps", "2",
                       "--k", "1", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "FLUX-1024" in out and "match" in out and "MISMATCH" not in out


# -- real-model families with the verbs' default (shapes-world) prompts --------------------------------------------------

_VERBS = {
    "disrupt": ["disrupt", "--k", "1", "--n-random", "1", "--kinds", "top", "random"],
    "cluster": ["cluster"],
    "sinks": ["sinks", "--k", "1", "--n-random", "1"],
    "transport": ["transport", "--source", "a red circle", "--target", "a blue square", "--k", "2", "--alpha", "0", "1"],
    "discover": ["discover", "--k", "2"],
    "transport --reference": ["transport", "--reference", "{reference}", "--resize", "--target", "a blue square", "--k", "2",
                              "--alpha", "0", "1"],
}


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """family -> directory of a tiny random-weight pipeline saved with save_pretrained (as a hub model)."""
    from test_models import built

    out = {}
    for family in ("flux", "sd3", "pixart", "sana"):
        pipe, _ = built(family)
        if family == "sana":  # 32 px (SANA needs a multiple of 32) through a 2x DC-AE: sample_size 16 latent pixels
            pipe.transformer.register_to_config(sample_size=16)
        out[family] = tmp_path_factory.mktemp(family)
        pipe.save_pretrained(out[family])
    return out


@pytest.mark.parametrize("verb", list(_VERBS))
@pytest.mark.parametrize("family", ["flux", "sd3", "pixart", "sana"])
def test_every_verb_runs_on_a_real_family_with_world_prompts_and_never_judges(family, verb, tiny_pipelines, tmp_path,
                                                                             monkeypatch, capsys):
    """World captions on a real model used to crash disrupt/sinks/transport after generating ("image
    must be 32x32") and FLUX cluster: the shapes-world judge scored a real model's images because
    the prompts parsed. The judge applies to the organism's images only (`judge.applies`)."""
    load = cli.load_model

    def small(*args):  # a real model's default resolution, shrunk so the test runs in seconds
        pipe, adapter = load(*args)
        if family == "flux":  # FluxPipeline fixes 128 latent pixels; the others follow the tiny transformer's sample_size
            pipe.default_sample_size = 8
        return pipe, adapter

    monkeypatch.setattr(cli, "load_model", small)
    if family in ("pixart", "sana"):  # their resolution binning knows real sample sizes only (tiny: 8)
        import functools

        from diffusers import PixArtSigmaPipeline, SanaPipeline

        cls = {"pixart": PixArtSigmaPipeline, "sana": SanaPipeline}[family]
        size = {"sana": dict(height=32, width=32)}.get(family, {})  # SANA's call defaults to 1024 px, not sample_size
        monkeypatch.setattr(cls, "__call__", functools.partialmethod(cls.__call__, use_resolution_binning=False, **size))
    out = tmp_path / "out"
    reference = tmp_path / "reference.png"  # a picture to transport from: any RGB image, resized to the generation
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(reference)
    argv = [a.format(reference=reference) for a in _VERBS[verb]]
    argv += ["--model", str(tiny_pipelines[family]), "--num-inference-steps", "2", "--out", str(out)]
    if not verb.startswith("transport"):
        argv += ["--prompts", "2"]  # an integer N: N held-out shapes-world captions, as the default 8
    code = cli.main(argv)
    err = capsys.readouterr().err
    if family == "sana" and verb == "sinks":  # linear attention: no softmax mass to find sinks in
        (line,) = [x for x in err.splitlines() if "error" in x]
        assert code == cli.EXIT_BAD_INPUT and line.startswith("mabook sinks: error:") and "softmax" in line
        return
    assert code == 0, err
    if verb == "transport --reference":  # the default trajectory is the family's: PixArt (DDPM, no flow) is noised
        made = json.loads((out / "transport.json").read_text())["trajectory"]
        assert made["asked"] == "auto" and made["method"] == ("noise" if family == "pixart" else "invert")
        assert made["sampler"], made
        if family == "pixart":  # asked to invert, it refuses in one line naming the way out
            code = cli.main(argv + ["--trajectory", "invert"])
            (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
            assert code == cli.EXIT_BAD_INPUT and line.startswith("mabook transport: error:") and family in line
            assert "--trajectory noise" in line
    judged_columns = {"cleanliness", "color", "shape", "all_correct", "took_source_color"}
    for table in out.glob("*.csv"):
        header = set(next(csv.reader(open(table))))
        assert not header & judged_columns, (table.name, header & judged_columns)
    if verb == "cluster":
        assert json.loads((out / "iou.json").read_text())["summary"] == {}  # masks only: no IoU against a world rendering
    written = list(out.glob("*.json")) + list(out.glob("*.csv"))
    assert written, f"{verb} wrote nothing into {out}"
    for f in out.glob("*.json"):  # strict JSON: no bare NaN / Infinity
        json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"{f.name} holds a bare {c}"))
    for table in out.glob("*.csv"):  # every number a table holds is finite
        for row in csv.DictReader(open(table)):
            for key, value in row.items():
                try:
                    x = float(value)
                except (TypeError, ValueError):
                    continue
                assert math.isfinite(x) or key.endswith("_ci") or "ci" in key, (table.name, key, value)


def test_results_files_a_real_models_run_for_the_scorecard(tiny_pipelines, tmp_path, monkeypatch, capsys):
    """--results copies the verb's summary JSON to results/real/<model>/<verb>.json (model id and verb
    added), the scorecard page lists it; on the organism it is refused in one line before any work."""
    from mabook import files, scorecard

    load = cli.load_model

    def small(*args):
        pipe, adapter = load(*args)
        pipe.default_sample_size = 8
        return pipe, adapter

    monkeypatch.setattr(cli, "load_model", small)
    monkeypatch.setattr(files, "REAL_RESULTS", tmp_path / "real")
    out = tmp_path / "out"
    model = str(tiny_pipelines["flux"])
    assert cli.main(["discover", "--k", "2", "--model", model, "--num-inference-steps", "2", "--prompts", "2",
                     "--out", str(out), "--results"]) == 0
    filed = tmp_path / "real" / Path(model).name / "discover.json"
    assert f"filed as {filed}" in capsys.readouterr().out
    summary, copy = json.loads((out / "topk.json").read_text()), json.loads(filed.read_text())
    assert copy == {"model": model, "verb": "discover", **summary}
    table = scorecard.real_runs_markdown(tmp_path / "real")
    assert f"| `{model}` | discover | `real/{Path(model).name}/discover.json` |" in table
    assert files.real_result_path("black-forest-labs/FLUX.1-dev", "sinks", tmp_path).parts[-2:] == (
        "black-forest-labs--FLUX.1-dev", "sinks.json")
    assert scorecard.real_runs_markdown(tmp_path / "none").startswith("No run on a real model is filed yet.")
    code = cli.main(["discover", "--out", str(tmp_path / "o"), "--results"])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert code == cli.EXIT_BAD_INPUT and line.startswith("mabook discover: error: --results files a real model's run")
    assert not (tmp_path / "o").exists()
