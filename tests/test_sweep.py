"""mabook.sweep: experiments split over accelerate's processes merge to the single-process result,
bit for bit; a sweep stopped mid-way resumes from its shards; bad input is one clear line.

The two-process tests run `accelerate launch --multi_gpu --num_processes 2 -m mabook sweep ...
--device cpu`: two CPU processes in a gloo group (accelerate 1.15's `--cpu` launcher starts only
one process without mpirun; `--multi_gpu` is its torchrun launcher, and `--device cpu` makes the
processes join a gloo group instead of NCCL). The reference is the single-process library code
(`discovery.collect_statistics`, `disruption.baseline` + `run`, `sinks.run`) in this process.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mabook import cli, discovery, disruption, sinks, sweep, world
from mabook.experiments import discover, disrupt
from mabook.experiments import sinks as sinks_verb
from mabook.statistics import STATISTICS, Statistics

torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): the same kernels, the same bits

STEPS = 2
DISCOVER_PROMPTS = world.heldout_captions(5, n_objects=1, seed=0)  # batches of 2: [2, 2, 1], split 2 / 1
UNITS_PROMPTS, UNITS_SEEDS, UNITS_BATCH = world.heldout_captions(3, n_objects=1, seed=0), [0, 1], 4  # 6 units: [4, 2]
SELECTION = world.heldout_captions(5, n_objects=1, seed=0)[3:]  # held out: 2 prompts x 2 seeds choose the channel sets


@pytest.fixture(scope="module")
def organism(trained_organism):
    return trained_organism[1]


@pytest.fixture(scope="module")
def reference_base(organism):
    return disruption.baseline(organism, UNITS_PROMPTS, UNITS_SEEDS, STEPS, UNITS_BATCH)


def _env(tmp_path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf-home")}  # no user accelerate config is read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of `mabook sweep` on 2 CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "mabook", "sweep", *args, "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path))


def assert_same_statistics(a: Statistics, b: Statistics) -> None:
    """Bit for bit: every statistic at every (tap, step) and pooled over steps, counts, timesteps."""
    assert [str(t) for t in a.taps] == [str(t) for t in b.taps]
    assert a.steps == b.steps and a.timesteps == b.timesteps
    for tap in a.taps:
        for step in [*a.steps, None]:
            for name in STATISTICS:
                assert torch.equal(a.get(name, tap, step), b.get(name, tap, step)), (name, str(tap), step)
            if step is not None:
                assert a.counts(tap, step) == b.counts(tap, step)


def _json(x):
    return json.loads(json.dumps(x))


def test_discover_on_two_processes_equals_one_process(organism, tmp_path):
    out = tmp_path / "discover"
    done = _launch(tmp_path, "discover", "--prompts", *DISCOVER_PROMPTS, "--num-inference-steps", str(STEPS),
                   "--batch-size", "2", "--k", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 shards (0 reused, 3 computed) on 2 process(es)" in done.stdout
    reference = discovery.collect_statistics(organism, DISCOVER_PROMPTS, STEPS, 0, 2)
    merged = Statistics.load(out / "stats.safetensors")
    assert_same_statistics(merged, reference)
    rows = discovery.table(discovery.massive_channels(reference, 2, stream="img", seed=0))
    assert json.loads((out / "topk.json").read_text())["layers"] == _json(rows)


def test_disrupt_stopped_on_one_process_resumes_on_two_and_equals_the_one_process_table(organism, reference_base,
                                                                                          tmp_path):
    out = tmp_path / "disrupt"
    # 1. killed mid-way, on one process: 2 baseline shards and the selection set's baseline shard written
    #    (of 2 + 1 + 4 x 2)
    with pytest.raises(sweep.Stopped, match="stopped after 3 shard"):
        sweep.run(disrupt.Config(prompts=UNITS_PROMPTS, seeds=UNITS_SEEDS, num_inference_steps=STEPS, batch_size=UNITS_BATCH,
                                 k=[1, 2], kinds=["top", "random"], n_random=1, selection_prompts=SELECTION),
                  organism, out / "shards", stop_after=3)
    assert len(list((out / "shards").glob("*.safetensors"))) == 3 + 1  # and the merged baseline statistics
    # 2. the command on two processes: shards are named by content, not by process, so they are reused
    done = _launch(tmp_path, "disrupt", "--prompts", *UNITS_PROMPTS, "--seeds", *map(str, UNITS_SEEDS),
                   "--num-inference-steps", str(STEPS), "--batch-size", str(UNITS_BATCH), "--k", "1", "2",
                   "--kinds", "top", "random", "--n-random", "1", "--selection-prompts", *SELECTION, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary["sweep"][k] for k in ("processes", "shards", "reused", "computed")} == \
        {"processes": 2, "shards": 2 + 1 + 4 * 2, "reused": 3, "computed": 8}
    assert summary["selection"] == {"prompts": SELECTION, "seeds": UNITS_SEEDS}
    # 3. the merged table, its CIs and the baselines' statistics equal the single process's, bit for bit
    selection = disruption.selection_statistics(organism, SELECTION, UNITS_SEEDS, STEPS, UNITS_BATCH)
    assert_same_statistics(Statistics.load(out / "selection_stats.safetensors"), selection)
    selected = disruption.Baseline(**{**vars(reference_base), "selection": selection})
    conds = disruption.conditions(selected, [1, 2], ["top", "random"], 1, "zero")
    reference = disruption.run(selected, conds, UNITS_BATCH).table
    assert summary["table"] == _json(reference)
    assert summary["summary"] == _json(disruption.summary(reference))
    assert summary["paired_ratios"] == _json(disruption.paired_ratios(reference)) != []
    assert_same_statistics(Statistics.load(out / "baseline_stats.safetensors"), reference_base.stats)
    assert (out / "grid.png").is_file() and (out / "table.csv").is_file()


def test_sinks_sweep_equals_attention_run(organism, reference_base, tmp_path):
    result = sweep.run(sinks_verb.Config(prompts=UNITS_PROMPTS, seeds=UNITS_SEEDS, num_inference_steps=STEPS,
                                         batch_size=UNITS_BATCH, k=[1], n_random=1), organism, tmp_path / "shards")
    ivs = [sinks.intervention(keys, 1) for keys in ("sink", "bottom", "random", "random-mass")]  # the default controls
    reference = sinks.run(reference_base, ivs, UNITS_BATCH)
    assert _json(result.table) == _json(reference.table)
    assert result.counts.total == 2 + 4 * 2
    for name, images in reference.images.items():  # the grid's images, too
        assert np.array_equal(result.images[name], images), name
    assert np.array_equal(result.base.images, reference_base.images)
    assert np.array_equal(result.base.token_means, reference_base.token_means)
    # the command finds every shard (same content, same names) and writes the verb's files from them
    out = tmp_path / "out"
    assert cli.main(["sweep", "sinks", "--prompts", *UNITS_PROMPTS, "--seeds", *map(str, UNITS_SEEDS), "--k", "1",
                     "--n-random", "1", "--num-inference-steps", str(STEPS), "--batch-size", str(UNITS_BATCH),
                     "--shards", str(tmp_path / "shards"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["sweep"]["reused"], summary["sweep"]["computed"]) == (10, 0)
    assert summary["table"] == _json(reference.table)
    assert summary["paired_ratios"] == _json(sinks.paired_ratios(reference.table)) != []
    assert (out / "grid.png").is_file()


def test_a_stopped_sweep_resumes_and_equals_an_uninterrupted_one(organism, tmp_path, capsys):
    shards = tmp_path / "shards"
    config = discover.Config(prompts=DISCOVER_PROMPTS, num_inference_steps=STEPS, batch_size=2, k=2)
    args = ["sweep", "discover", "--prompts", *DISCOVER_PROMPTS, "--num-inference-steps", str(STEPS), "--batch-size", "2",
            "--k", "2", "--shards", str(shards), "--out", str(tmp_path / "out"), "--stop-after", "2"]
    assert cli.main(args) == sweep.EXIT_STOPPED
    assert "stopped after 2 shard(s) (--stop-after); run the same command again to resume" in capsys.readouterr().err
    assert len(list(shards.glob("discover-*.safetensors"))) == 2
    leftover = shards / ".discover-0123.safetensors.abc.tmp"  # what a kill during a write leaves
    leftover.write_bytes(b"half a shard")
    resumed = sweep.run(config, organism, shards)
    assert (resumed.counts.reused, resumed.counts.computed) == (2, 1) and not leftover.exists()
    assert_same_statistics(resumed.stats, discovery.collect_statistics(organism, DISCOVER_PROMPTS, STEPS, 0, 2))
    # named by content: the same settings find every shard; another setting finds none
    again = sweep.run(config, organism, shards)
    assert (again.counts.reused, again.counts.computed) == (3, 0)
    other = sweep.run(config.replace(cfg="both"), organism, shards)
    assert (other.counts.reused, other.counts.computed) == (0, 3)


def test_shard_names_hash_the_spec_and_a_mismatched_shard_is_refused(tmp_path):
    spec = {"phase": "discover", "prompts": ["a"], "generator_seed": 0}
    name = sweep.shard_name(spec)
    assert name.startswith("discover-") and name == sweep.shard_name(dict(reversed(list(spec.items()))))
    assert sweep.shard_name({**spec, "generator_seed": 1}) != name
    sweep.write_shard(tmp_path / name, spec, {"x": torch.arange(3)}, {"rows": [{"v": float("nan")}]})
    payload, tensors = sweep.read_shard(tmp_path / name, spec)
    assert np.isnan(payload["rows"][0]["v"]) and torch.equal(tensors["x"], torch.arange(3))
    with pytest.raises(ValueError, match="another computation than its name says"):
        sweep.read_shard(tmp_path / name, {**spec, "generator_seed": 1})
    (tmp_path / name).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable .*delete it"):
        sweep.read_shard(tmp_path / name, spec)


def test_bad_experiment_and_shard_directory_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["sweep", "discvoer", "--out", str(tmp_path / "o")]) == 2
    assert "unknown experiment 'discvoer'; allowed: ['discover', 'disrupt', 'sinks']" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["sweep", "discover", "--out", str(tmp_path / "o"), "--shards", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"shard directory '{a_file}' is an existing file; allowed: a directory" in err
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["sweep", "disrupt", "--out", str(tmp_path / "o"), "--shards", str(foreign)]) == 2
    assert "holds 1 file(s) that are not sweep shards (e.g. ['notes.txt']); allowed: a new or empty" in capsys.readouterr().err


def test_python_dash_m_mabook_is_the_command():
    done = subprocess.run([sys.executable, "-m", "mabook", "sweep", "--help"], capture_output=True, text=True, check=True)
    assert "discover, disrupt, sinks" in done.stdout and "--shards" in done.stdout
