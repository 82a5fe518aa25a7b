"""`mabook discover`: find the massive channels -- the streaming statistics and the top-k table (chapter 1).

Writes into --out: stats.safetensors (`statistics.Statistics.load` reads it back), topk.csv (one row
per layer: top-k, controls, ratios, the LayerNorm share, Sun's criterion) and topk.json (settings,
provenance and the same rows; written last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mabook import discovery, files, probe, sweep
from mabook.config import Generation, option


@dataclass
class Config(Generation):
    NAME: ClassVar[str] = "discover"

    prompts: list = option(["16"], "a file, an integer N (held-out captions), or the prompts themselves")
    batch_size: int = option(8, "images per pipeline call (one shard of a sweep)")
    k: int = option(4, "channels per set (top, bottom, random)")
    seed: int = option(0, "batch b is generated with generator seed SEED + b")
    cfg: str = option("cond", "which half of a guidance batch the statistics pool", choices=probe.CFG_MODES)

    def check(self) -> None:
        super().check()
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be a non-negative int, got {self.seed}")
        if isinstance(self.k, list):  # `mabook sweep` parses --k as a list for every experiment
            raise ValueError(f"discover takes one --k (channels per set in the top-k table), got {self.k}")
        probe.check_cfg(self.cfg)

    def check_adapter(self, adapter) -> None:
        discovery.check_k(self.k, adapter.width)


def run(config: Config, adapter, shards=None, **sweep_kwargs) -> sweep.SweepResult:
    """The statistics of every prompt (`sweep.run`: one shard per batch; one process unless launched)."""
    config.check_adapter(adapter)
    return sweep.run(config, adapter, shards, **sweep_kwargs)


def write(config: Config, result: sweep.SweepResult, out: Path, record: dict) -> list[str]:
    reports = discovery.massive_channels(result.stats, config.k, stream="img", seed=config.seed)
    rows = discovery.table(reports)
    result.stats.save(out / "stats.safetensors")
    files.write_csv(out / "topk.csv", [{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()}
                                       for r in rows])
    files.write_json(out / "topk.json", {**record, "layers": rows})  # last
    lines = [f"{'tap':36s} {'top-k':24s} {'ratio':>8s} {'max|x|':>9s} {'sun':>4s}"]
    lines += [f"{r.tap:36s} {str(r.top):24s} {r.ratio_to_median:8.1f} {r.max_abs:9.2f} {'yes' if r.sun_massive else 'no':>4s}"
              for r in reports]
    return lines
