"""Benchmarks: `python -m mabook.bench probe` (and further subcommands, one function each).

`probe` generates the same images with and without the probe attached (every tap, every step),
interleaving the two (A B B A ...) so that drift in machine load hits both equally, and prints the
wall-time ratio plus, measured in the same run, the bytes held by the statistics versus the bytes
that storing every tapped hidden state would have taken.

Adding a subcommand: write one function decorated with `@subcommand(name, help, arguments)`; it
receives the parsed `argparse.Namespace` and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics as pystats
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

# Each subcommand imports torch and mabook's modules in its own body (deferred): `python -m mabook.bench --help`
# and a bad option answer at once, without loading torch (~2 s) or diffusers (~6-15 s).

COMMANDS: dict[str, tuple[str, list[tuple[tuple, dict]], Callable[[argparse.Namespace], int]]] = {}


def arg(*flags, **kwargs) -> tuple[tuple, dict]:
    """One argparse argument, declared as data: arg("--repeats", type=int, default=5)."""
    return flags, kwargs


def subcommand(name: str, help: str, arguments: list[tuple[tuple, dict]] = ()):
    """Register a benchmark subcommand."""

    def register(fn):
        COMMANDS[name] = (help, list(arguments), fn)
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# probe: overhead of collecting statistics at every tap and step
# ---------------------------------------------------------------------------------------------


def _organism(checkpoint, device):
    """The trained organism if its checkpoint exists, else a random build (timings are the same)."""
    import torch  # deferred: see the note above COMMANDS

    import mabook
    from mabook import organism

    path = checkpoint or organism.CHECKPOINT
    try:
        pipe, adapter = mabook.load("organism", device=device, path=path)
        return pipe, adapter, str(path)
    except FileNotFoundError:
        torch.manual_seed(0)
        pipe = organism.build_pipeline().to(device)
        return pipe, mabook.adapter_for(pipe), "random weights (no checkpoint found)"


def _organism_arguments(batch_size: int = 16, num_inference_steps: int = 20, repeats: bool = True) -> list:
    """The arguments every organism-generating benchmark shares."""
    out = [arg("--checkpoint", default=None, help="organism checkpoint (default: the committed one, else random weights)"),
           arg("--batch-size", type=int, default=batch_size),
           arg("--num-inference-steps", type=int, default=num_inference_steps)]
    if repeats:
        out.append(arg("--repeats", type=int, default=9, help="timed pairs (plus one untimed warm-up pair)"))
    return out + [arg("--device", default="cpu"), _threads_argument()]


def _threads_argument():
    return arg("--threads", type=int, default=None,
               help="torch CPU threads (default: torch's own); 1 on a machine whose cores other processes load, where "
                    "threads waiting for each other make every small op slow")


def _set_threads(threads: int | None) -> None:
    import torch  # deferred: see the note above COMMANDS

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _loaded(args: argparse.Namespace):
    """(pipe, adapter, source) for the shared arguments, checked; progress bars off."""
    for name in ("batch_size", "num_inference_steps", "repeats"):
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _set_threads(getattr(args, "threads", None))
    pipe, adapter, source = _organism(args.checkpoint, args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter, source


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def interleaved(timed: Callable, repeats: int, device: str = "cpu"):
    """Time `timed(False)` (plain) and `timed(True)` (treated) in pairs A B, B A, A B, ... so that
    drift in machine load hits both alike. Returns (plain, treated) lists of (wall, cpu) seconds and
    the treated calls' results."""
    import torch  # deferred: see the note above COMMANDS

    def clock(treated: bool):
        if device != "cpu":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = timed(treated)
        if device != "cpu":
            torch.cuda.synchronize()
        return (time.perf_counter() - start, time.process_time() - cpu_start), result

    plain, treated, results = [], [], []
    for r in range(repeats):
        for flag in ((False, True) if r % 2 == 0 else (True, False)):
            seconds, result = clock(flag)
            (treated if flag else plain).append(seconds)
            if flag:
                results.append(result)
    return plain, treated, results


