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

--prompts is a text file (one prompt per line), an integer N (N held-out captions of the shapes
world, for the organism), or the prompts themselves.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def read_prompts(values: list[str]) -> list[str]:
    """File path -> its non-empty lines; a single integer N -> N held-out world captions; else the values."""
    if len(values) == 1 and Path(values[0]).is_file():
        prompts = [line.strip() for line in Path(values[0]).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {values[0]} has no non-empty lines")
        return prompts
    if len(values) == 1 and values[0].isdigit():
        from mabook import world

        n = int(values[0])
        if n < 1:
            raise ValueError(f"--prompts N must be >= 1, got {n}")
        return world.heldout_captions(n, n_objects=1, seed=0)
    return values


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV; the columns are every key any row has (baseline rows lack some), in first-seen order."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)


def discover(args: argparse.Namespace) -> int:
    import torch

    import mabook
    from mabook import discovery

    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. load
    pipe, adapter = mabook.load(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                **({"path": args.checkpoint} if args.checkpoint else {}))
    if pipe is None:
        raise SystemExit(f"{args.model} holds only a transformer; `discover` needs a pipeline")
    pipe.set_progress_bar_config(disable=True)
    discovery.check_k(args.k, adapter.width)  # fail before generating, not after
    # 2. generate and keep statistics only
    start = time.perf_counter()
    stats = discovery.collect_statistics(adapter, prompts, args.num_inference_steps, args.seed, args.batch_size, cfg=args.cfg)
    seconds = time.perf_counter() - start
    # 3. rank channels per layer, pooled over steps
    reports = discovery.massive_channels(stats, args.k, stream="img", seed=args.seed)
    rows = discovery.table(reports)
    stats.save(out / "stats.safetensors")
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"prompts": prompts, "seconds": seconds}
    (out / "topk.json").write_text(json.dumps({"settings": settings, "layers": rows}, indent=1) + "\n")
    _write_csv(out / "topk.csv", [{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in rows])
    # 4. summary
    print(f"{len(prompts)} prompts x {args.num_inference_steps} steps in {seconds:.1f} s -> {out}")
    print(f"{'tap':36s} {'top-k':24s} {'ratio':>8s} {'max|x|':>9s} {'sun':>4s}")
    for r in reports:
        print(f"{r.tap:36s} {str(r.top):24s} {r.ratio_to_median:8.1f} {r.max_abs:9.2f} {'yes' if r.sun_massive else 'no':>4s}")
    return 0


def _load(args):
    import torch

    import mabook

    pipe, adapter = mabook.load(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                **({"path": args.checkpoint} if args.checkpoint else {}))
    if pipe is None:
        raise ValueError(f"{args.model} holds only a transformer; `{args.command}` needs a pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def disrupt(args: argparse.Namespace) -> int:
    from PIL import Image

    from mabook import discovery, disruption

    prompts = read_prompts(args.prompts)
    pipe, adapter = _load(args)
    for k in args.k:
        discovery.check_k(k, adapter.width)  # fail before generating, not after
    if args.op not in disruption.OPS:
        raise ValueError(f"unknown --op {args.op!r}; allowed: {list(disruption.OPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"prompts": prompts, "seconds": seconds}
    checkpoint = getattr(pipe, "card", {}).get("sha256")
    summary = {"settings": settings, "checkpoint_sha256": checkpoint,
               "summary": disruption.summary(table), "paired_ratios": disruption.paired_ratios(table, op=args.op),
               "decomposition": disruption.decomposition(base, top), "table": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    k = max(args.k)
    names = ["baseline"] + [n for n in result.images if n.startswith((f"top-{k} ", f"bottom_abs_mean-{k} ",
                                                                       f"bottom_rms-{k} ", f"random-{k}#"))][:4]
    mosaic, names = disruption.grid(result, names)
    Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST).save(out / "grid.png")
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

    from mabook import spatial, world

    prompts = read_prompts(args.prompts)
    pipe, adapter = _load(args)
    # 1. check everything before generating
    tap = spatial.image_tap(adapter, args.tap)
    step = args.num_inference_steps // 2 if args.step is None else args.step
    if not 0 <= step < args.num_inference_steps:
        raise ValueError(f"step {step} never runs: --num-inference-steps {args.num_inference_steps} runs steps "
                         f"0..{args.num_inference_steps - 1}")
    h, w = adapter.grid()
    spatial.check_clusters(args.k, h * w)
    if args.kind not in spatial.KINDS:
        raise ValueError(f"unknown --kind {args.kind!r}; allowed: {list(spatial.KINDS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 2. generate once, keeping the hidden states at (tap, step)
    start = time.perf_counter()
    cap = spatial.capture(adapter, prompts, args.seeds, args.num_inference_steps, taps=[tap], steps=[step],
                          batch_size=args.batch_size)
    sets = spatial.channel_sets(cap.stats, args.n_channels, [args.kind], n_random=1, seed=args.seed)
    name, spec = next(iter(sets.items()))
    channels = spec["channels"][tap]
    # 3. masks: matched to the objects for world captions, else the smallest cluster is the foreground
    try:
        for p in prompts:
            world.parse_caption(p)
        judged = True
    except ValueError:
        judged = False
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
    Image.fromarray(grid_image).resize((grid_image.shape[1] * scale, grid_image.shape[0] * scale), Image.NEAREST).save(out / "masks.png")
    for u in range(len(cap.units)):
        Image.fromarray((spatial.upsample(fg[u], size) * 255).astype(np.uint8)).save(out / f"mask_{u:02d}.png")
    # 4. IoU against the caption's rendering and the judge's mask of the generated image
    rows, summary = [], {}
    if judged:
        rows = spatial.measure(cap, {name: spec}, [tap], [step], [args.k], thresholds=(), chance=False, seed=args.seed)
        for source in spatial.SOURCES:
            (s,) = spatial.summary(rows, by=("set",), source=source)
            summary[source] = {m: s[m] for m in ("token_iou", "pixel_iou", "object_iou")} | {
                f"{m}_ci": s[f"{m}_ci"] for m in ("token_iou", "pixel_iou", "object_iou")} | {"n_units": s["n_units"]}
    seconds = time.perf_counter() - start
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"prompts": prompts, "tap": tap, "step": step,
                                                                       "seconds": seconds}
    payload = {"settings": settings, "checkpoint_sha256": getattr(pipe, "card", {}).get("sha256"), "set": name,
               "channels": channels, "grid": list(cap.grid), "summary": summary, "rows": rows}
    (out / "iou.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
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

    prompts = read_prompts(args.prompts)
    pipe, adapter = _load(args)
    # 0. fail before generating, not after: every intervention is built (and checked) up front
    layers = None if args.layer == ["all"] else args.layer
    conds = [attention.KeyIntervention(keys, k, args.path, args.eta, layers, seed=seed)
             for k in args.k for keys in ("sink", "bottom", "random")
             for seed in (range(args.n_random) if keys == "random" else [0])]
    attention.intervene(adapter, conds[0])  # validates the layers and the family (nothing swapped yet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # 1. baselines once per (prompt, seed), with the attention mass captured; 2. each intervention
    with attention.capture(adapter) as cap:
        base = disruption.baseline(adapter, prompts, args.seeds, args.num_inference_steps, args.batch_size)
    result = attention.run(base, conds, args.batch_size)
    seconds = time.perf_counter() - start
    # 3. write the sink tables, the intervention table, the summary and the grid
    _write_csv(out / "sinks.csv", attention.sinks(cap, args.top))
    _write_csv(out / "movement.csv", attention.movement(cap, args.top))
    _write_csv(out / "mass_by_kind.csv", attention.mass_by_kind(cap))
    _write_csv(out / "table.csv", result.table)
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"prompts": prompts, "seconds": seconds}
    ratios = attention.paired_ratios(result.table, "pixel_mse")
    summary = {"settings": settings, "checkpoint_sha256": getattr(pipe, "card", {}).get("sha256"),
               "summary": disruption.summary(result.table), "paired_ratios": ratios,
               "mass_by_kind": attention.mass_by_kind(cap), "table": result.table}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    k = max(args.k)
    names = ["baseline"] + [next(n for n in result.images if n.startswith((f"{keys}-{k} ", f"{keys}-{k}#")))
                            for keys in ("sink", "random", "bottom")]
    mosaic, names = disruption.grid(result, names)
    Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST).save(out / "grid.png")
    # 4. print where the sinks sit and the paired ratios
    rows = attention.mass_by_kind(cap)
    share = {kind: sum(r[kind] for r in rows) / len(rows) for kind in ("text", "pad", "image")}
    print(f"{len(base.units)} units x {len(conds)} conditions x {args.num_inference_steps} steps in {seconds:.1f} s -> {out}")
    print("attention mass over image queries, mean over layers, steps, heads: "
          + ", ".join(f"{kind} {v:.3f}" for kind, v in share.items()))
    for r in ratios:
        print(f"k={r['k']:<3d} sink / {r['control']:6s} pixel MSE {r['sink_damage']:.4f} / {r['control_damage']:.4f} = "
              f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})")
    return 0


def transport(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from mabook import disruption, probe
    from mabook import transport as transport_mod

    for a in args.alpha:
        transport_mod._check_alpha(a)  # fail before generating, not after
    if args.k < 0:
        raise ValueError(f"--k must be >= 0 (0 = all channels), got {args.k}")
    pipe, adapter = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # 1. the channel set: top-k by |mean| over the source and target generations (both guidance halves)
    streams = ["img", "txt"] if args.stream == "both" else [args.stream]
    taps = [str(t) for t in probe.taps(adapter, streams)]
    if args.k == 0:
        channels = "all"
    else:
        with probe.collect(adapter, taps=taps, cfg="both") as run:
            disruption._generate(adapter, [(args.source, s) for s in args.seeds] + [(args.target, s) for s in args.seeds],
                                 args.num_inference_steps, args.batch_size, {})
        channels = {}
        for stream in streams:
            channels |= disruption.channel_set(run.stats, args.k, "top", stream=stream)
    # 2. record the source once, 3. transport at every alpha (the unedited target generated once)
    rec = transport_mod.record(adapter, [args.source], args.seeds, taps=taps, channels=channels,
                               num_inference_steps=args.num_inference_steps, batch_size=args.batch_size)
    targets, rows, strip = [args.target] * len(rec.units), [], []
    target_images = None
    for a in args.alpha:
        result = transport_mod.transport(rec, targets, a, stream=args.stream, batch_size=args.batch_size,
                                         target_images=target_images)
        target_images = result.target
        rows += result.table
        strip.append(result.images)
    seconds = time.perf_counter() - start
    # 4. the strip (rows: source, each alpha, target; columns: seeds) and the JSON
    rows_of = {"source": rec.images, **{f"alpha={a:g}": im for a, im in zip(args.alpha, strip)}, "target": target_images}
    mosaic, _ = disruption.grid(disruption.Result([], rows_of, []))
    Image.fromarray(mosaic).resize((mosaic.shape[1] * 4, mosaic.shape[0] * 4), Image.NEAREST).save(out / "strip.png")
    settings = {k: v for k, v in vars(args).items() if k != "func"} | {"seconds": seconds, "recorded_bytes": rec.nbytes}
    summary = {"settings": settings, "checkpoint_sha256": getattr(pipe, "card", {}).get("sha256"),
               "columns": ["source", *[f"alpha={a:g}" for a in args.alpha], "target"], "table": rows}
    (out / "transport.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"{len(rec.units)} seeds x {len(args.alpha)} alphas, k={args.k or 'all'} ({args.stream}), "
          f"{args.num_inference_steps} steps in {seconds:.1f} s; recorded {rec.nbytes / 2**10:.1f} KiB -> {out}")
    for a in args.alpha:
        r = [x for x in rows if x["alpha"] == a]
        attrs = ("color", "shape", "size", "position")
        took = [np.mean([x[f"took_source_{k}"] for k in attrs if x.get(f"differs_{k}")] or [np.nan])
                for x in r if "took_source_color" in x]
        line = f"alpha={a:<5g} pixel MSE vs target {np.mean([x['pixel_mse'] for x in r]):.4f}"
        if took:
            line += f"; took the source's differing attributes {np.nanmean(took):.2f}"
        print(line)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mabook", description=__doc__.splitlines()[0])
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
    s.add_argument("--layer", nargs="+", default=["all"], help="attention module paths, or 'all' (default)")
    s.add_argument("--n-random", type=int, default=3, help="seeded random key sets per k")
    s.set_defaults(func=sinks)

    t = _generation_parser(commands, "transport", "copy top-k channels of a source generation into a target; alpha strip")
    t.add_argument("--source", required=True, help="the source prompt")
    t.add_argument("--target", required=True, help="the target prompt (same seed: same noise)")
    t.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    t.add_argument("--k", type=int, default=16, help="top-k channels per tap by |mean| (0: all channels)")
    t.add_argument("--stream", choices=("img", "txt", "both"), default="img")
    t.set_defaults(func=transport)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad input: one line, no traceback
        print(f"mabook {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
