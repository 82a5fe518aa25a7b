"""Sweeps: the chapters' experiments split over processes, GPUs and machines with Hugging Face accelerate.

``mabook sweep EXPERIMENT --out DIR ...`` runs one experiment -- "discover" (chapter 1: the
streaming statistics and the top-k table), "disrupt" (chapter 2: top-k vs control channels, the
tidy table) or "sinks" (chapter 6: sink vs random / bottom keys suppressed, the tidy table) -- as a
list of *shards*, each a batch of the single-process run:

1. every process lists the shards not yet in the shard directory (``--shards``, default
   ``OUT/shards``) and takes a contiguous share of them with accelerate's process state
   (`accelerate.PartialState.split_between_processes`);
2. it writes each shard atomically (`mabook.files.atomic_path`: a temporary file, then `os.replace`),
   named by the hash of its content spec: the phase, the settings that change its numbers, its
   units, the checkpoint's hash (`shard_name`). A killed sweep run again skips the finished shards;
   a changed setting never reuses a stale one;
3. the main process merges: statistics with `statistics.Statistics.merge` in the single-process order,
   table rows concatenated in the single-process order; bootstrap CIs are computed once, on the
   merged table (`disruption.summary`, `disruption.paired_ratios`, `sinks.paired_ratios`).

"disrupt" and "sinks" have two phases with a barrier between them: the baselines (one shard per
batch of (prompt, seed) units, their pooled statistics merged once into a "baseline-stats" shard
every process reads) -- and for disrupt the "selection" shards of the held-out prompts (statistics
only), merged the same way, which choose the channel sets and the dataset means -- then the
conditions (one shard per (condition, batch)). The two experiments share their baseline shards.

Exactness. A shard is one batch of the single-process run, with that batch's seeds and generator,
so a process computes the same numbers in the same order as the single process would. The table's
rows are per image (pixel MSE and MAE summed over each image alone in one memory layout, SSIM, the
judge: `disruption.unit_metrics`), so the merged table is bit-identical. Statistics
are pooled with Chan's update, whose float rounding depends on the order of the pooling: merging one
shard per batch, in batch order, replays exactly the single process's sequence of updates, so the
merged statistics are bit-identical too -- when each batch makes one transformer call per step (a
[uncond; cond] guidance batch, or no guidance, as the organism, FLUX.1-dev and SD3 do; FLUX's
"true CFG" makes two calls per step, and pooling per batch then regroups the two calls' updates:
maxima and counts stay exact, the float64 sums, means and stds are expected to agree to ~1e-15
relative -- a few float64 roundings -- and a disrupt sweep's "mean" op inherits that; no family in
the tests makes two calls, so this case is not measured). `tests/test_sweep.py` checks both bit for
bit on 2 CPU processes (gloo). What is *not* exact across setups is the hardware: shards
computed on another device, dtype or thread count than the reference may differ in the last bits,
which is why the device type and dtype are part of every shard's name.

Launching (see ``book/gpu_runner.md``)::

    mabook sweep disrupt --prompts 64 --out runs/sweep                     # one process
    accelerate launch --num_processes 4 -m mabook sweep disrupt ...        # 4 GPUs, one machine
    accelerate launch --multi_gpu --num_processes 2 -m mabook sweep disrupt --device cpu ...   # 2 CPU processes

On CPU, accelerate 1.15's ``--cpu`` launcher starts *one* process whatever ``--num_processes``
says (it needs ``mpirun`` for more); ``--multi_gpu`` uses torchrun, and ``--device cpu`` then
makes the processes join a gloo group. A sweep started the ``--cpu`` way warns and runs alone.
Several machines need one shard directory they all see (a shared filesystem).

One code path. `mabook discover`, `disrupt` and `sinks` are this engine with one process and a
temporary shard directory (`mabook.experiments`); a sweep is the same call under `accelerate
launch`. The experiment is its config (`mabook.experiments.<verb>.Config`): its fields make the
shard specs' settings, its `conditions(base)` the conditions and its `apply` the runner; the sinks
baselines' shards also keep their attention mass (`attention.Capture.to_tensors`), merged into one
capture for the sink tables.

What this is not: a scheduler. A process that dies takes the launch down (torchrun stops the
others); run the same command again and it resumes. Two sweeps must not share a shard directory
at the same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mabook import attention, discovery, disruption, metrics, probe
from mabook import progress as progress_
from mabook.files import atomic_path
from mabook.statistics import Statistics

PHASES = ("discover", "baseline", "selection", "baseline-stats", "disrupt", "sinks")
# the shard layout; bump it when a shard's content or spec changes meaning
# (3: baselines may hold attention; 4: discover seeds every prompt alike)
FORMAT = 4
KEEP_IMAGES = 4  # units whose images the grid shows (as disruption.run's keep_images)
EXIT_STOPPED = 3  # `--stop-after` reached (a test hook: a sweep killed mid-way)
_SHARD = re.compile(r"^(%s)-[0-9a-f]{24}\.safetensors$" % "|".join(PHASES))
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # `files.atomic_path`'s temporary files, left by a killed write


class Stopped(Exception):
    """`stop_after` shards were written by this process: the sweep stops as if killed (a test hook)."""


def check_shard_dir(path) -> Path:
    """The shard directory, created if missing: refused if it is a file, cannot be created or
    written, or holds files that no sweep wrote (so that a typo cannot fill, say, a home directory)."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise ValueError(f"shard directory must be a path, got {path!r}; allowed: a new or empty directory, or one "
                         "that an earlier `mabook sweep` wrote")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"shard directory {str(path)!r} is an existing file; allowed: a directory (created if "
                         "missing) that is new, empty, or written by an earlier `mabook sweep`")
    if p.is_dir():
        foreign = sorted(f.name for f in p.iterdir() if not (_SHARD.match(f.name) or _TEMPORARY.match(f.name)))
        if foreign:
            raise ValueError(f"shard directory {str(path)!r} holds {len(foreign)} file(s) that are not sweep shards "
                             f"(e.g. {foreign[:3]}); allowed: a new or empty directory, or one that an earlier "
                             "`mabook sweep` wrote (files named PHASE-HASH.safetensors)")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"shard directory {str(path)!r} cannot be created ({e.strerror}); allowed: a writable "
                         "directory path") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"shard directory {str(path)!r} is not writable; allowed: a writable directory")
    return p