def _report(label: str, plain, treated, target: float = 1.10) -> None:
    wall_plain, wall_treated = [w for w, _ in plain], [w for w, _ in treated]
    ratio = pystats.median(wall_treated) / pystats.median(wall_plain)
    pairs = [p / q for p, q in zip(wall_treated, wall_plain)]
    cpu = pystats.median([c for _, c in treated]) / pystats.median([c for _, c in plain])
    print(f"without {label}: median {pystats.median(wall_plain):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in wall_plain)})")
    print(f"with {label}:    median {pystats.median(wall_treated):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in wall_treated)})")
    print(f"wall-time ratio: {ratio:.3f}x (ratio of medians; per-pair {min(pairs):.3f}-{max(pairs):.3f}; target <= {target:.2f}x)")
    print(f"CPU-time ratio:  {cpu:.3f}x (process CPU time, robust to other load on the machine)")


@subcommand(
    "probe",
    help="wall-time and memory overhead of probe.collect on the organism",
    arguments=_organism_arguments(),
)
def probe(args: argparse.Namespace) -> int:
    import torch  # deferred: see the note above COMMANDS

    from mabook import probe as probe_mod
    from mabook import world

    pipe, adapter, source = _loaded(args)
    prompts = [s.caption for s in world.sample(args.batch_size, seed=0)]

    def generate():
        generator = torch.Generator(args.device).manual_seed(0)
        return pipe(prompts, num_inference_steps=args.num_inference_steps, generator=generator, output_type="pt").images

    def timed(with_probe: bool):
        if with_probe:
            with probe_mod.collect(adapter) as run:
                return generate(), run
        return generate(), None

    # 1. warm-up pair (allocator, kernels), and a check that probing leaves the images unchanged
    (plain_images, _), (probed_images, run) = timed(False), timed(True)
    if not torch.equal(plain_images, probed_images):
        raise RuntimeError("the probe changed the generated images")
    # 2. interleaved repeats
    plain, probed, results = interleaved(timed, args.repeats, args.device)
    run = results[-1][1]
    taps = len(run.stats.taps)
    print(f"model: organism ({source}); {args.device}, {torch.get_num_threads()} thread(s); {args.batch_size} images x "
          f"{args.num_inference_steps} steps; {taps} taps x {len(run.stats.steps)} steps, every tap and step probed")
    _report("probe", plain, probed, target=1.03)
    print(f"statistics memory: {_mb(run.stats.nbytes)} (5 x channels float64 per (step, tap); "
          f"does not depend on tokens or batch)")
    print(f"storing every tapped hidden state instead: {_mb(run.observed_bytes)} "
          f"({run.observed_bytes / run.stats.nbytes:.0f}x; grows with batch x tokens)")
    return 0


# ---------------------------------------------------------------------------------------------
# edit: overhead of probe.edit at every image tap and step (what chapter 2's runner does)
# ---------------------------------------------------------------------------------------------


@subcommand(
    "edit",
    help="wall-time overhead of probe.edit (top-k zeroed at every image tap and step) on the organism",
    arguments=_organism_arguments() + [arg("--k", type=int, default=4),
                                       arg("--op", default="zero", choices=["zero", "mean", "set", "scale"])],
)
def edit(args: argparse.Namespace) -> int:
    import torch  # deferred: see the note above COMMANDS

    from mabook import probe as probe_mod
    from mabook import world

    pipe, adapter, source = _loaded(args)
    prompts = [s.caption for s in world.sample(args.batch_size, seed=0)]
    channels = list(range(args.k))  # which channels does not change the cost
    value = 0.5 if args.op in ("set", "scale") else None
    edits = [probe_mod.Edit(t, channels, args.op, value=value) for t in probe_mod.taps(adapter, ["img"])]

    def timed(with_edit: bool):
        generator = torch.Generator(args.device).manual_seed(0)
        call = lambda: pipe(prompts, num_inference_steps=args.num_inference_steps, generator=generator, output_type="pt")
        if with_edit:
            with probe_mod.edit(adapter, edits):
                return call().images
        return call().images

    timed(False), timed(True)  # warm-up pair
    plain, edited, _ = interleaved(timed, args.repeats, args.device)
    print(f"model: organism ({source}); {args.device}; {args.batch_size} images x {args.num_inference_steps} steps; "
          f"{args.op} on {args.k} channels at {len(edits)} image taps, every step")
    _report("edits", plain, edited)
    return 0


