"""Chapter 6's sinks per generated sample, as the sinks paper computes them (`mabook.sinks` reads
the mass averaged over samples): where each sample's top key sits, how strong it is, how it moves.

`capture_samples(adapter)` keeps each generated sample's top keys beside `attention.capture`'s
averaged mass, `sample_statistics(cap, units)` gives one row per (unit, layer) and
`sample_summary(rows)` their means over units with bootstrap CIs over prompts.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import torch

from mabook import disruption
from mabook.attention import Capture
from mabook.models import Adapter
from mabook.stats import bootstrap_ci

SAMPLE_TOP = 3  # keys kept per (sample, layer, step, head) by capture_samples: movement's top-k sets
SAMPLE_METRICS = ("text", "pad", "image", "top1_mass", "top1_over_uniform", "top1_stays", "topk_jaccard", "top1_is_key0")


class SampleCapture(Capture):
    """An `attention.Capture` of the conditional samples (one per unit) that also keeps each
    sample's top-`top` keys and their mass at every captured (layer, step) and head (`top_keys`).

    Everything else is Capture's (the averaged `mass`, `keys`, ...), so the averaged views and the
    per-sample statistics (`sample_statistics`) come from one generation, the images unchanged.
    Memory: samples x layers x steps x heads x top x 8 bytes (FLUX.1-dev, 64 units, 28 steps,
    top 3: ~60 MB)."""

    def __init__(self, adapter: Adapter, layers=None, steps=None, top: int = SAMPLE_TOP, chunk_elements: int | None = None):
        super().__init__(adapter, layers, steps, "cond", chunk_elements)
        if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
            raise ValueError(f"top must be an int >= 1 (keys kept per sample and head), got {top!r}")
        self.top = int(top)
        self._tops: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _add(self, layer, layout, before, after, probs, hit) -> None:
        super()._add(layer, layout, before, after, probs, hit)
        t = before.topk(min(self.top, before.shape[-1]), dim=-1)
        self._tops.setdefault((layer, self.step), []).append((t.values.float().cpu(), t.indices.int().cpu()))

    def top_keys(self, layer: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mass, keys), each (samples, heads, top), largest first: every captured sample's top keys
        at (layer, step), in generation order (the units' order under `disruption.baseline`)."""
        self._check(layer, step)
        values, indices = zip(*self._tops[(layer, step)])
        return torch.cat(values), torch.cat(indices).long()


def capture_samples(adapter: Adapter, layers: str | Sequence[str] | None = None, steps=None, top: int = SAMPLE_TOP,
                    chunk_elements: int | None = None) -> SampleCapture:
    """Context manager: `attention.capture` of the conditional samples, each sample's top keys kept
    (`SampleCapture`). ``with sink_samples.capture_samples(adapter) as cap: base = disruption.baseline(...)``."""
    return SampleCapture(adapter, layers, steps, top, chunk_elements)