# ---------------------------------------------------------------------------------------------
# Shards: content-addressed safetensors files, written atomically
# ---------------------------------------------------------------------------------------------


def _normal(spec: dict) -> dict:
    """The spec as JSON reads it back (tuples -> lists): what a shard stores and is compared with."""
    return json.loads(json.dumps(spec))


def shard_name(spec: dict) -> str:
    """PHASE-HASH.safetensors: the first 24 hex digits of the SHA-256 of the spec's canonical JSON."""
    if spec.get("phase") not in PHASES:
        raise ValueError(f"unknown shard phase {spec.get('phase')!r}; allowed: {list(PHASES)}")
    text = json.dumps(_normal(spec), sort_keys=True, separators=(",", ":"))
    return f"{spec['phase']}-{hashlib.sha256(text.encode()).hexdigest()[:24]}.safetensors"


def write_shard(path: Path, spec: dict, tensors: dict | None = None, payload: dict | None = None) -> None:
    """One file: the tensors, and {"format", "spec", "payload"} as JSON metadata; atomic."""
    meta = {"mabook_shard": json.dumps({"format": FORMAT, "spec": _normal(spec), "payload": payload or {}})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()} or {"_": torch.zeros(0)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_shard(path: Path, spec: dict, names: Sequence[str] | None = None) -> tuple[dict, dict]:
    """(payload, tensors) of a shard -- only the tensors `names` if given; a shard that is not
    one, or holds another spec than its name says, is one clear error."""
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("mabook_shard")
            if raw is None:
                raise ValueError(f"{path} is not a sweep shard (no 'mabook_shard' metadata); delete it and run the sweep again")
            doc = json.loads(raw)
            if doc.get("format") != FORMAT or doc.get("spec") != _normal(spec):
                raise ValueError(f"shard {path} holds another computation than its name says (format "
                                 f"{doc.get('format')}, this mabook writes {FORMAT}); delete it and run the sweep again")
            tensors = {k: f.get_tensor(k) for k in (f.keys() if names is None else names)}
    except SafetensorError as e:
        raise ValueError(f"shard {path} is unreadable ({e}); delete it and run the sweep again to recompute it") from None
    return doc["payload"], tensors


# ---------------------------------------------------------------------------------------------
# Processes: list what is missing, split it, compute and write; barriers between phases
# ---------------------------------------------------------------------------------------------


def process_state(device: str = "auto"):
    """accelerate's `PartialState` (a gloo group of CPU processes when `device` is "cpu" or there
    is no GPU); warns when accelerate's simple launcher started one process (`--cpu`, or no
    `--multi_gpu` without GPUs)."""
    launch = os.environ
    # accelerate's simple launcher (`--cpu` without mpirun, or no `--multi_gpu` on a machine without
    # GPUs) sets MASTER_ADDR but starts ONE process whatever --num_processes says: say so, don't hang
    if (launch.get("ACCELERATE_USE_CPU", "").lower() in ("true", "false") and "MASTER_ADDR" in launch
            and not any(v in launch for v in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))):
        print("mabook sweep: warning: accelerate launch started one process (its simple launcher starts only one, "
              "whatever --num_processes says); for several CPU processes use `accelerate launch --multi_gpu "
              "--num_processes N -m mabook sweep ... --device cpu`. Running everything here.", file=sys.stderr)
    cpu = str(device).startswith("cpu") or (device == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def process_device(state, device: str = "auto") -> str:
    """This process's device: "auto" and "cuda" mean the GPU accelerate gave this process."""
    kind = getattr(getattr(state, "device", None), "type", "cpu")
    if device == "auto":
        return "cpu" if kind == "cpu" else str(state.device)
    if device == "cuda" and kind == "cuda":
        return str(state.device)
    return device


@dataclass
class Counts:
    """What a sweep did: shards in all, found finished, computed by every process this run, and
    this process's own seconds computing and reading / writing shards."""

    total: int = 0
    reused: int = 0
    computed: int = 0  # by all processes, this run
    computed_here: int = 0
    compute_seconds: float = 0.0
    io_seconds: float = 0.0


class _Runner:
    def __init__(self, state, shard_dir: Path, stop_after: int | None, progress: bool | None = None):
        self.state, self.dir, self.stop_after = state, shard_dir, stop_after
        self.counts = Counts()
        # bars and estimates on the main process only: the others' would overwrite its lines
        self.progress = progress if getattr(state, "is_main_process", True) else False

    def phase(self, items: Sequence[tuple[dict, Callable[[], tuple[dict, dict]]]]) -> list[str]:
        """Make sure a shard exists for every (spec, compute) item; returns their names, in order."""
        names = [shard_name(spec) for spec, _ in items]
        todo = {}
        for name, item in zip(names, items):
            todo.setdefault(name, item)
        pending = [n for n in todo if not (self.dir / n).is_file()]
        self.counts.total += len(todo)
        self.counts.reused += len(todo) - len(pending)
        self.counts.computed += len(pending)
        self.state.wait_for_everyone()  # every process has listed before any writes
        with self.state.split_between_processes(pending) as mine:
            specs = [todo[name][0] for name in mine]
            phase = specs[0]["phase"] if specs else ""
            images = sum(len(spec.get("units") or spec.get("prompts") or []) for spec in specs)
            steps = max([spec.get("num_inference_steps", 0) for spec in specs], default=0)
            with progress_.estimate(f"sweep {phase}, {len(mine)} shard(s)", images, steps, self.progress):
                for name in progress_.bar(mine, f"{phase} shards", unit="shard", progress=self.progress):
                    self.compute(name, *todo[name])
        self.state.wait_for_everyone()
        return names

    def compute(self, name: str, spec: dict, compute: Callable[[], tuple[dict, dict]]) -> None:
        """One shard: computed, written atomically, counted; `Stopped` after `stop_after` of them."""
        start = time.perf_counter()
        tensors, payload = compute()
        middle = time.perf_counter()
        write_shard(self.dir / name, spec, tensors, payload)
        self.counts.compute_seconds += middle - start
        self.counts.io_seconds += time.perf_counter() - middle
        self.counts.computed_here += 1
        if self.stop_after is not None and self.counts.computed_here >= self.stop_after:
            raise Stopped(f"stopped after {self.counts.computed_here} shard(s) (--stop-after); run the same "
                          f"command again to resume from the {len(list(self.dir.glob('*.safetensors')))} "
                          f"shards in {self.dir}")

    def read(self, name: str, spec: dict, names: Sequence[str] | None = None) -> tuple[dict, dict]:
        start = time.perf_counter()
        out = read_shard(self.dir / name, spec, names)
        self.counts.io_seconds += time.perf_counter() - start
        return out


# ---------------------------------------------------------------------------------------------
# The experiments
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """The merged result, on the main process.

    discover: `stats` (all taps, the `cfg` half). disrupt / sinks: `base` (the merged
    `disruption.Baseline`: its `stats` are the baselines' image-stream statistics, both guidance
    halves), `conditions` (`disruption.Condition` or `attention.KeyIntervention`), `table` (one row
    per (unit, condition), baseline rows first, in `disruption.run`'s order), `images` (the
    first KEEP_IMAGES units' images per condition, for `disruption.grid`) and, when the experiment
    captures the baselines' attention (sinks), `capture` (an `attention.Capture` of every baseline)."""

    experiment: str
    counts: Counts
    seconds: float
    stats: object = None
    base: object = None
    conditions: list = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    images: dict = field(default_factory=dict)
    capture: object = None

    def result(self) -> disruption.Result:
        """The table and images as a `disruption.Result` (for `disruption.grid`)."""
        return disruption.Result(self.table, self.images, list(self.conditions))


def checkpoint_id(adapter) -> str:
    """What identifies the weights: the organism's recorded SHA-256, else the path the transformer
    was loaded from (a hub snapshot's path names its commit)."""
    card = getattr(adapter.pipe, "card", None)
    if isinstance(card, dict) and card.get("sha256"):
        return "sha256:" + card["sha256"]
    name = getattr(getattr(adapter.transformer, "config", None), "_name_or_path", None)
    return f"path:{name or type(adapter.transformer).__name__}"


def _common(adapter, num_inference_steps: int, pipe_kwargs: dict, checkpoint: str | None) -> dict:
    param = next(adapter.transformer.parameters())
    return {"format": FORMAT, "family": adapter.family.name, "checkpoint": checkpoint or checkpoint_id(adapter),
            "device": param.device.type, "dtype": str(param.dtype).replace("torch.", ""),
            "num_inference_steps": num_inference_steps, "pipe_kwargs": pipe_kwargs}


def _batches(items: list, batch_size: int) -> list[tuple[int, list]]:
    """(start index, chunk) of the single-process run's batches."""
    return [(i, items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def _discover_shard(adapter, prompts, num_inference_steps, generator_seed, cfg, pipe_kwargs):
    stats = discovery.collect_statistics(adapter, prompts, num_inference_steps, generator_seed, len(prompts), cfg=cfg,
                                         **pipe_kwargs)
    tensors, meta = stats.to_tensors("stats/")
    return tensors, {"stats": meta}


def _baseline_shard(adapter, units, num_inference_steps, pipe_kwargs, clip, lpips, capture_attention: bool):
    """`disruption.baseline` for one batch of units (its body, with the units given rather than
    made from prompts x seeds; the test suite checks the two agree bit for bit), and with
    `capture_attention` the attention mass the batch's generation put on every key."""
    image_taps = probe.taps(adapter, ["img"])
    means: dict[tuple[int, str], list] = {}

    def record(tap, step, hidden_states):
        means.setdefault((step, str(tap)), []).append(hidden_states.detach().float().mean(1).cpu())

    with contextlib.ExitStack() as stack:
        cap = stack.enter_context(attention.capture(adapter)) if capture_attention else None
        run = stack.enter_context(probe.collect(adapter, taps=image_taps, cfg="both"))
        stack.enter_context(probe.hooks(adapter, record, taps=image_taps))
        images = adapter.generate(units, num_inference_steps, len(units), **pipe_kwargs)
    steps = sorted({s for s, _ in means})
    token_means = np.stack([np.stack([torch.cat(means[(s, str(t))]).numpy() for t in image_taps], 1) for s in steps], 1)
    base = disruption.Baseline(adapter, units, images, run.stats, token_means, num_inference_steps, dict(pipe_kwargs), clip=clip,
                               lpips=lpips)
    tensors, meta = run.stats.to_tensors("stats/")
    tensors |= {"images": torch.from_numpy(images), "token_means": torch.from_numpy(token_means)}
    payload = {"stats": meta, "metrics": disruption.unit_metrics(base, images)}
    if cap is not None:
        cap_tensors, payload["capture"] = cap.to_tensors("capture/")
        tensors |= cap_tensors
    return tensors, payload


def _selection_shard(adapter, units, num_inference_steps, pipe_kwargs):
    """The statistics of one batch of held-out units (`disruption.selection_statistics`): no images kept."""
    stats = disruption.unit_statistics(adapter, units, num_inference_steps, len(units), **pipe_kwargs)
    tensors, meta = stats.to_tensors("stats/")
    return tensors, {"stats": meta}


def _condition_shard(config, condition, batch_base, keep):
    """One condition on one batch: the experiment's `apply` (`disruption.run`, `sinks.run`) on a one-batch baseline."""
    result = config.apply(batch_base, [condition], len(batch_base.units), keep)
    (label,) = [n for n in result.images if n != "baseline"]
    tensors = {"images": torch.from_numpy(result.images[label][:keep])} if keep else {}
    return tensors, {"rows": result.table, "label": label}


def _condition_spec(condition) -> dict:
    return {"type": type(condition).__name__, **asdict(condition)}


def run(config, adapter, shards=None, *, state=None, stop_after: int | None = None, checkpoint: str | None = None,
        clip_model=None, lpips_net=None, pipe_kwargs: dict | None = None, progress: bool | None = None) -> SweepResult | None:
    """Run the experiment `config` (a discover, disrupt or sinks `Config` of `mabook.experiments`) as
    shards in the directory `shards` over this launch's processes; the merged `SweepResult` on the
    main process, None on the others. `shards=None`: a temporary directory (one process only).

    discover pools the prompts in batches of `batch_size`, every prompt generated with its own
    generator seeded `seed` (`discovery.collect_statistics`); disrupt and sinks generate every (prompt, seed)
    unit (`disruption.baseline`), then each of `config.conditions(base)` under `config.apply`.
    `checkpoint` names the weights in the shard specs (default `checkpoint_id(adapter)`); `clip_model`
    and `lpips_net` add CLIP-T and LPIPS to the table (`disruption.baseline`; default: the config's
    `perceptual()`, what its --metrics asks for); `pipe_kwargs` go to every pipeline call. `state`: an accelerate
    `PartialState` (default: this launch's). `stop_after`: raise `Stopped` after this process wrote
    that many shards (a test hook). `progress`: a bar over each phase's shards and its time
    estimate, on the main process (`mabook.progress`; None: on where someone reads it).
    """
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be an int >= 1 (or None), got {stop_after!r}")
    if shards is None:
        with tempfile.TemporaryDirectory(prefix="mabook-shards-") as tmp:
            return run(config, adapter, tmp, state=state, stop_after=stop_after, checkpoint=checkpoint,
                       clip_model=clip_model, lpips_net=lpips_net, pipe_kwargs=pipe_kwargs, progress=progress)
    pipe_kwargs = dict(pipe_kwargs or {})
    prompts = config.prompt_list
    seeds = getattr(config, "seeds", [0])
    units = disruption.check_generation(adapter, prompts, seeds, config.num_inference_steps, config.batch_size,
                                        f"sweep {config.NAME}")
    shard_dir = check_shard_dir(shards)
    state = process_state("cpu" if next(adapter.transformer.parameters()).device.type == "cpu" else "auto") \
        if state is None else state
    runner = _Runner(state, shard_dir, stop_after, progress)
    if state.is_main_process:  # temporary files of killed writes; nobody writes before the next barrier
        for f in shard_dir.iterdir():
            if _TEMPORARY.match(f.name):
                f.unlink(missing_ok=True)
    state.wait_for_everyone()
    start = time.perf_counter()
    common = _common(adapter, config.num_inference_steps, pipe_kwargs, checkpoint)
    if not hasattr(config, "conditions"):
        return _statistics(config, adapter, prompts, runner, common, pipe_kwargs, start)
    asked = config.perceptual() if hasattr(config, "perceptual") else {}
    clip_model = asked.get("clip_model") if clip_model is None else clip_model
    lpips_net = asked.get("lpips_net") if lpips_net is None else lpips_net
    # loaded before anything is generated: missing weights are one line now, not after the baselines
    clip = metrics.load_clip(clip_model) if clip_model is not None else None
    lpips = metrics.load_lpips(lpips_net, metrics.device_of(adapter)) if lpips_net is not None else None
    return _conditions(config, adapter, units, runner, common, pipe_kwargs, clip, lpips, start)


def _statistics(config, adapter, prompts, runner, common, pipe_kwargs, start) -> SweepResult | None:
    """discover: one shard per batch, merged in batch order."""
    items = []
    for _, chunk in _batches(list(prompts), config.batch_size):
        spec = {"phase": "discover", **common, "cfg": config.cfg, "generator_seed": config.seed, "prompts": chunk}
        items.append((spec, lambda chunk=chunk: _discover_shard(adapter, chunk, config.num_inference_steps,
                                                                config.seed, config.cfg, pipe_kwargs)))
    names = runner.phase(items)
    if not runner.state.is_main_process:
        return None
    parts = [Statistics.from_tensors(t, p["stats"], "stats/") for p, t in (runner.read(n, s) for n, (s, _) in zip(names, items))]
    return SweepResult(config.NAME, runner.counts, time.perf_counter() - start, stats=Statistics.merge(parts))


def _merged_statistics(runner, names: list[str], items: list) -> tuple[str, Statistics, list | None]:
    """The baselines' statistics merged once, in batch order, into a "baseline-stats" shard every
    process reads: (its name, the statistics, the main process's parts if it read them)."""
    spec = {"phase": "baseline-stats", "format": FORMAT, "parts": names}
    name = shard_name(spec)
    parts = None
    if runner.state.is_main_process and not (runner.dir / name).is_file():
        parts = [runner.read(n, part_spec) for n, (part_spec, _) in zip(names, items)]
        merged = Statistics.merge([Statistics.from_tensors(t, p["stats"], "stats/") for p, t in parts])
        tensors, meta = merged.to_tensors("stats/")
        write_shard(runner.dir / name, spec, tensors, {"stats": meta})
    runner.state.wait_for_everyone()
    payload, tensors = runner.read(name, spec)
    return name, Statistics.from_tensors(tensors, payload["stats"], "stats/"), parts


def _conditions(config, adapter, units, runner, common, pipe_kwargs, clip, lpips, start) -> SweepResult | None:
    """disrupt / sinks: the baselines (one shard per batch), their merged statistics, the conditions
    (one shard per (condition, batch)); merged on the main process in `disruption.run`'s order."""
    state, steps = runner.state, config.num_inference_steps
    capture_attention = getattr(config, "CAPTURE_ATTENTION", False)
    common = {**common, "clip_model": clip.id if clip else None, **({"lpips": lpips.id} if lpips else {}),
              **({"capture_attention": True} if capture_attention else {})}
    batches = _batches(units, config.batch_size)
    base_items = [({"phase": "baseline", **common, "units": chunk},
                   lambda chunk=chunk: _baseline_shard(adapter, chunk, steps, pipe_kwargs, clip, lpips, capture_attention))
                  for _, chunk in batches]
    base_names = runner.phase(base_items)
    stats_name, stats, main_parts = _merged_statistics(runner, base_names, base_items)
    selection_name, selection = stats_name, None
    selection_prompts = getattr(config, "selection_list", None)
    if selection_prompts is not None:  # held-out prompts' baselines choose the channel sets and the edits' values
        chosen_on = disruption.check_units(selection_prompts, getattr(config, "seeds", [0]))
        items = [({"phase": "selection", **common, "units": chunk},
                  lambda chunk=chunk: _selection_shard(adapter, chunk, steps, pipe_kwargs))
                 for _, chunk in _batches(chosen_on, config.batch_size)]
        selection_name, selection, _ = _merged_statistics(runner, runner.phase(items), items)
    empty = np.zeros((0,), np.float32)
    base = disruption.Baseline(adapter, units, empty, stats, empty, steps, dict(pipe_kwargs), clip=clip, selection=selection,
                               lpips=lpips)

    # the conditions (every process builds the same list from the same statistics)
    conds = config.conditions(base)
    batch_images: dict[int, np.ndarray] = {}

    def batch_base(index: int, chunk: list) -> disruption.Baseline:
        if index not in batch_images:
            _, t = runner.read(base_names[index], base_items[index][0], ["images"])
            batch_images[index] = t["images"].numpy()
        return disruption.Baseline(adapter, chunk, batch_images[index], stats, empty, steps, dict(pipe_kwargs),
                                   metrics=[], clip=clip, selection=selection, lpips=lpips)

    items = []
    for c in conds:
        for index, (first, chunk) in enumerate(batches):
            keep = max(0, min(len(chunk), KEEP_IMAGES - first))
            spec = {"phase": config.NAME, **common, "condition": _condition_spec(c), "units": chunk,
                    "baseline": selection_name, "keep": keep}  # the statistics that set the edits
            items.append((spec, lambda c=c, index=index, chunk=chunk, keep=keep:
                          _condition_shard(config, c, batch_base(index, chunk), keep)))
    names = runner.phase(items)
    if not state.is_main_process:
        return None

    # merge on the main process: the baseline, then the table in disruption.run's order
    if main_parts is None:
        main_parts = [runner.read(n, spec) for n, (spec, _) in zip(base_names, base_items)]
    images = np.concatenate([t["images"].numpy() for _, t in main_parts])
    token_means = np.concatenate([t["token_means"].numpy() for _, t in main_parts])
    metrics = [m for p, _ in main_parts for m in p["metrics"]]
    base = disruption.Baseline(adapter, units, images, stats, token_means, steps, dict(pipe_kwargs), metrics=metrics,
                               clip=clip, selection=selection, lpips=lpips)
    capture = attention.Capture.from_tensors(adapter, [(t, p["capture"]) for p, t in main_parts], "capture/") \
        if capture_attention else None
    table = [{**m, "condition": "baseline", "kind": "baseline", "k": 0, "op": "none", "window": "none"} for m in metrics]
    kept = {"baseline": images[:KEEP_IMAGES]}
    for name, (spec, _) in zip(names, items):
        payload, tensors = runner.read(name, spec)
        table += payload["rows"]
        if spec["keep"]:
            label = payload["label"]
            kept[label] = np.concatenate([kept[label], tensors["images"].numpy()]) if label in kept else tensors["images"].numpy()
    return SweepResult(config.NAME, runner.counts, time.perf_counter() - start, stats=stats, base=base,
                       conditions=list(conds), table=table, images=kept, capture=capture)