# ---------------------------------------------------------------------------------------------
# book: per-notebook execution time of one forced book build (target: whole book <= 10 min on 2 cores)
# ---------------------------------------------------------------------------------------------


@subcommand("book", "build the book once (every notebook executed) and print seconds per notebook",
            [arg("--budget", type=float, default=600.0, help="seconds the whole build may take")])
def book(args: argparse.Namespace) -> int:
    from mabook.book import bench_book  # deferred: see the note above COMMANDS

    times = bench_book()
    total = times.pop("book build")
    for name, seconds in sorted(times.items()):
        print(f"{name:45s} {seconds:7.1f} s")
    print(f"{'whole book build':45s} {total:7.1f} s  ({total / args.budget:.2f}x of the {args.budget:.0f} s budget)")
    return 0 if total <= args.budget else 1


# ---------------------------------------------------------------------------------------------
# train: steps per second of the default training config, on 1 and 2 threads
# ---------------------------------------------------------------------------------------------


@subcommand(
    "train",
    help="training steps/s of the organism's default config on 1 and 2 CPU threads (to budget a long run)",
    arguments=[
        arg("--steps", type=int, default=20, help="timed steps per thread count (after 3 untimed warm-up steps)"),
        arg("--threads", type=int, nargs="+", default=[1, 2]),
        arg("--target-steps", type=int, default=None, help="steps of the run to budget (default: TrainConfig.steps)"),
    ],
)
def train(args: argparse.Namespace) -> int:

    from mabook import train as trainer  # deferred: see the note above COMMANDS

    if args.steps < 1 or any(t < 1 for t in args.threads):
        raise ValueError(f"--steps and --threads must be >= 1, got {args.steps} and {args.threads}")
    default = trainer.TrainConfig()
    target = args.target_steps or default.steps
    probe_cost = None
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            # the measured steps include the emergence probe at its default rate, as in a real run
            cfg = replace(default, steps=3 + args.steps, threads=threads, save_at=(), log_every=10**9,
                          probe_every=default.probe_every)
            state = Path(tmp) / f"state{threads}"
            trainer.train(replace(cfg), Path(tmp) / "o.safetensors", verbose=False, state_dir=state, stop_after=3)
            start = time.perf_counter()
            trainer.train(cfg, Path(tmp) / "o.safetensors", verbose=False, state_dir=state)
            seconds = (time.perf_counter() - start) / args.steps
            if probe_cost is None:
                pipe = trainer.build_pipeline()
                batch = trainer.ProbeBatch.make(pipe.organism_config)
                t0 = time.perf_counter()
                trainer.measure_emergence(pipe, batch, default.probe_k)
                probe_cost = time.perf_counter() - t0
            print(f"{threads} thread(s): {1 / seconds:.2f} steps/s ({seconds:.2f} s/step, batch {default.batch_size}); "
                  f"{target} steps ~ {target * seconds / 60:.0f} min")
    print(f"emergence probe: {probe_cost:.2f} s per measurement (raw + EMA: x2), every {default.probe_every} steps "
          f"= {2 * probe_cost / default.probe_every / seconds:.1%} of training time")
    return 0


# ---------------------------------------------------------------------------------------------
# spatial: chapter 3's costs -- capture + K-means per image, and UMAP's first (numba-compiling) call
# ---------------------------------------------------------------------------------------------


