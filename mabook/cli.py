"""Command line: one verb per chapter idea.

`mabook discover --model organism --prompts 16 --out runs/discovery` writes, into --out:
  stats.safetensors  the streaming statistics (`mabook.probe.Statistics.load` reads it back)
  topk.json          run settings and one row per layer (top-k, controls, ratios, Sun criterion)
  topk.csv           the same rows as a table

`mabook disrupt --model organism --k 1 2 4 8 --out runs/disruption` writes, into --out:
  table.csv          one row per (prompt, seed, condition): judge attributes, cleanliness, mask IoU,
                     pixel MSE and SSIM to the unit's baseline
  summary.json       settings, means with bootstrap 95 % CIs, paired top/control ratios, the
                     prompt-vs-timestep split of the top channels, and the table
  grid.png           baseline / top-k / bottom-k / random-k images at the largest k (rows)

`mabook transport --source "a red circle ..." --target "a blue square ..." --k 16 --out DIR` copies the
top-k channels of the source's generation into the target's (same noise) at each --alpha and
writes strip.png (rows: source, each alpha, target) and transport.json (the table).
`mabook transport --reference IMG --target "…" --out DIR` does the same from an image (chapter 5):
inverted onto the pipeline's schedule (or noised, --trajectory noise); the strip adds its
reconstruction and the JSON the reconstruction error. --mask
source|target|union restricts it to chapter 3's K-means foreground, --window early|mid|late to a
third of the steps, --k 0 moves every channel and the AdaLN conditioning (alpha = 1 is then the
source exactly), --baselines adds pixel blend and text-embedding blend rows.

`mabook cluster --model organism --tap single_transformer_blocks.1.img --step 5 --k 2 --out DIR`
writes K-means masks of the image tokens restricted to the top channels (mask PNGs) and, for
shapes-world captions, their IoU with the true masks (iou.json).

`mabook sinks --model organism --k 1 2 5 10 --out runs/sinks` writes, into --out:
  sinks.csv          top keys per (layer, step, head) of the baselines: where each sink sits
                     (text, pad, image and its grid row/col) and its mass
  movement.csv       per (layer, head): how often the top-1 sink stays put between steps
  mass_by_kind.csv   per (layer, step, head): attention mass on text, padding and image keys
  table.csv          one row per (prompt, seed, condition): sink / random / bottom keys suppressed
  summary.json       settings, means with bootstrap 95 % CIs, paired sink/control ratios, the table
  grid.png           baseline / sink / random / bottom images at the largest k

`mabook sweep disrupt --prompts 64 --out runs/sweep` runs discover, disrupt or sinks as shards
(one batch, or one (condition, batch), each) over the processes of `accelerate launch ... -m mabook
sweep ...` (`mabook.sweep`): shards go to --shards (default OUT/shards), are skipped when already
there (a killed sweep resumes), and the main process merges them and writes the verb's files
(sinks: table.csv and summary.json only), plus baseline_stats.safetensors for disrupt and sinks.
Exit code 3: --stop-after N reached (a test hook).

--prompts is a text file (one prompt per line), an integer N (N held-out captions of the shapes
world, for the organism), or the prompts themselves (none of them empty).

Errors and exit codes. A bad value -- an argument out of range, an unknown name, a missing or
corrupt file, a model id that is neither 'organism', a local directory nor loadable from the hub --
prints one line on stderr, ``mabook VERB: error: ...``, naming the value and what is allowed, and
exits with 2 (as argparse does for a malformed command line, which prints the same one line).
``--debug`` (before or after the verb) shows the traceback instead. Ctrl-C prints one line and
exits with 130. 0 is success.

Interruptions. Every file in --out is written atomically (`mabook.files`: a temporary file in the
same directory, fsync, rename), so a run killed at any moment leaves each file either complete from
the new run, complete from the previous run, or absent -- never half a JSON or PNG. The summary JSON
(topk.json, summary.json, iou.json, transport.json) is written last; it records the command, the
mabook version and the checkpoint hash.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from mabook import files

DTYPES = ("float32", "float16", "bfloat16")
DOSES = ("redistribute", "renormalise")  # mabook.attention.DOSES, repeated: building the parser imports no torch
EXIT_BAD_INPUT = 2  # a bad value (one line on stderr), as argparse's exit code for a bad command line
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, the shell's convention


def read_prompts(values: list[str]) -> list[str]:
    """File path -> its non-empty lines; a single integer N -> N held-out world captions; else the values."""
    if len(values) == 1 and Path(values[0]).is_file():
        prompts = [line.strip() for line in Path(values[0]).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {values[0]} has no non-empty lines")
        return prompts
    if len(values) == 1 and values[0].strip().lstrip("-").isdigit():
        from mabook import world

        n = int(values[0])
        if n < 1:
            raise ValueError(f"--prompts N must be >= 1, got {n}")
        return world.heldout_captions(n, n_objects=1, seed=0)
    if len(values) == 1 and values[0].endswith((".txt", ".csv", ".tsv")) and " " not in values[0]:
        raise FileNotFoundError(f"--prompts: prompt file {values[0]!r} not found; pass an existing file (one prompt per "
                                "line), an integer N, or the prompts themselves")
    for i, v in enumerate(values):
        if not v.strip():
            raise ValueError(f"--prompts: prompt {i + 1} of {len(values)} is empty ({v!r}); allowed: non-empty prompts, a "
                             "file of prompts, or an integer N (held-out captions)")
    return values


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV (atomically); the columns are every key any row has (baseline rows lack some), in first-seen order."""
    files.write_csv(path, rows)


def _save_png(image, path: Path) -> None:
    files.save_image(image, path, "PNG")


