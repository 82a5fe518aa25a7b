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
    with open(out / "topk.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in rows)
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
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
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

    r = commands.add_parser("disrupt", help="edit top-k vs control channels during generation; table of what changes")
    r.add_argument("--model", default="organism", help="'organism', a hub id or a local pipeline directory")
    r.add_argument("--checkpoint", default=None, help="organism only: a checkpoint other than the committed one")
    r.add_argument("--prompts", nargs="+", default=["8"], help="a file, an integer N, or prompts (default: 8)")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="channel-set sizes")
    r.add_argument("--kinds", nargs="+", default=["top", "bottom_abs_mean", "bottom_rms", "random"],
                   choices=["top", "bottom_abs_mean", "bottom_rms", "random"])
    r.add_argument("--n-random", type=int, default=5, help="seeded random sets per k")
    r.add_argument("--op", default="zero", help="zero, mean, token_mean or scale")
    r.add_argument("--value", type=float, default=None, help="the factor of --op scale")
    r.add_argument("--windows", action="store_true", help="also zero the largest k in each layer x step window")
    r.add_argument("--num-inference-steps", type=int, default=20)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", choices=DTYPES, default="float32")
    r.set_defaults(func=disrupt)
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