@subcommand(
    "spatial",
    help="seconds per image of capture + K-means (chapter 3), and UMAP's first vs second call",
    arguments=_organism_arguments(12, 10, repeats=False) + [
        arg("--k", type=int, default=4, help="top-k channels clustered"),
        arg("--umap-points", type=int, default=768, help="tokens embedded by UMAP (0: skip UMAP)"),
    ],
)
def spatial(args: argparse.Namespace) -> int:

    from mabook import linear_probes, world  # deferred: see the note above COMMANDS
    from mabook import spatial as spatial_mod

    if args.umap_points < 0:
        raise ValueError(f"--umap-points must be >= 0, got {args.umap_points}")
    pipe, adapter, source = _loaded(args)
    prompts = world.heldout_captions(args.batch_size, n_objects=1, seed=0)
    # 1. capture every image tap at every step (what chapter 3's sweep keeps)
    start = time.perf_counter()
    cap = spatial_mod.capture(adapter, prompts, num_inference_steps=args.num_inference_steps, batch_size=args.batch_size)
    capture_s = time.perf_counter() - start
    # 2. K-means (K=2) on the top-k at every tap and step, plus scoring against the rendered masks
    sets = spatial_mod.channel_sets(cap.stats, args.k, ["top"])
    start = time.perf_counter()
    rows = spatial_mod.measure(cap, sets, n_clusters=2, sources=("rendered",), thresholds=(), chance=False)
    kmeans_s = time.perf_counter() - start
    pairs = len(cap.taps) * len(cap.steps)
    print(f"model: organism ({source}); {args.device}; {len(prompts)} images x {args.num_inference_steps} steps; "
          f"{pairs} (tap, step) pairs captured")
    print(f"capture (generation + hidden states): {capture_s / len(prompts):.3f} s per image ({capture_s:.2f} s)")
    print(f"K-means + IoU, top-{args.k}, K=2:       {kmeans_s / len(rows) * 1e3:.2f} ms per (image, tap, step); "
          f"{kmeans_s / len(prompts):.3f} s per image over all pairs")
    # 3. UMAP: the first call in a process compiles numba kernels
    if args.umap_points:
        x = np.concatenate([cap.features(t, s, sets[f"top-{args.k}"]["channels"][t]).reshape(-1, args.k)
                            for t in cap.taps for s in cap.steps])[: args.umap_points]
        start = time.perf_counter()
        import umap  # noqa: F401  (import cost, separate from the first call)

        import_s = time.perf_counter() - start
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            linear_probes.embed(x, n_neighbors=10, n_epochs=100)
            seconds.append(time.perf_counter() - start)
        print(f"UMAP on {len(x)} tokens: import {import_s:.2f} s, first call {seconds[0]:.2f} s, second call "
              f"{seconds[1]:.2f} s (first-call compile cost {seconds[0] - seconds[1]:.2f} s)")
    return 0


# ---------------------------------------------------------------------------------------------
# attention: capturing / intervening attention vs SDPA at FLUX-1024² shapes (chapter 6)
# ---------------------------------------------------------------------------------------------


@subcommand("attention", "time and peak memory of capturing / intervening attention vs SDPA at FLUX-1024^2 shapes",
            [arg("--heads", type=int, default=None, help="default: 24 on CUDA, 4 on CPU (24 takes minutes per variant on one thread)"),
             arg("--image-tokens", type=int, default=4096), arg("--text-tokens", type=int, default=512),
             arg("--head-dim", type=int, default=128),
             arg("--repeats", type=int, default=3, help="timed rounds, every variant once per round, after one warm-up round"),
             arg("--chunk-elements", type=int, default=None),
             arg("--eta", type=float, default=0.0, help="the intervention's eta (0 < eta < 1 also scores the text queries: "
                                                          "each query's logsumexp)"),
             arg("--dose", default="redistribute", choices=["redistribute", "renormalise"]),
             arg("--dtype", default="float32", choices=["float32", "bfloat16", "float16"]),
             arg("--device", default="cpu"), _threads_argument()])