def _out_dir(args) -> Path:
    """--out, created; refused if it is an existing file."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {args.out!r} is an existing file; allowed: a directory (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _settings(args, **extra) -> dict:
    """The run's arguments for the summary JSON (not the function, the debug flag or the command line)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "debug", "command_line")} | extra


def _provenance(args, pipe) -> dict:
    """What every summary JSON records: mabook version, the command, the checkpoint hash (organism)."""
    return files.provenance(getattr(args, "command_line", None), getattr(pipe, "card", {}).get("sha256"))


def _check_device(args) -> None:
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; allowed: 'cpu', 'cuda', 'cuda:N', 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: no CUDA device here; allowed: 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {args.device!r}: no MPS device here; allowed: 'cpu'")


def _check_positive(args, *names: str) -> None:
    """--num-inference-steps, --batch-size, ...: ints >= 1 (checked before loading anything)."""
    for name in names:
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _check_seeds(seeds) -> None:
    bad = [s for s in seeds if s < 0]
    if bad:
        raise ValueError(f"--seeds must be non-negative ints, got {bad[0]}")


def discover(args: argparse.Namespace) -> int:
    from mabook import discovery

    prompts = read_prompts(args.prompts)
    _check_positive(args, "num_inference_steps", "batch_size")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative int, got {args.seed}")
    # 1. load
    pipe, adapter = _load(args)
    discovery.check_k(args.k, adapter.width)  # fail before generating, not after
    out = _out_dir(args)
    # 2. generate and keep statistics only
    start = time.perf_counter()
    stats = discovery.collect_statistics(adapter, prompts, args.num_inference_steps, args.seed, args.batch_size, cfg=args.cfg)
    seconds = time.perf_counter() - start
    # 3. rank channels per layer, pooled over steps
    reports = discovery.massive_channels(stats, args.k, stream="img", seed=args.seed)
    rows = discovery.table(reports)
    stats.save(out / "stats.safetensors")
    settings = _settings(args, prompts=prompts, seconds=seconds)
    _write_csv(out / "topk.csv", [{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in rows])
    files.write_json(out / "topk.json", {"settings": settings, **_provenance(args, pipe), "layers": rows})  # last
    # 4. summary
    print(f"{len(prompts)} prompts x {args.num_inference_steps} steps in {seconds:.1f} s -> {out}")
    print(f"{'tap':36s} {'top-k':24s} {'ratio':>8s} {'max|x|':>9s} {'sun':>4s}")
    for r in reports:
        print(f"{r.tap:36s} {str(r.top):24s} {r.ratio_to_median:8.1f} {r.max_abs:9.2f} {'yes' if r.sun_massive else 'no':>4s}")
    return 0


@contextlib.contextmanager
def _quiet_libraries(debug: bool = False):
    """While loading a model: no FutureWarnings or hub-client chatter on stderr (the error, if any,
    is our one line); with --debug, everything."""
    if debug:
        yield
        return
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def _load(args):
    import torch

    import mabook

    _check_device(args)
    if args.checkpoint and args.model != "organism":
        raise ValueError(f"--checkpoint is for --model organism only, got --model {args.model!r}; pass the model's "
                         "directory as --model instead")
    with _quiet_libraries(getattr(args, "debug", False)):
        pipe, adapter = mabook.load(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                    **({"path": args.checkpoint} if args.checkpoint else {}))
    if pipe is None:
        raise ValueError(f"--model {args.model!r} holds only a transformer; `{args.command}` needs a pipeline "
                         "(a directory with model_index.json, or a hub id)")
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def disrupt(args: argparse.Namespace) -> int:
    from PIL import Image

    from mabook import discovery, disruption

    prompts = read_prompts(args.prompts)
    _check_seeds(args.seeds)
    _check_positive(args, "num_inference_steps", "batch_size")
    if args.op not in disruption.OPS:
        raise ValueError(f"unknown --op {args.op!r}; allowed: {list(disruption.OPS)}")
    if args.op == "scale" and args.value is None:
        raise ValueError("--op scale needs --value (the factor), e.g. --value 0.5")
    if "random" in args.kinds and args.n_random < 1:
        raise ValueError(f"--n-random must be >= 1 when --kinds includes random, got {args.n_random}")
    pipe, adapter = _load(args)
    for k in args.k:
        discovery.check_k(k, adapter.width)  # fail before generating, not after
    out = _out_dir(args)
    start = time.perf_counter()
    # 1. baselines, once per (prompt, seed); 2. the conditions; 3. regenerate under each
    base = disruption.baseline(adapter, prompts, args.seeds, args.num_inference_steps, args.batch_size)
    conds = disruption.conditions(base, args.k, args.kinds, args.n_random, args.op, args.value)
    if args.windows:
        conds += disruption.window_conditions(base, max(args.k), op=args.op)
    result = disruption.run(base, conds, args.batch_size)
    seconds = time.perf_counter() - start
    # 4. write the table, the summary and the grid
    table = result.table
    _write_csv(out / "table.csv", table)
    top = disruption.channel_set(base.stats, max(args.k), "top")
    settings = _settings(args, prompts=prompts, seconds=seconds)
    summary = {"settings": settings, **_provenance(args, pipe),
               "summary": disruption.summary(table), "paired_ratios": disruption.paired_ratios(table, op=args.op),
               "decomposition": disruption.decomposition(base, top), "table": table}
    k = max(args.k)
    names = ["baseline"] + [n for n in result.images if n.startswith((f"top-{k} ", f"bottom_abs_mean-{k} ",
                                                                       f"bottom_rms-{k} ", f"random-{k}#"))][:4]
    mosaic, names = disruption.grid(result, names)
    _save_png(Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST), out / "grid.png")
    files.write_json(out / "summary.json", summary)  # last: a complete summary means a complete run
    # 5. print the paired ratios
    print(f"{len(base.units)} units x {len(conds)} conditions x {args.num_inference_steps} steps in {seconds:.1f} s -> {out}")
    print(f"grid rows: {', '.join(names)}")
    for r in summary["paired_ratios"]:
        print(f"k={r['k']:<3d} top / {r['control']:16s} pixel MSE {r['top_damage']:.4f} / {r['control_damage']:.4f} = "
              f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})")
    return 0


