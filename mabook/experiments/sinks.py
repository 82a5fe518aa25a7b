"""`mabook sinks`: where the attention sinks sit, and sinks suppressed vs count- and mass-matched controls (chapter 6).

Writes into --out: sinks.csv (top keys per (layer, step, head) of the baselines: where each sink
sits -- text, pad, image and its grid row/col -- and its mass), movement.csv (per (layer, head): how
often the top-1 sink stays put between steps), mass_by_kind.csv (per (layer, step, head): mass on
text, pad and image keys), table.csv (one row per (prompt, seed, condition): pixel MSE, MAE and
SSIM to the unit's baseline, the judge's reading on organism captions, and with --metrics lpips
clip-t on a real model the paper's LPIPS to the baseline and CLIP-T to the prompt; and the mass the
intervention's keys held in that unit's generation: mass_removed, sink_mass, keys_used), grid.png
(baseline / sink / controls at the largest k) and summary.json (settings, provenance, the networks
of the perceptual metrics ("metric_models"), means with bootstrap 95 % CIs, paired sink/control
ratios -- of pixel MSE, and of LPIPS when asked ("paired_ratios_perceptual": the paper's ~6x is one
of these, on SD3) --, the mass each intervention removed against the sinks' ("mass_removed",
`sinks.mass_removed`), the mass by kind, the table; written last). The controls (--controls):
"random" (k random keys: matched on count), "bottom" (the k lowest-mass keys) and "random-mass"
(random keys drawn until they hold the sinks' mass: matched on mass, `sinks.MassMatched`), all three
by default. The baselines' attention mass is captured in their shards, so a sweep writes
the same files. (sinks.csv and movement.csv read the mass averaged over the units; chapter 6 reads
each sample's own, `sink_samples.capture_samples`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mabook import attention, disruption, files, images, sinks, sweep
from mabook.config import Scored, check_positive, option


@dataclass
class Config(Scored):
    NAME: ClassVar[str] = "sinks"
    CAPTURE_ATTENTION: ClassVar[bool] = True  # the baselines' shards keep their attention mass

    k: list = option([1, 2, 5, 10], "keys suppressed per (sample, head)")
    top: int = option(3, "sinks listed per (layer, step, head) in sinks.csv")
    path: str = option("score", "score, value_zero or value_mean", choices=attention.PATHS)
    eta: float = option(0.0, "score path: the chosen keys' probability factor, in [0, 1]")
    dose: str = option(attention.DOSES[0], "score path, how eta applies: redistribute (the paper's: a chosen key keeps "
                       "eta * p, the others absorb the rest in proportion) or renormalise (multiply by eta, renormalise "
                       "the row)", choices=attention.DOSES)
    layer: list = option(["all"], "attention module paths, or 'all'")
    n_random: int = option(3, "seeded random key sets per k (of each random control)")
    controls: list = option(list(sinks.CONTROLS), "the controls beside the sinks: random (k random keys, matched on "
                            "count), bottom (the k lowest-mass keys), random-mass (random keys holding the sinks' attention "
                            f"mass, within {sinks.MASS_TOLERANCE:.0%}: matched on mass, as chapter 6's big run)",
                            choices=sinks.CONTROLS)

    def check(self) -> None:
        super().check()
        check_positive(self, "top", "n_random")
        if "random-mass" in self.controls and self.path == "score" and self.dose == "redistribute" and 0 < self.eta < 1:
            raise ValueError(f"--controls random-mass (a default) needs --eta 0 or 1 under --dose redistribute, got --eta "
                             f"{self.eta:g}; allowed: --dose renormalise, a value --path, or --controls random bottom")
        self.conditions(None)  # builds (and so checks) every intervention

    def check_adapter(self, adapter) -> None:
        attention.intervene(adapter, self.conditions(None)[0])  # the layers and the family; nothing swapped yet

    def conditions(self, base) -> list[attention.KeyIntervention]:
        layers = None if self.layer in (["all"], "all") else self.layer
        return sinks.interventions(self.k, self.path, self.eta, layers, self.n_random, self.dose, self.controls)

    def apply(self, base: disruption.Baseline, conditions, batch_size: int, keep_images: int) -> disruption.Result:
        return sinks.run(base, conditions, batch_size, keep_images=keep_images)


def run(config: Config, adapter, shards=None, **sweep_kwargs) -> sweep.SweepResult:
    """Baselines (attention mass captured), then every intervention (`sweep.run`: one process unless launched)."""
    config.check_adapter(adapter)
    return sweep.run(config, adapter, shards, **sweep_kwargs)


def write(config: Config, result: sweep.SweepResult, out: Path, record: dict) -> list[str]:
    cap, table, k = result.capture, result.table, max(config.k)
    by_kind = sinks.mass_by_kind(cap)
    files.write_csv(out / "sinks.csv", sinks.sinks(cap, config.top))
    files.write_csv(out / "movement.csv", sinks.movement(cap, config.top))
    files.write_csv(out / "mass_by_kind.csv", by_kind)
    files.write_csv(out / "table.csv", table)
    result.stats.save(out / "baseline_stats.safetensors")
    ratios = sinks.paired_ratios(table, "pixel_mse")
    perceptual = {"lpips": sinks.paired_ratios(table, "lpips")} if "lpips" in table[0] else {}
    removed = sinks.mass_removed(table)
    summary = {**record, "metric_models": result.base.metric_models, "summary": disruption.summary(table),
               "paired_ratios": ratios, "paired_ratios_perceptual": perceptual, "mass_removed": removed,
               "mass_tolerance": sinks.MASS_TOLERANCE, "mass_by_kind": by_kind, "table": table}
    names = ["baseline"] + [next(n for n in result.images if n.startswith((f"{keys}-{k} ", f"{keys}-{k}#")))
                            for keys in ("sink", *sorted(dict.fromkeys(config.controls)))]
    mosaic, names = disruption.grid(result.result(), names)
    images.save(mosaic, out / "grid.png")
    files.write_json(out / "summary.json", summary)  # last: a complete summary means a complete run
    share = {kind: sum(r[kind] for r in by_kind) / len(by_kind) for kind in ("text", "pad", "image")}
    return ["attention mass over image queries, mean over layers, steps, heads: "
            + ", ".join(f"{kind} {v:.3f}" for kind, v in share.items())] + [
        f"k={r['k']:<3d} sink / {r['control']:11s} pixel MSE {r['sink_damage']:.4f} / {r['control_damage']:.4f} = "
        f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})" for r in ratios] + [
        f"k={r['k']:<3d} sink / {r['control']:11s} LPIPS     {r['sink_damage']:.4f} / {r['control_damage']:.4f} = "
        f"{r['ratio']:.2f}x (95% CI {r['ci'][0]:.2f}-{r['ci'][1]:.2f})" for r in perceptual.get("lpips", [])] + [
        f"k={r['k']:<3d} {r['kind']:11s} mass removed {r['mass_removed']:.4f} = {r['vs_sink']:.2f}x the sinks' "
        f"({r['keys']:.1f} keys per head)" for r in removed if r["kind"] != "sink" and "vs_sink" in r]