def attention_bench(args: argparse.Namespace) -> int:

    import torch  # deferred: see the note above COMMANDS

    from mabook import bench_attention, softmax

    _set_threads(args.threads)
    heads = args.heads or (24 if args.device != "cpu" else 4)
    chunk = args.chunk_elements or softmax.CHUNK_ELEMENTS
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 <= args.eta <= 1:
        raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    print(f"random q, k, v: 1 x {heads} heads x ({args.text_tokens} text + {args.image_tokens} image) tokens x "
          f"{args.head_dim}, {args.dtype}; chunk {chunk} score elements; {args.device}, {torch.get_num_threads()} thread(s); "
          f"intervention: top-1 sink, score path, eta={args.eta:g} ({args.dose})"
          + ("" if heads == 24 else " (FLUX.1 has 24 heads: time scales ~linearly with heads, memory too)"))
    shape = (heads, args.image_tokens, args.text_tokens, args.head_dim, args.device)
    times = bench_attention.times(*shape, args.repeats, chunk, args.eta, args.dose, args.dtype)
    memory = {}
    for variant in bench_attention.VARIANTS:
        # peak memory in a fresh process per variant: peak RSS only grows within a process
        code = (f"import json, torch; torch.set_num_threads({torch.get_num_threads()}); "
                f"from mabook.bench_attention import peak_memory as f; "
                f"print(json.dumps(f({variant!r}, {heads}, {args.image_tokens}, {args.text_tokens}, {args.head_dim}, "
                f"{args.device!r}, 1, {chunk}, {args.eta!r}, {args.dose!r}, {args.dtype!r})))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        memory[variant] = json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]
    sdpa = pystats.median(times["sdpa"])
    scores = heads * (args.image_tokens + args.text_tokens) ** 2 * 4
    targets = {"capture": 2.0, "intervene": 2.5}
    print(f"{'variant':10s} {'median':>9s} {'x SDPA':>7s} {'target':>7s} {'runs':>28s} {'peak extra memory':>18s}")
    for name in bench_attention.VARIANTS:
        t = pystats.median(times[name])
        target = f"<= {targets[name]:.1f}" if name in targets else ""
        runs = ", ".join(f"{x:.2f}" for x in times[name])
        peak = "n/a" if memory[name] is None else f"{memory[name] / 2**20:.1f} MiB"
        print(f"{name:10s} {t:8.3f}s {t / sdpa:7.2f} {target:>7s} {runs:>28s} {peak:>18s}")
    print(f"(ratios of medians over {args.repeats} interleaved round(s) in one process; 'explicit' is the intervention through "
          f"the explicit chunked softmax; materialising every probability would take {scores / 2**20:.0f} MiB in float32)")
    return 0


# ---------------------------------------------------------------------------------------------
# transport: what a record of the source's channels costs (chapters 4-5)
# ---------------------------------------------------------------------------------------------

FLUX_1024 = {"blocks": 57, "image_tokens": 4096, "steps": 28, "width": 3072, "bytes": 2}  # bf16, 1024x1024


@subcommand("transport", "bytes a transport record holds: FLUX-1024² arithmetic + a measured organism run",
            _organism_arguments(batch_size=4, num_inference_steps=20, repeats=False)
            + [arg("--k", type=int, nargs="+", default=[1, 4, 16])])
def transport_bench(args: argparse.Namespace) -> int:
    from mabook import probe, record_memory  # deferred: see the note above COMMANDS
    from mabook import transport as transport_mod
    from mabook.world import heldout_captions

    # 1. arithmetic from shapes: image-stream taps x image tokens x steps x k x 2 bytes x 2 guidance halves
    f = FLUX_1024
    print(f"FLUX-1024² ({f['blocks']} blocks x {f['image_tokens']} image tokens x {f['steps']} steps, bf16, "
          "both CFG halves; image stream only, no token mask):")
    full = record_memory.bytes_recorded(f["blocks"], f["image_tokens"], f["steps"], f["width"], f["bytes"])
    for k in args.k:
        b = record_memory.bytes_recorded(f["blocks"], f["image_tokens"], f["steps"], k, f["bytes"])
        print(f"  k={k:<5d} {_mb(b):>12s}  ({b / full:.2%} of full width)")
    print(f"  k={f['width']:<5d} {_mb(full):>12s}  (full width)")
    temb = record_memory.bytes_recorded(1, 1, f["steps"], f["width"], f["bytes"])  # one 'token' per sample and step
    print(f"  + the AdaLN conditioning (kept with channels='all'): {_mb(temb)}")
    print("  (FLUX-dev runs without a CFG batch -- guidance is distilled -- so halve these there; a K-means mask "
          "keeping a fraction of the tokens scales them by that fraction)")
    # 2. measured on the organism: record's actual bytes for each k vs the same arithmetic
    pipe, adapter, source = _loaded(args)
    taps = [str(t) for t in probe.taps(adapter, ["img"])]
    prompts = heldout_captions(args.batch_size, n_objects=1, seed=0)
    tokens = adapter.grid()[0] * adapter.grid()[1]
    print(f"organism ({source}): {len(taps)} image taps x {tokens} tokens x {args.num_inference_steps} steps x "
          f"{len(prompts)} images, float32:")
    for k in [*args.k, adapter.width]:
        if k > adapter.width:
            continue
        start = time.perf_counter()
        rec = transport_mod.record(adapter, prompts, [0], taps=taps, channels=list(range(k)),
                                   num_inference_steps=args.num_inference_steps, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        expected = record_memory.bytes_recorded(len(taps), tokens, args.num_inference_steps, k, 4) * len(prompts)
        print(f"  k={k:<5d} measured {_mb(rec.nbytes):>12s}, arithmetic {_mb(expected):>12s} "
              f"({'match' if rec.nbytes == expected else 'MISMATCH'}); record {seconds:.2f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# sweep: `mabook sweep` on 1 vs N processes (accelerate launch), and what the shards cost
# ---------------------------------------------------------------------------------------------


def _launch_sweep(processes: int, experiment: str, out, extra: list[str], device: str, threads: int) -> float:
    """Wall seconds of `accelerate launch --num_processes N -m mabook sweep EXPERIMENT ...` (a subprocess)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "mabook", "sweep", experiment, "--out", str(out), "--device", device,
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


@subcommand(
    "sweep",
    help="mabook sweep on 1 vs N processes (accelerate launch): wall-time ratio, images/s per process, shard overhead",
    arguments=[
        arg("--experiment", default="disrupt", help="discover, disrupt or sinks"),
        arg("--model", default="organism", help="'organism' or a hub id (FLUX.1-dev at 1024²: its default size)"),
        arg("--prompts", type=int, default=8, help="N held-out captions (organism) -- or prompts the model is asked"),
        arg("--num-inference-steps", type=int, default=4),
        arg("--batch-size", type=int, default=2, help="images per pipeline call = per shard"),
        arg("--k", type=int, nargs="+", default=[1, 2], help="disrupt / sinks: k values (discover: one)"),
        arg("--n-random", type=int, default=1),
        arg("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare (the first is the base)"),
        arg("--device", default="cpu", help="cpu (gloo group of CPU processes) or auto (one GPU per process)"),
        arg("--threads", type=int, default=1, help="OMP threads per process"),
        arg("--dtype", default="float32"),
    ],
)
def sweep_bench(args: argparse.Namespace) -> int:

    from mabook.experiments import SWEEPS  # deferred: see the note above COMMANDS

    if args.experiment not in SWEEPS:
        raise ValueError(f"unknown experiment {args.experiment!r}; allowed: {list(SWEEPS)}")
    for name in ("prompts", "num_inference_steps", "batch_size", "n_random", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.processes or any(n < 1 for n in args.processes):
        raise ValueError(f"--processes must be ints >= 1, got {args.processes}")
    extra = ["--model", args.model, "--prompts", str(args.prompts), "--num-inference-steps", str(args.num_inference_steps),
             "--batch-size", str(args.batch_size), "--k", *map(str, args.k), "--dtype", args.dtype]
    if args.experiment != "discover":
        extra += ["--n-random", str(args.n_random)]
    print(f"{args.experiment} on {args.model}: {args.prompts} prompts x {args.num_inference_steps} steps, batch "
          f"{args.batch_size}, device {args.device}, {args.threads} thread(s) per process")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            out = Path(tmp) / f"p{n}"
            wall = _launch_sweep(n, args.experiment, out, extra, args.device, args.threads)
            doc = json.loads((out / ("topk.json" if args.experiment == "discover" else "summary.json")).read_text())
            info, sweep_seconds = doc["sweep"], doc["settings"]["seconds"]
            images = args.prompts if args.experiment == "discover" else len(doc["table"])
            shard_bytes = sum(f.stat().st_size for f in (out / "shards").iterdir())
            rows.append((n, wall, sweep_seconds, images, info))
            print(f"{n} process(es): {wall:6.1f} s wall ({sweep_seconds:6.1f} s sweeping, {wall - sweep_seconds:5.1f} s "
                  f"start-up: imports, model load, process group, writing) -- {images} images, "
                  f"{images / sweep_seconds:.2f} images/s, {images / sweep_seconds / n:.2f} images/s per process; "
                  f"{info['shards']} shards, {_mb(shard_bytes)}")
            if n == args.processes[0]:
                overhead = info["main_io_seconds"] / max(info["main_compute_seconds"], 1e-9)
                print(f"  shard overhead (main process): {info['main_io_seconds']:.2f} s writing + reading shards vs "
                      f"{info['main_compute_seconds']:.2f} s computing them = {overhead:.1%}")
    base = rows[0]
    for n, wall, sweep_seconds, _, _ in rows[1:]:
        print(f"{n} vs {base[0]} process(es): wall-time ratio {wall / base[1]:.3f}x, sweeping {sweep_seconds / base[2]:.3f}x "
              f"(ideal {base[0] / n:.3f}x; measured in this run, on this machine's load)")
    return 0


# ---------------------------------------------------------------------------------------------
# realshape: bare / probe / capture / intervene / record per block at FLUX.1-dev and SD3.5 widths; the GPU plan
# ---------------------------------------------------------------------------------------------


@subcommand("realshape", "per-block time and peak memory of bare, probe, capture, intervene and record at FLUX.1-dev and "
            "SD3.5-medium widths (1-2 blocks, random weights); the GPU plan of book/real_model.md (mabook.realshape)",
            [arg("--device", default="cpu"),
             arg("--resolutions", type=int, nargs="+", default=None, help="pixels per side (default: 512 on CPU, 512 1024 on CUDA)"),
             arg("--repeats", type=int, default=None, help="timed rounds, each mode once per round (default: 2 on CPU, 5 on CUDA)"),
             arg("--models", nargs="+", default=["flux", "sd3.5-medium"], choices=["flux", "sd3.5-medium"]),
             arg("--quick", action="store_true", help="tiny widths, 64² and 128² px, one round: a smoke test"),
             arg("--out", default=None, help="measurements JSON (default: mabook/results/bench/realshape.json)"),
             arg("--md", default=None, help="also write the plan's tables into this page (e.g. book/real_model.md)"),
             arg("--plan-only", action="store_true", help="measure nothing: write the tables from --out into --md (default: "
                                                          "book/real_model.md)"),
             _threads_argument()])
def realshape(args: argparse.Namespace) -> int:
    from mabook import realshape as realshape_mod  # deferred: see the note above COMMANDS

    args.out = args.out or realshape_mod.RESULTS
    return realshape_mod.main(args)


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mabook.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_, arguments, fn) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_)
        for flags, kwargs in arguments:
            sub.add_argument(*flags, **kwargs)
        sub.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"bench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