def cluster(args: argparse.Namespace) -> int:
    """`mabook cluster`: K-means masks from one (tap, step) and, for shapes-world prompts, their IoU.

    Writes into --out: masks.png (rows: images, foreground overlaid, cluster label maps),
    mask_NN.png (each image's pixel foreground mask) and iou.json (settings, the channels, one row
    per image and the mean IoU with a bootstrap 95 % CI; no IoU for prompts outside the world).
    """
    import numpy as np
    from PIL import Image

    from mabook import judge, spatial

    prompts = read_prompts(args.prompts)
    _check_seeds(args.seeds)
    _check_positive(args, "num_inference_steps", "batch_size", "n_channels")
    if args.kind not in spatial.KINDS:
        raise ValueError(f"unknown --kind {args.kind!r}; allowed: {list(spatial.KINDS)}")
    pipe, adapter = _load(args)
    # 1. check everything before generating
    tap = spatial.image_tap(adapter, args.tap)
    step = args.num_inference_steps // 2 if args.step is None else args.step
    if not 0 <= step < args.num_inference_steps:
        raise ValueError(f"step {step} never runs: --num-inference-steps {args.num_inference_steps} runs steps "
                         f"0..{args.num_inference_steps - 1}")
    h, w = adapter.grid()
    spatial.check_clusters(args.k, h * w)
    if args.kind != "all":
        from mabook import discovery

        discovery.check_k(args.n_channels, adapter.width)
    out = _out_dir(args)
    # 2. generate once, keeping the hidden states at (tap, step)
    start = time.perf_counter()
    cap = spatial.capture(adapter, prompts, args.seeds, args.num_inference_steps, taps=[tap], steps=[step],
                          batch_size=args.batch_size)
    sets = spatial.channel_sets(cap.stats, args.n_channels, [args.kind], n_random=1, seed=args.seed)
    name, spec = next(iter(sets.items()))
    channels = spec["channels"][tap]
    # 3. masks: matched to the objects for world captions, else the smallest cluster is the foreground
    judged = judge.applies(adapter, prompts)
    fg = spatial.foreground_maps(cap, tap, step, channels, args.k, args.seed, "rendered" if judged else None)
    x = cap.features(tap, step, channels)
    labels = np.stack([spatial.label_map(spatial.kmeans(x[u], args.k, args.seed), cap.grid) for u in range(len(cap.units))])
    size = cap.images.shape[1:3]
    images = (np.clip(cap.images, 0, 1) * 255).round().astype(np.uint8)
    colors = (np.array([[0, 0, 0], [255, 255, 255], [230, 40, 40], [40, 190, 60], [50, 90, 235], [240, 220, 40],
                        [220, 50, 220], [40, 220, 230]], np.uint8))
    label_images = np.stack([colors[spatial.upsample(m, size) % len(colors)] for m in labels])
    grid_image = spatial.mosaic([images, spatial.overlay(images, fg), label_images])
    scale = max(1, 256 // size[0])
    _save_png(Image.fromarray(grid_image).resize((grid_image.shape[1] * scale, grid_image.shape[0] * scale), Image.NEAREST),
              out / "masks.png")
    for u in range(len(cap.units)):
        _save_png(Image.fromarray((spatial.upsample(fg[u], size) * 255).astype(np.uint8)), out / f"mask_{u:02d}.png")
    # 4. IoU against the caption's rendering and the judge's mask of the generated image
    rows, summary = [], {}
    if judged:
        rows = spatial.measure(cap, {name: spec}, [tap], [step], [args.k], thresholds=(), chance=False, seed=args.seed)
        for source in spatial.SOURCES:
            (s,) = spatial.summary(rows, by=("set",), source=source)
            summary[source] = {m: s[m] for m in ("token_iou", "pixel_iou", "object_iou")} | {
                f"{m}_ci": s[f"{m}_ci"] for m in ("token_iou", "pixel_iou", "object_iou")} | {"n_units": s["n_units"]}
    seconds = time.perf_counter() - start
    settings = _settings(args, prompts=prompts, tap=tap, step=step, seconds=seconds)
    payload = {"settings": settings, **_provenance(args, pipe), "set": name,
               "channels": channels, "grid": list(cap.grid), "summary": summary, "rows": rows}
    files.write_json(out / "iou.json", payload, default=float)
    # 5. print
    print(f"{len(cap.units)} images x {args.num_inference_steps} steps in {seconds:.1f} s; {name} channels {channels} "
          f"at {tap}, step {step}; K={args.k} -> {out}")
    for source, s in summary.items():
        lo, hi = s["token_iou_ci"]
        print(f"IoU vs {source:8s} token {s['token_iou']:.3f} (95% CI {lo:.3f}-{hi:.3f})  pixel {s['pixel_iou']:.3f}")
    if not judged:
        print("prompts are not shapes-world captions: masks only, no IoU")
    return 0


def sinks(args: argparse.Namespace) -> int:
    from PIL import Image

    from mabook import attention, disruption
    from mabook import sinks as sinks_mod

    prompts = read_prompts(args.prompts)
    _check_seeds(args.seeds)
    _check_positive(args, "num_inference_steps", "batch_size", "top", "n_random")
    pipe, adapter = _load(args)
    # 0. fail before generating, not after: every intervention is built (and checked) up front
    layers = None if args.layer == ["all"] else args.layer
    conds = [attention.KeyIntervention(keys, k, args.path, args.eta, layers, seed=seed, dose=args.dose)
             for k in args.k for keys in ("sink", "bottom", "random")
             for seed in (range(args.n_random) if keys == "random" else [0])]
    attention.intervene(adapter, conds[0])  # validates the layers and the family (nothing swapped yet)
    out = _out_dir(args)
    start = time.perf_counter()
    # 1. baselines once per (prompt, seed), with the attention mass captured; 2. each intervention
    with attention.capture(adapter) as cap:
        base = disruption.baseline(adapter, prompts, args.seeds, args.num_inference_steps, args.batch_size)
    result = sinks_mod.run(base, conds, args.batch_size)
    seconds = time.perf_counter() - start
    # 3. write the sink tables, the intervention table, the summary and the grid
    _write_csv(out / "sinks.csv", sinks_mod.sinks(cap, args.top))
    _write_csv(out / "movement.csv", sinks_mod.movement(cap, args.top))
    _write_csv(out / "mass_by_kind.csv", sinks_mod.mass_by_kind(cap))
    _write_csv(out / "table.csv", result.table)
    settings = _settings(args, prompts=prompts, seconds=seconds)
    ratios = sinks_mod.paired_ratios(result.table, "pixel_mse")
    summary = {"settings": settings, **_provenance(args, pipe),
               "summary": disruption.summary(result.table), "paired_ratios": ratios,
               "mass_by_kind": sinks_mod.mass_by_kind(cap), "table": result.table}
    k = max(args.k)
    names = ["baseline"] + [next(n for n in result.images if n.startswith((f"{keys}-{k} ", f"{keys}-{k}#")))
                            for keys in ("sink", "random", "bottom")]
    mosaic, names = disruption.grid(result, names)
    _save_png(Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST), out / "grid.png")
    files.write_json(out / "summary.json", summary)  # last: a complete summary means a complete run
    # 4. print where the sinks sit and the paired ratios
    rows = sinks_mod.mass_by_kind(cap)
    share = {kind: sum(r[kind] for r in rows) / len(rows) for kind in ("text", "pad", "image")}
    print(f"{len(base.units)} units x {len(conds)} conditions x {args.num_inference_steps} steps in {seconds:.1f} s -> {out}")
    print("attention mass over image queries, mean over layers, steps, heads: "
          + ", ".join(f"{kind} {v:.3f}" for kind, v in share.items()))
    for r in ratios:
        print(f"k={r['k']:<3d} sink / {r['control']:6s} pixel MSE {r['sink_damage']:.4f} / {r['control_damage']:.4f} = "
              f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})")
    return 0


