"""Command line: `mabook discover --model organism --prompts 16 --out runs/discovery`.

Writes, into --out:
  stats.safetensors  the streaming statistics (`mabook.probe.Statistics.load` reads it back)
  topk.json          run settings and one row per layer (top-k, controls, ratios, Sun criterion)
  topk.csv           the same rows as a table

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
