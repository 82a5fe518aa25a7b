"""`mabook disrupt`: edit the top-k channels vs equal-size controls during generation (chapter 2).

The channel sets and the edits' values (dataset means, energy) come from the baselines of held-out
prompts (--selection-prompts; 'same': from the evaluated units). Writes into --out: table.csv (one
row per (prompt, seed, condition): the judge's attributes, cleanliness, mask IoU (organism captions),
pixel MSE, MAE and SSIM to the unit's baseline, and with --metrics lpips clip-t on a real model LPIPS
to it and CLIP-T to the prompt), baseline_stats.safetensors (the evaluated baselines' statistics),
grid.png (baseline / top-k / controls at the largest k) and summary.json (settings, provenance, the
networks of the perceptual metrics ("metric_models"), means with bootstrap 95 % CIs, the paired
top/control ratios -- of pixel MSE, and of LPIPS when asked ("paired_ratios_perceptual") --, the
prompt-vs-timestep split of the top channels, the table; written last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mabook import discovery, disruption, files, images, sweep
from mabook.config import Scored, check_choice, check_positive, option, read_prompts


@dataclass
class Config(Scored):
    NAME: ClassVar[str] = "disrupt"

    k: list = option(list(disruption.DEFAULT_KS), "channel-set sizes")
    kinds: list = option(list(disruption.KINDS), "the channel sets: top and its controls", choices=disruption.KINDS)
    n_random: int = option(5, "seeded random sets per k")
    op: str = option("zero", f"the edit: {', '.join(disruption.OPS)}")
    value: float | None = option(None, "the factor of --op scale", type=float)
    windows: bool = option(False, "also zero the largest k in each layer x step window", flag=True)
    selection_prompts: list = option(["8"], "held-out prompts whose baselines choose the channel sets and the edits' "
                                     "values: a file, the prompts, an integer N (the N held-out captions after "
                                     "--prompts' own), or 'same' (choose on the evaluated units, as before 2026-12-02)")

    def check(self) -> None:
        super().check()
        if self.selection_list is not None:
            disruption.check_selection(self.prompt_list, self.selection_list)
        check_choice(self, "op", disruption.OPS)
        if self.op == "scale" and self.value is None:
            raise ValueError("--op scale needs --value (the factor), e.g. --value 0.5")
        check_choice(self, "kinds", disruption.KINDS)
        if "random" in self.kinds:
            check_positive(self, "n_random")

    @property
    def selection_list(self) -> list[str] | None:
        """The selection prompts (`read_prompts`, integers counted after --prompts'); None for 'same'."""
        if self.selection_prompts == ["same"]:
            return None
        return read_prompts(self.selection_prompts, skip=len(self.prompt_list))

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
    if result.base.selection is not None:
        result.base.selection.save(out / "selection_stats.safetensors")
    ratios = disruption.paired_ratios(table, op=config.op)
    selection = {"prompts": config.selection_list, "seeds": config.seeds} if config.selection_list else "same"
    perceptual = {"lpips": disruption.paired_ratios(table, "lpips", op=config.op)} if "lpips" in table[0] else {}
    summary = {**record, "metric_models": result.base.metric_models, "selection": selection,
               "summary": disruption.summary(table), "paired_ratios": ratios, "paired_ratios_perceptual": perceptual,
               "decomposition": disruption.decomposition(result.base, disruption.channel_set(result.base.selector, k, "top")),
               "table": table}
    names = ["baseline"] + [next(n for n in result.images if n.startswith((f"{kind}-{k} ", f"{kind}-{k}#")))
                            for kind in config.kinds]  # one row per kind (the first random / energy draw)
    mosaic, names = disruption.grid(result.result(), names)
    images.save(mosaic, out / "grid.png")
    files.write_json(out / "summary.json", summary)  # last: a complete summary means a complete run
    return [f"grid rows: {', '.join(names)}"] + [
        f"k={r['k']:<3d} top / {r['control']:16s} pixel MSE {r['top_damage']:.4f} / {r['control_damage']:.4f} = "
        f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})" for r in ratios] + [
        f"k={r['k']:<3d} top / {r['control']:16s} LPIPS     {r['top_damage']:.4f} / {r['control_damage']:.4f} = "
        f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})" for r in perceptual.get("lpips", [])]