def transport(args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from mabook import disruption, judge, probe
    from mabook import transport as transport_mod

    if args.reference is not None:
        return _transport_reference(args)
    if args.source is None:
        raise ValueError("give --source (a prompt) or --reference (an image to invert)")
    for a in args.alpha:
        transport_mod.check_alpha(a)  # fail before generating, not after
    if args.k < 0:
        raise ValueError(f"--k must be >= 0 (0 = all channels), got {args.k}")
    for name in ("source", "target"):
        if not getattr(args, name).strip():
            raise ValueError(f"--{name} is empty; allowed: a non-empty prompt")
    _check_seeds(args.seeds)
    _check_positive(args, "num_inference_steps", "batch_size", "mask_channels")
    if args.mask != "none" and args.stream == "txt":
        raise ValueError(f"--mask {args.mask} selects image tokens; allowed with --stream img or both, not txt")
    if args.mask_step is not None and not 0 <= args.mask_step < args.num_inference_steps:
        raise ValueError(f"--mask-step {args.mask_step} is out of range; allowed: 0 <= step < {args.num_inference_steps}")
    pipe, adapter = _load(args)
    if args.k > adapter.width:
        raise ValueError(f"--k {args.k} is out of range; allowed: 0 (all channels) or 1 <= k <= {adapter.width}")
    out = _out_dir(args)
    start = time.perf_counter()
    # 1. the channel set: top-k by |mean| over the source and target generations (both guidance halves)
    streams = ["img", "txt"] if args.stream == "both" else [args.stream]
    taps = [str(t) for t in probe.taps(adapter, streams)]
    if args.k > 0 or args.mask != "none":
        with probe.collect(adapter, cfg="both") as run:
            adapter.generate([(args.source, s) for s in args.seeds] + [(args.target, s) for s in args.seeds],
                                 args.num_inference_steps, args.batch_size)
    if args.k == 0:
        channels = "all"
    else:
        channels = {}
        for stream in streams:
            channels |= disruption.channel_set(run.stats, args.k, "top", stream=stream)
    # 2. record the source once (with the AdaLN conditioning: --conditioning, by default with all channels only)
    conditioning = {"auto": None, "on": True, "off": False}[args.conditioning]
    rec = transport_mod.record(adapter, [args.source], args.seeds, taps=taps, channels=channels, conditioning=conditioning,
                               num_inference_steps=args.num_inference_steps, batch_size=args.batch_size)
    # 3. the K-means mask (chapter 3: top --mask-channels at one image tap and step) of the source, target or both
    mask = None
    if args.mask != "none":
        from mabook import spatial

        mask_tap = spatial.image_tap(adapter, args.mask_tap)
        mask_step = args.num_inference_steps // 2 if args.mask_step is None else args.mask_step
        mask_channels = {mask_tap: disruption.channel_set(run.stats, args.mask_channels, "top")[mask_tap]}
        truth = "rendered" if judge.applies(adapter, [args.source, args.target]) else None
        masks = {}
        for side, prompt in (("source", args.source), ("target", args.target)):
            side_rec = transport_mod.record(adapter, [prompt], args.seeds, taps=[mask_tap], steps=[mask_step],
                                            channels=mask_channels, num_inference_steps=args.num_inference_steps,
                                            batch_size=args.batch_size)
            masks[side] = transport_mod.kmeans_mask(side_rec, mask_tap, mask_step, source=truth)
        mask = masks["source"] | masks["target"] if args.mask == "union" else masks[args.mask]
    window = None if args.window == "all" else disruption.window(["-"], args.num_inference_steps, "all", args.window)[1]
    # 4. transport at every alpha (the unedited target generated once), and the baselines at the same alphas
    targets, rows, strip = [args.target] * len(rec.units), [], []
    target_images = None
    for a in args.alpha:
        result = transport_mod.transport(rec, targets, a, mask=mask, stream=args.stream, steps=window,
                                         batch_size=args.batch_size, target_images=target_images)
        target_images = result.target
        rows += [{**r, "method": "transport", "window": args.window, "mask": args.mask} for r in result.table]
        strip.append(result.images)
    baselines = {}
    if args.baselines:
        for a in args.alpha:
            baselines[f"pixel blend alpha={a:g}"] = transport_mod.pixel_blend(rec.images, target_images, a)
        if adapter.family.name == "organism":
            for a in args.alpha:
                baselines[f"text embedding blend alpha={a:g}"] = transport_mod.embedding_blend(
                    adapter, [args.source] * len(rec.units), targets, a, [s for _, s in rec.units],
                    args.num_inference_steps, args.batch_size)
        base = SimpleNamespace(adapter=adapter, images=target_images, units=rec.units, clip=None)  # what disruption.unit_metrics reads
        for name, images in baselines.items():
            method, a = name.rsplit(" alpha=", 1)
            rows += [{**r, "method": method, "alpha": float(a), "source_prompt": args.source}
                     for r in disruption.unit_metrics(base, images)]
    seconds = time.perf_counter() - start
    # 5. the strip (rows: source, each alpha, target, then the baselines; columns: seeds) and the JSON
    rows_of = {"source": rec.images, **{f"alpha={a:g}": im for a, im in zip(args.alpha, strip)}, "target": target_images,
               **baselines}
    mosaic, _ = disruption.grid(disruption.Result([], rows_of, []))
    _save_png(Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST), out / "strip.png")
    settings = _settings(args, seconds=seconds, recorded_bytes=rec.nbytes, conditioning=rec.conditioning)
    summary = {"settings": settings, **_provenance(args, pipe), "strip_rows": list(rows_of), "table": rows}
    files.write_json(out / "transport.json", summary, default=str)
    print(f"{len(rec.units)} seeds x {len(args.alpha)} alphas, k={args.k or 'all'} ({args.stream}), "
          f"{args.num_inference_steps} steps in {seconds:.1f} s; recorded {rec.nbytes / 2**10:.1f} KiB -> {out}")
    for a in args.alpha:
        r = [x for x in rows if x["alpha"] == a and x["method"] == "transport"]
        attrs = ("color", "shape", "size", "position")
        took = [np.mean([x[f"took_source_{k}"] for k in attrs if x.get(f"differs_{k}")] or [np.nan])
                for x in r if "took_source_color" in x]
        line = f"alpha={a:<5g} pixel MSE vs target {np.mean([x['pixel_mse'] for x in r]):.4f}"
        if took:
            line += f"; took the source's differing attributes {np.nanmean(took):.2f}"
        print(line)
    return 0


