"""`mabook disrupt`: edit the top-k channels vs equal-size controls during generation (chapter 2).

Writes into --out: table.csv (one row per (prompt, seed, condition): the judge's attributes,
cleanliness, mask IoU, pixel MSE and SSIM to the unit's baseline), baseline_stats.safetensors (the
baselines' statistics, which chose the channel sets), grid.png (baseline / top-k / controls at the
largest k) and summary.json (settings, provenance, means with bootstrap 95 % CIs, the paired
top/control ratios, the prompt-vs-timestep split of the top channels, the table; written last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mabook import discovery, disruption, files, images, sweep
from mabook.config import Units, check_choice, check_positive, option


@dataclass
class Config(Units):
    NAME: ClassVar[str] = "disrupt"

    k: list = option(list(disruption.DEFAULT_KS), "channel-set sizes")
    kinds: list = option(list(disruption.KINDS), "the channel sets: top and its controls", choices=disruption.KINDS)
    n_random: int = option(5, "seeded random sets per k")
    op: str = option("zero", f"the edit: {', '.join(disruption.OPS)}")
    value: float | None = option(None, "the factor of --op scale", type=float)
    windows: bool = option(False, "also zero the largest k in each layer x step window", flag=True)

    def check(self) -> None:
        super().check()
        check_choice(self, "op", disruption.OPS)
        if self.op == "scale" and self.value is None:
            raise ValueError("--op scale needs --value (the factor), e.g. --value 0.5")
        check_choice(self, "kinds", disruption.KINDS)
        if "random" in self.kinds:
            check_positive(self, "n_random")

    def check_adapter(self, adapter) -> None:
        for k in self.k:
            discovery.check_k(k, adapter.width)

    def conditions(self, base: disruption.Baseline) -> list[disruption.Condition]:
        """The edits, from the baselines' statistics: each kind at each k (and the windows)."""
        conds = disruption.conditions(base, self.k, self.kinds, self.n_random, self.op, self.value)
        if self.windows:
            conds += disruption.window_conditions(base, max(self.k), op=self.op)
        return conds

    def apply(self, base: disruption.Baseline, conditions, batch_size: int, keep_images: int) -> disruption.Result:
        return disruption.run(base, conditions, batch_size, keep_images=keep_images)


def run(config: Config, adapter, shards=None, **sweep_kwargs) -> sweep.SweepResult:
    """Baselines, then every condition (`sweep.run`: one process unless launched)."""
    config.check_adapter(adapter)
    return sweep.run(config, adapter, shards, **sweep_kwargs)


def write(config: Config, result: sweep.SweepResult, out: Path, record: dict) -> list[str]:
    table, k = result.table, max(config.k)
    files.write_csv(out / "table.csv", table)
    result.stats.save(out / "baseline_stats.safetensors")
    ratios = disruption.paired_ratios(table, op=config.op)
    summary = {**record, "summary": disruption.summary(table), "paired_ratios": ratios,
               "decomposition": disruption.decomposition(result.base, disruption.channel_set(result.stats, k, "top")),
               "table": table}
    names = ["baseline"] + [next(n for n in result.images if n.startswith((f"{kind}-{k} ", f"{kind}-{k}#")))
                            for kind in config.kinds]  # one row per kind (the first random / energy draw)
    mosaic, names = disruption.grid(result.result(), names)
    images.save(mosaic, out / "grid.png")
    files.write_json(out / "summary.json", summary)  # last: a complete summary means a complete run
    return [f"grid rows: {', '.join(names)}"] + [
        f"k={r['k']:<3d} top / {r['control']:16s} pixel MSE {r['top_damage']:.4f} / {r['control_damage']:.4f} = "
        f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})" for r in ratios]