def sample_statistics(cap: SampleCapture, units: Sequence[tuple[str, int]], k: int = SAMPLE_TOP) -> list[dict]:
    """One row per (unit, layer), from that unit's own attention (not the mass averaged over units):

    text / pad / image: share of its (step, head) whose top-1 key is that kind (where the sinks sit);
    top1_mass and top1_over_uniform: the top-1 key's mass, and its mass over the uniform 1 / keys,
    mean over (step, head) (how strong); top1_stays: share of consecutive captured steps, per head,
    whose top-1 stays on the same key; topk_jaccard: mean Jaccard overlap of consecutive top-k sets;
    top1_is_key0: share of (step, head) whose top-1 is key 0 (how they move; both movement columns
    NaN with one step); top1_kind: the most common top-1 kind. units: the captured samples' (prompt,
    seed), in generation order (`disruption.Baseline.units`)."""
    if not isinstance(cap, SampleCapture):
        raise TypeError(f"cap must be a SampleCapture (sink_samples.capture_samples), got {type(cap).__name__}")
    units = list(units)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= cap.top:
        raise ValueError(f"k must be an int in [1, {cap.top}] (the keys the capture kept per sample), got {k!r}")
    rows = []
    for layer in dict.fromkeys(layer for layer, _ in cap.captured):
        steps = sorted(step for l, step in cap.captured if l == layer)
        tops = [cap.top_keys(layer, s) for s in steps]
        for s, (values, _) in zip(steps, tops):
            if values.shape[0] != len(units):
                raise ValueError(f"the capture holds {values.shape[0]} samples at ({layer}, step {s}), units has {len(units)}; "
                                 "allowed: one conditional sample per unit, captured over exactly these units")
        mass = torch.stack([v for v, _ in tops]).double().numpy()  # (steps, units, heads, top)
        keys = torch.stack([i for _, i in tops]).numpy()
        layout = cap.keys(layer)
        kinds = layout.kinds()[keys[..., 0]]  # (steps, units, heads)
        first = keys[..., 0]
        if len(steps) > 1:
            stays = (first[1:] == first[:-1]).mean((0, 2))
            a, b = keys[1:, ..., :k], keys[:-1, ..., :k]
            inter = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)
            jaccard = (inter / (2 * k - inter)).mean((0, 2))
        else:
            stays = jaccard = np.full(len(units), np.nan)
        for u, (prompt, seed) in enumerate(units):
            counts = Counter(kinds[:, u].ravel().tolist())
            rows.append({"prompt": prompt, "seed": seed, "layer": layer, "steps": len(steps),
                         **{kind: counts.get(kind, 0) / kinds[:, u].size for kind in ("text", "pad", "image")},
                         "top1_mass": float(mass[:, u, :, 0].mean()),
                         "top1_over_uniform": float(mass[:, u, :, 0].mean() * layout.size),
                         "top1_stays": float(stays[u]), "topk_jaccard": float(jaccard[u]),
                         "top1_is_key0": float((first[:, u] == 0).mean()), "top1_kind": counts.most_common(1)[0][0]})
    return rows


def sample_summary(rows: Sequence[dict], cluster: str | None = disruption.CLUSTER) -> list[dict]:
    """Per layer of `sample_statistics` rows, then "all layers" (each unit's mean over layers first):
    each of `SAMPLE_METRICS` as the mean over units with a bootstrap 95 % CI resampling prompts
    (`cluster` as in `disruption.summary`; NaN values -- one step -- left out; NaN CI for fewer than
    two units), "top1_kind" the kind with the largest mean share, n_units, n_prompts."""
    if cluster not in (None, "prompt"):
        raise ValueError(f"unknown cluster {cluster!r}; allowed: 'prompt' or None")
    if not rows:
        raise ValueError("no rows: pass sink_samples.sample_statistics(cap, base.units)")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    units = list(dict.fromkeys((r["prompt"], r["seed"]) for r in rows))
    per_unit = {}
    for layer in layers:
        per_unit[layer] = {(r["prompt"], r["seed"]): r for r in rows if r["layer"] == layer}
    per_unit["all layers"] = {u: {m: float(np.nanmean([per_unit[l][u][m] for l in layers if u in per_unit[l]]))
                                  if any(np.isfinite(per_unit[l][u][m]) for l in layers if u in per_unit[l]) else float("nan")
                                  for m in SAMPLE_METRICS} for u in units}
    out = []
    for layer, by_unit in per_unit.items():
        entry = {"layer": layer}
        for m in SAMPLE_METRICS:
            pairs = [(u, by_unit[u][m]) for u in by_unit if np.isfinite(by_unit[u][m])]
            values = np.array([v for _, v in pairs])
            entry[m] = float(values.mean()) if values.size else float("nan")
            if values.size < 2:
                entry[f"{m}_ci"] = (float("nan"), float("nan"))
                continue
            labels = [p for (p, _), _ in pairs]
            entry[f"{m}_ci"] = bootstrap_ci(values, groups=labels if cluster and len(set(labels)) > 1 else None)
        entry["top1_kind"] = max(("text", "pad", "image"), key=lambda kind: entry[kind])
        entry["n_units"] = len(by_unit)
        if cluster:
            entry["n_prompts"] = len({p for p, _ in by_unit})
        out.append(entry)
    return out