def _transport_reference(args: argparse.Namespace) -> int:
    """`mabook transport --reference IMG --target ...`: the image brought onto a trajectory (inverted or
    noised, `mabook.inversion`), its top-k channels moved into the target's generation from the same noise."""
    import numpy as np
    from PIL import Image

    from mabook import disruption, inversion, probe
    from mabook import transport as transport_mod

    for a in args.alpha:
        transport_mod.check_alpha(a)
    if args.source is not None:
        raise ValueError("--source and --reference exclude each other: a reference image needs no source prompt")
    if args.k < 0:
        raise ValueError(f"--k must be >= 0 (0 = all channels), got {args.k}")
    if not args.target.strip():
        raise ValueError("--target is empty; allowed: a non-empty prompt")
    if args.mask != "none":
        raise ValueError(f"--mask {args.mask} is not available with --reference; allowed: none")
    _check_seeds(args.seeds)
    _check_positive(args, "num_inference_steps", "batch_size")
    pipe, adapter = _load(args)
    if args.k > adapter.width:
        raise ValueError(f"--k {args.k} is out of range; allowed: 0 (all channels) or 1 <= k <= {adapter.width}")
    references = inversion.check_references(adapter, [args.reference], resize=args.resize)
    out = _out_dir(args)
    start = time.perf_counter()
    # 1. the reference on its trajectory: inverted (unconditionally), or noised with the first seed
    if args.trajectory == "invert":
        traj = inversion.invert(adapter, references, num_inference_steps=args.num_inference_steps)
    else:
        traj = inversion.noise(adapter, references, args.seeds[0], num_inference_steps=args.num_inference_steps)
    # 2. record every channel along it (their statistics pick the top-k); 3. transport at every alpha
    streams = ["img", "txt"] if args.stream == "both" else [args.stream]
    taps = [str(t) for t in probe.taps(adapter, streams)]
    conditioning = {"auto": None, "on": True, "off": False}[args.conditioning]
    with probe.collect(adapter, taps=taps, cfg="both") as run:
        rec = inversion.record(traj, taps=taps, channels="all", batch_size=args.batch_size,
                               conditioning=args.k == 0 if conditioning is None else conditioning)
    channels = None
    if args.k > 0:
        channels = {}
        for stream in streams:
            channels |= disruption.channel_set(run.stats, args.k, "top", stream=stream)
    window = None if args.window == "all" else disruption.window(["-"], args.num_inference_steps, "all", args.window)[1]
    rows, strip, target_images = [], [], None
    for a in args.alpha:
        result = transport_mod.transport(rec, [args.target], a, stream=args.stream, channels=channels, steps=window,
                                         batch_size=args.batch_size, target_images=target_images)
        target_images = result.target
        rows += [{**r, "method": "transport", "window": args.window} for r in result.table]
        strip.append(result.images)
    baselines = {f"pixel blend alpha={a:g}": transport_mod.pixel_blend(references, target_images, a)
                 for a in args.alpha} if args.baselines else {}
    seconds = time.perf_counter() - start
    # 4. the strip (reference, its reconstruction, each alpha, target, baselines) and the JSON
    rows_of = {"reference": references, "reconstruction": rec.images,
               **{f"alpha={a:g}": im for a, im in zip(args.alpha, strip)}, "target": target_images, **baselines}
    mosaic, _ = disruption.grid(disruption.Result([], rows_of, []))
    _save_png(Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST), out / "strip.png")
    error = {k: float(v[0]) for k, v in inversion.pixel_error(rec.images, references).items()}
    residual = float(np.nanmax(traj.residuals)) if traj.residuals is not None and not np.isnan(traj.residuals).all() else None
    settings = _settings(args, seconds=seconds, recorded_bytes=rec.nbytes, conditioning=rec.conditioning)
    summary = {"settings": settings, **_provenance(args, pipe), "reconstruction_error": error,
               "inversion": {"evaluations": traj.evaluations, "max_residual": residual}, "strip_rows": list(rows_of),
               "table": rows}
    files.write_json(out / "transport.json", summary, default=str)
    print(f"reference {args.reference} {args.trajectory}ed in {args.num_inference_steps} steps; the record regenerates it "
          f"with mean |error| {error['mae']:.4f}; k={args.k or 'all'} ({args.stream}) in {seconds:.1f} s -> {out}")
    for r in rows:
        print(f"alpha={r['alpha']:<5g} pixel MSE vs target {r['pixel_mse']:.4f}")
    return 0


# ---------------------------------------------------------------------------------------------
# `mabook sweep EXPERIMENT ...`: the engine is mabook.sweep; this is its command line
# ---------------------------------------------------------------------------------------------


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mabook sweep` arguments: the generating verbs' (defaults per experiment), and the shards'."""
    from mabook.sweep import EXPERIMENTS

    parser.add_argument("experiment", help=f"one of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--out", required=True, help="output directory (the verb's files: stats / tables / summary)")
    parser.add_argument("--shards", default=None, help="shard directory (default OUT/shards; several machines: a shared one)")
    parser.add_argument("--stop-after", type=int, default=None, help="test hook: stop after this process wrote N shards")
    parser.add_argument("--model", default="organism", help="'organism', a hub id or a local pipeline directory")
    parser.add_argument("--checkpoint", default=None, help="organism only: a checkpoint other than the committed one")
    parser.add_argument("--prompts", nargs="+", default=None, help="a file, an integer N, or prompts (default: the verb's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="disrupt, sinks: seeds per prompt")
    parser.add_argument("--seed", type=int, default=0, help="discover: batch b uses generator seed SEED + b")
    parser.add_argument("--num-inference-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="images per pipeline call = per shard (default: the verb's)")
    parser.add_argument("--device", default="auto", help="auto (this process's GPU, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="discover: channels per set (one); disrupt: channel-set sizes; sinks: keys suppressed")
    parser.add_argument("--cfg", choices=("cond", "uncond", "both"), default="cond", help="discover: which guidance half")
    parser.add_argument("--kinds", nargs="+", default=["top", "bottom_abs_mean", "bottom_rms", "random"],
                        choices=["top", "bottom_abs_mean", "bottom_rms", "random"], help="disrupt: channel sets")
    parser.add_argument("--n-random", type=int, default=None, help="disrupt, sinks: seeded random sets per k")
    parser.add_argument("--op", default="zero", help="disrupt: zero, mean, token_mean or scale")
    parser.add_argument("--value", type=float, default=None, help="disrupt: the factor of --op scale")
    parser.add_argument("--windows", action="store_true", help="disrupt: also zero the largest k in each layer x step window")
    parser.add_argument("--path", choices=("score", "value_zero", "value_mean"), default="score", help="sinks")
    parser.add_argument("--eta", type=float, default=0.0, help="sinks, score path: the keys' probability factor")
    parser.add_argument("--dose", choices=DOSES, default=DOSES[0],
                        help="sinks, score path: how eta applies (redistribute: the paper's; renormalise: the old rule)")
    parser.add_argument("--layer", nargs="+", default=["all"], help="sinks: attention module paths, or 'all'")


def sweep(args: argparse.Namespace) -> int:
    """`mabook sweep`: load the model on this process's device, run the shards, merge and write on the main process."""
    from PIL import Image

    from mabook import discovery, disruption
    from mabook import sinks as sinks_mod
    from mabook.sweep import DEFAULTS, EXIT_STOPPED, Stopped, check_experiment, check_shard_dir, process_device, process_state, run

    check_experiment(args.experiment)
    defaults = DEFAULTS[args.experiment]
    for name in ("prompts", "batch_size", "k", "n_random"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    prompts = read_prompts(args.prompts)
    _check_seeds(args.seeds)
    _check_positive(args, "num_inference_steps", "batch_size", *(("n_random",) if args.n_random is not None else ()))
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.experiment == "discover" and len(args.k) != 1:
        raise ValueError(f"discover takes one --k (channels per set in the top-k table), got {args.k}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is an existing file; allowed: a directory (created if missing)")
    shards = check_shard_dir(args.shards or out / "shards")
    state = process_state(args.device)
    args.device = process_device(state, args.device)
    pipe, adapter = _load(args)
    started = time.perf_counter()
    try:
        result = run(args.experiment, adapter, prompts, shards, seeds=args.seeds, num_inference_steps=args.num_inference_steps,
                     batch_size=args.batch_size, seed=args.seed, cfg=args.cfg,
                     k=args.k[0] if args.experiment == "discover" else args.k, kinds=args.kinds,
                     n_random=args.n_random, op=args.op, value=args.value, windows=args.windows, path=args.path,
                     eta=args.eta, dose=args.dose, layers=args.layer, stop_after=args.stop_after, state=state)
    except Stopped as e:
        print(f"mabook sweep: process {state.process_index}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    if result is None:  # not the main process: its shards are written
        return 0
    out.mkdir(parents=True, exist_ok=True)
    c = result.counts
    settings = _settings(args, prompts=prompts, seconds=result.seconds, processes=state.num_processes,
                             shards=str(shards))
    sweep_info = {"processes": state.num_processes, "shards": c.total, "reused": c.reused, "computed": c.computed,
                  "main_compute_seconds": c.compute_seconds, "main_io_seconds": c.io_seconds,
                  "seconds": time.perf_counter() - started}
    provenance = _provenance(args, pipe)
    line = (f"{args.experiment}: {c.total} shards ({c.reused} reused, {c.computed} computed) on {state.num_processes} "
            f"process(es) in {result.seconds:.1f} s -> {out}")
    if args.experiment == "discover":
        reports = discovery.massive_channels(result.stats, args.k[0], stream="img", seed=args.seed)
        rows = discovery.table(reports)
        result.stats.save(out / "stats.safetensors")
        _write_csv(out / "topk.csv", [{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()}
                                          for r in rows])
        files.write_json(out / "topk.json", {"settings": settings, **provenance, "sweep": sweep_info, "layers": rows})
        print(line)
        print(f"{'tap':36s} {'top-k':24s} {'ratio':>8s} {'max|x|':>9s} {'sun':>4s}")
        for r in reports:
            print(f"{r.tap:36s} {str(r.top):24s} {r.ratio_to_median:8.1f} {r.max_abs:9.2f} {'yes' if r.sun_massive else 'no':>4s}")
        return 0
    # disrupt / sinks: the table, the baselines' statistics, the summary (CIs computed once, here) and the grid
    table, k = result.table, max(args.k)
    _write_csv(out / "table.csv", table)
    result.stats.save(out / "baseline_stats.safetensors")
    summary = {"settings": settings, **provenance, "sweep": sweep_info, "summary": disruption.summary(table)}
    if args.experiment == "disrupt":
        summary["paired_ratios"] = disruption.paired_ratios(table, op=args.op)
        summary["decomposition"] = disruption.decomposition(result.base, disruption.channel_set(result.stats, k, "top"))
        names = ["baseline"] + [n for n in result.images if n.startswith((f"top-{k} ", f"bottom_abs_mean-{k} ",
                                                                           f"bottom_rms-{k} ", f"random-{k}#"))][:4]
        ratio_line = "k={k:<3d} top / {control:16s} pixel MSE {top_damage:.4f} / {control_damage:.4f} = {ratio:.2f}x"
    else:
        summary["paired_ratios"] = sinks_mod.paired_ratios(table, "pixel_mse")
        names = ["baseline"] + [next(n for n in result.images if n.startswith((f"{keys}-{k} ", f"{keys}-{k}#")))
                                for keys in ("sink", "random", "bottom")]
        ratio_line = "k={k:<3d} sink / {control:6s} pixel MSE {sink_damage:.4f} / {control_damage:.4f} = {ratio:.2f}x"
    summary["table"] = table
    mosaic, names = disruption.grid(result.result(), names)
    _save_png(Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST), out / "grid.png")
    files.write_json(out / "summary.json", summary)  # last: a complete summary means a complete sweep
    print(line)
    for r in summary["paired_ratios"]:
        print(ratio_line.format(**r) + f" (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})")
    return 0


def _generation_parser(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A verb that generates (prompt, seed) units: the arguments every such verb shares."""
    v = commands.add_parser(name, help=help)
    v.add_argument("--model", default="organism", help="'organism', a hub id or a local pipeline directory")
    v.add_argument("--checkpoint", default=None, help="organism only: a checkpoint other than the committed one")
    v.add_argument("--prompts", nargs="+", default=["8"], help="a file, an integer N, or prompts (default: 8)")
    v.add_argument("--seeds", type=int, nargs="+", default=[0])
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--num-inference-steps", type=int, default=20)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtype", choices=DTYPES, default="float32")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported as the one line every other error is."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


DEBUG_HELP = "on an error, show the full traceback instead of one line"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mabook", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("discover", help="find massive channels: statistics + top-k table")
    d.add_argument("--model", default="organism", help="'organism', a hub id or a local pipeline directory")
    d.add_argument("--checkpoint", default=None, help="organism only: a checkpoint other than the committed one")
    d.add_argument("--prompts", nargs="+", default=["16"], help="a file, an integer N, or prompts (default: 16)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--k", type=int, default=4, help="channels per set (top, bottom, random)")
    d.add_argument("--num-inference-steps", type=int, default=20)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--cfg", choices=("cond", "uncond", "both"), default="cond", help="which half of a guidance batch")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", choices=DTYPES, default="float32")
    d.set_defaults(func=discover)

    r = _generation_parser(commands, "disrupt", "edit top-k vs control channels during generation; table of what changes")
    r.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="channel-set sizes")
    r.add_argument("--kinds", nargs="+", default=["top", "bottom_abs_mean", "bottom_rms", "random"],
                   choices=["top", "bottom_abs_mean", "bottom_rms", "random"])
    r.add_argument("--n-random", type=int, default=5, help="seeded random sets per k")
    r.add_argument("--op", default="zero", help="zero, mean, token_mean or scale")
    r.add_argument("--value", type=float, default=None, help="the factor of --op scale")
    r.add_argument("--windows", action="store_true", help="also zero the largest k in each layer x step window")
    r.set_defaults(func=disrupt)

    c = _generation_parser(commands, "cluster", "K-means masks from one tap and step (mask PNGs, IoU JSON)")
    c.add_argument("--tap", default=None, help="an image tap, e.g. single_transformer_blocks.1.img (default: the middle one)")
    c.add_argument("--step", type=int, default=None, help="denoising step (default: the middle one)")
    c.add_argument("--k", type=int, default=2, help="K, the number of K-means clusters")
    c.add_argument("--n-channels", type=int, default=4, help="channels in the set (the top-k massive by default)")
    c.add_argument("--kind", default="top", help="channel set: top, bottom_abs_mean, bottom_rms, random or all")
    c.add_argument("--seed", type=int, default=0, help="K-means and random-set seed")
    c.set_defaults(func=cluster)

    s = _generation_parser(commands, "sinks", "find attention sinks; suppress them vs equal-budget random and bottom keys")
    s.add_argument("--k", type=int, nargs="+", default=[1, 2, 5, 10], help="keys suppressed per (sample, head)")
    s.add_argument("--top", type=int, default=3, help="sinks listed per (layer, step, head) in sinks.csv")
    s.add_argument("--path", choices=("score", "value_zero", "value_mean"), default="score")
    s.add_argument("--eta", type=float, default=0.0, help="score path: the chosen keys' probability factor, in [0, 1]")
    s.add_argument("--dose", choices=DOSES, default=DOSES[0],
                   help="score path, how eta applies: redistribute (the paper's: a chosen key keeps eta * p, the others "
                        "absorb the rest in proportion) or renormalise (multiply by eta, renormalise the row)")
    s.add_argument("--layer", nargs="+", default=["all"], help="attention module paths, or 'all' (default)")
    s.add_argument("--n-random", type=int, default=3, help="seeded random key sets per k")
    s.set_defaults(func=sinks)

    t = _generation_parser(commands, "transport", "copy top-k channels of a source generation into a target; alpha strip")
    t.add_argument("--source", default=None, help="the source prompt (or --reference)")
    t.add_argument("--reference", default=None, metavar="IMG",
                   help="instead of --source: an RGB image of the generation's size (organism: 32x32), inverted")
    t.add_argument("--trajectory", choices=("invert", "noise"), default="invert",
                   help="with --reference: flow-matching inversion, or noising to each step's level (first --seeds)")
    t.add_argument("--resize", action="store_true", help="with --reference: resize / convert it to the generation's RGB size")
    t.add_argument("--target", required=True, help="the target prompt (same seed: same noise)")
    t.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    t.add_argument("--k", type=int, default=16, help="top-k channels per tap by |mean| (0: all channels)")
    t.add_argument("--stream", choices=("img", "txt", "both"), default="img")
    t.add_argument("--mask", choices=("none", "source", "target", "union"), default="none",
                   help="transport only inside the source's, the target's or both K-means foregrounds (chapter 3)")
    t.add_argument("--mask-tap", default=None, help="image tap the mask is clustered at (default: the middle one)")
    t.add_argument("--mask-step", type=int, default=None, help="step the mask is clustered at (default: the middle one)")
    t.add_argument("--mask-channels", type=int, default=4, help="the mask clusters the top-N channels (default 4)")
    t.add_argument("--window", choices=("all", "early", "mid", "late"), default="all", help="the steps transported (thirds)")
    t.add_argument("--conditioning", choices=("auto", "on", "off"), default="auto",
                   help="also transport the AdaLN conditioning (auto: with all channels, --k 0, only)")
    t.add_argument("--baselines", action="store_true",
                   help="also pixel blend and (organism) text-embedding blend at each alpha: rows of the strip and table")
    t.set_defaults(func=transport)

    from mabook.sweep import EXPERIMENTS

    w = commands.add_parser("sweep", help=f"run {', '.join(EXPERIMENTS)} as shards over accelerate's processes; merge")
    _sweep_arguments(w)
    w.set_defaults(func=sweep)
    for verb in commands.choices.values():  # --debug after the verb too (SUPPRESS: never resets the top-level flag)
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


# Bad input, as our checks raise it: a bad value (ValueError, TypeError, KeyError), a missing or
# unreadable file or a model that cannot be loaded (OSError: FileNotFoundError, models.ModelNotFoundError).
BAD_INPUT = (ValueError, TypeError, KeyError, OSError)


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        text = f"unknown key {error.args[0]!r}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """The `mabook` command: 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.command_line = files.command_line(argv, "mabook")
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mabook {args.command}: interrupted; every file already in --out is complete (written atomically)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except BAD_INPUT as e:  # bad input: one line, no traceback
        print(f"mabook {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
