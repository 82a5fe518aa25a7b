"""Chapter 6's experiment on `mabook.attention`'s mechanism: where the sinks sit and how they move,
sink vs equal-budget random / bottom key interventions over a `disruption.Baseline`, and the link
between sinks and massive channels.

Reading a capture (``with attention.capture(adapter) as cap: pipe(...)``): `sinks(cap, k)` lists
the top-k keys per (layer, step, head) with where they sit, `mass_by_kind(cap)` the mass on text,
pad and image keys, `movement(cap, k)` how the sinks move between steps. Running the experiment:
`run(base, interventions)` regenerates every unit under each `attention.KeyIntervention` and returns
chapter 2's table; `paired_ratios` compares sink with control damage unit by unit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mabook import disruption, probe
from mabook import progress as progress_
from mabook.attention import Capture, KeyIntervention, capture, intervene, op_label, resolve_layers
from mabook.models import Adapter

# ---------------------------------------------------------------------------------------------
# Reading a capture: sinks, where they sit, how they move
# ---------------------------------------------------------------------------------------------


def sinks(cap: Capture, k: int = 1) -> list[dict]:
    """One row per (layer, step, head, rank): the top-k keys by mass and where they sit."""
    rows = []
    for layer, step in cap.captured:
        mass = cap.mass(layer, step)
        H, S = mass.shape
        if not isinstance(k, (int, np.integer)) or k < 1 or k > S:
            raise ValueError(f"k must be an int in [1, {S}] (the keys at {layer}), got {k!r}")
        layout = cap.keys(layer)
        top = mass.topk(k, dim=-1)
        for h in range(H):
            for rank in range(k):
                i = int(top.indices[h, rank])
                rows.append({"layer": layer, "step": step, "head": h, "rank": rank, "key": i, **layout.label(i),
                             "mass": float(top.values[h, rank]), "uniform": 1 / S})
    return rows


def mass_by_kind(cap: Capture) -> list[dict]:
    """One row per (layer, step, head): total mass on text, pad and image keys (sums to 1)."""
    rows = []
    for layer, step in cap.captured:
        mass, kinds = cap.mass(layer, step).numpy(), cap.keys(layer).kinds()
        for h in range(mass.shape[0]):
            rows.append({"layer": layer, "step": step, "head": h,
                         **{kind: float(mass[h, kinds == kind].sum()) for kind in ("text", "pad", "image")}})
    return rows


def movement(cap: Capture, k: int = 1) -> list[dict]:
    """Per (layer, head) over the captured steps in order: how often the top-1 key stays put between
    consecutive steps, the mean Jaccard overlap of consecutive top-k sets, the share of steps whose
    top-1 is key 0 (the paper: < 0.2 % in SD3), and the top-1's most common kind."""
    rows = []
    for layer in dict.fromkeys(layer for layer, _ in cap.captured):
        steps = sorted(step for l, step in cap.captured if l == layer)
        top = torch.stack([cap.mass(layer, s).topk(k, dim=-1).indices for s in steps])  # (steps, heads, k)
        layout = cap.keys(layer)
        for h in range(top.shape[1]):
            sets = [set(top[i, h].tolist()) for i in range(len(steps))]
            pairs = list(zip(sets, sets[1:]))
            first = top[:, h, 0].tolist()
            rows.append({
                "layer": layer, "head": h, "steps": len(steps),
                "top1_stays": float(np.mean([a == b for a, b in zip(first, first[1:])])) if pairs else float("nan"),
                "topk_jaccard": float(np.mean([len(a & b) / len(a | b) for a, b in pairs])) if pairs else float("nan"),
                "top1_is_key0": float(np.mean([f == 0 for f in first])),
                "top1_kind": Counter(layout.label(f)["kind"] for f in first).most_common(1)[0][0],
            })
    return rows


# ---------------------------------------------------------------------------------------------
# Chapter 6's experiments: interventions over a disruption.Baseline, and sinks <-> massive channels
# ---------------------------------------------------------------------------------------------

CONTROLS = ("random", "bottom")  # the equal-budget controls of a sink intervention


def interventions(ks: Sequence[int], path: str = "score", eta: float = 0.0, layers=None, n_random: int = 3,
                  dose: str = "redistribute") -> list[KeyIntervention]:
    """The experiment's interventions: at each k, the sinks and each control (`n_random` seeded draws
    of the random one), in the order sink, then the controls sorted by name."""
    return [KeyIntervention(keys, k, path, eta, layers, seed=seed, dose=dose)
            for k in ks for keys in ("sink", *sorted(CONTROLS))
            for seed in (range(n_random) if keys == "random" else [0])]


def window_label(iv: KeyIntervention) -> str:
    """The table's "window": which layers and steps, e.g. "all layers, all steps"."""
    if iv.layers is None:
        where = "all layers"
    elif isinstance(iv.layers, str) or len(iv.layers) == 1:
        where = iv.layers if isinstance(iv.layers, str) else iv.layers[0]
    else:
        where = f"{len(iv.layers)} layers"
    steps = probe.check_steps(iv.steps)
    when = "all steps" if steps is None else "steps " + ",".join(str(s) for s in sorted(steps))
    return f"{where}, {when}"


def run(base, interventions: Sequence[KeyIntervention], batch_size: int = 16, keep_images: int = 4,
        progress: bool | None = None):
    """Regenerate every unit of `base` (a `disruption.Baseline`) under each intervention.

    Returns a `disruption.Result` whose table has disruption's metric columns (pixel MSE, MAE and
    SSIM to the unit's baseline; the judge's attributes, cleanliness and mask IoU on organism
    captions; LPIPS to the baseline and CLIP-T to the prompt if the baseline has their networks --
    the paper's measures on real models: `disruption.baseline(..., lpips_net=..., clip_model=...)`)
    and condition = the intervention's name, kind = "sink" / "random" / "bottom", k, op =
    `op_label`, window = `window_label`: `disruption.summary` and `paired_ratios` below read it as
    they read chapter 2's (`paired_ratios(table, "lpips")`: the paper's sink / random LPIPS ratio);
    seed_keys is the random draw's seed.
    Baseline rows are included. progress: a bar over the interventions and the time estimate
    (`mabook.progress`)."""

    if not interventions:
        raise ValueError("interventions must be a non-empty list of KeyIntervention")
    for iv in interventions:
        if not isinstance(iv, KeyIntervention):
            raise TypeError(f"interventions must be KeyIntervention objects, got {type(iv).__name__}")
    labels = [f"{iv.name} | {window_label(iv)}" for iv in interventions]
    if len(set(labels)) != len(labels):
        raise ValueError("interventions must be distinct (keys, k, seed, path, eta, window); got duplicates")
    for iv in interventions:  # fail before generating: unknown layers, unsupported family
        resolve_layers(base.adapter, iv.layers)
    table = [{**m, "condition": "baseline", "kind": "baseline", "k": 0, "op": "none", "window": "none"}
             for m in base.metrics]
    kept = {"baseline": base.images[:keep_images]}
    what = f"sinks, {len(interventions)} intervention(s) x {len(base.units)} unit(s)"
    with progress_.estimate(what, len(interventions) * len(base.units), base.num_inference_steps, progress):
        for iv, label in progress_.bar(list(zip(interventions, labels)), "interventions", progress=progress):
            with intervene(base.adapter, iv):
                images = base.adapter.generate(base.units, base.num_inference_steps, batch_size, progress, **base.pipe_kwargs)
            for m in disruption.unit_metrics(base, images):
                table.append({**m, "condition": iv.name, "kind": iv.keys, "k": iv.k, "op": op_label(iv),
                              "window": window_label(iv), "seed_keys": iv.seed})
            kept[label] = images[:keep_images]
    return disruption.Result(table, kept, list(interventions))


def paired_ratios(table: Sequence[dict], metric: str = "pixel_mse", controls: Sequence[str] = CONTROLS) -> list[dict]:
    """Per (op, window, k, control): mean sink damage / mean control damage over the same units,
    with a paired bootstrap 95 % CI (`disruption.paired_ratios` with treated="sink"; random key
    sets are averaged per unit first). Rows as disruption's, plus "op" and "window"."""

    out = []
    for op, win in dict.fromkeys((r["op"], r["window"]) for r in table if r["kind"] == "sink"):
        for r in disruption.paired_ratios(table, metric, controls, op=op, window=win, treated="sink"):
            out.append({**r, "op": op, "window": win})
    return out


def feeding_tap(adapter: Adapter, layer: str) -> probe.Tap:
    """The image-stream tap whose output enters attention `layer`: the previous block's output.

    The first block's attention reads the patch embedding, which no tap holds: refused."""
    resolve_layers(adapter, [layer])
    index = next(i for i, b in enumerate(adapter.blocks) if layer.startswith(b.path + "."))
    if index == 0:
        raise ValueError(f"{layer} is in the first block: its input is the patch embedding, not a block output; "
                         "pick a later layer")
    return probe.Tap(adapter.blocks[index - 1].path, "img")


@dataclass
class SinkLink:
    """Per image token of each unit at one (layer, step): the massive channels' magnitude at the
    block output feeding the layer, and the token's incoming attention mass (mean over heads)."""

    layer: str
    tap: str
    step: int
    channels: list[int]
    magnitude: np.ndarray  # (units, image tokens): L2 norm over `channels` (|h| for one channel)
    mass: np.ndarray  # (units, image tokens): incoming mass on each image key, averaged over heads
    pearson: np.ndarray  # (units,) per-image correlations over tokens (nan if one side is constant)
    spearman: np.ndarray

    def summary(self) -> dict:
        """Mean per-image Pearson and Spearman with bootstrap 95 % CIs over images, and how often the
        image key with the most mass is the token with the largest magnitude (chance: 1 / tokens)."""
        from mabook.stats import bootstrap_ci

        out = {"layer": self.layer, "tap": self.tap, "step": self.step, "channels": list(self.channels)}
        for name in ("pearson", "spearman"):
            v = getattr(self, name)
            v = v[np.isfinite(v)]
            out[name] = float(v.mean()) if v.size else float("nan")
            out[f"{name}_ci"] = bootstrap_ci(v) if v.size > 1 else (float("nan"), float("nan"))
        match = self.mass.argmax(1) == self.magnitude.argmax(1)
        out["argmax_match"] = float(match.mean())
        out["chance"] = 1 / self.mass.shape[1]
        out["n_units"] = int(self.mass.shape[0])
        return out


def sink_activation_link(base, layers: str | Sequence[str] | None = None, step: int | None = None,
                         k_channels: int = 1, channels: dict[str, Sequence[int]] | None = None) -> dict[str, SinkLink]:
    """Sinks <-> massive activations, per layer: does an image token's incoming attention mass follow
    the magnitude of the massive channels in the hidden state that enters the attention?

    base: a `disruption.Baseline` (its units are regenerated one at a time, unedited, with the
    block outputs captured by `probe.collect(capture=...)` and the mass by `capture`, both on the
    conditional sample). layers: default every softmax layer with a feeding block (not the first).
    step: default the middle step. channels: {layer: channels}; default the top-`k_channels` by
    |mean over image tokens| of `base.stats` at the feeding tap."""
    from scipy.stats import pearsonr, spearmanr


    adapter = base.adapter
    chosen = resolve_layers(adapter, layers)
    if layers is None:  # every layer but the first block's (no block output feeds it)
        chosen = [l for l in chosen if not l.startswith(adapter.blocks[0].path + ".")]
    step = base.num_inference_steps // 2 if step is None else step
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < base.num_inference_steps:
        raise ValueError(f"step must be an int in [0, {base.num_inference_steps}), got {step!r}")
    taps = {l: feeding_tap(adapter, l) for l in chosen}
    picked = {}
    for l, tap in taps.items():
        if channels is not None and l in channels:
            picked[l] = [int(c) for c in channels[l]]
        else:
            abs_mean = base.stats.get("abs_mean", tap).cpu().numpy()
            picked[l] = [int(c) for c in np.argsort(-abs_mean, kind="stable")[:k_channels]]
    magnitude = {l: [] for l in chosen}
    mass = {l: [] for l in chosen}
    wanted = list(dict.fromkeys(taps.values()))
    for unit in base.units:
        with probe.collect(adapter, taps=wanted, steps=[step], capture=[(t, step) for t in wanted]) as run_, \
                capture(adapter, layers=chosen, steps=[step]) as cap:
            adapter.generate([unit], base.num_inference_steps, 1, **base.pipe_kwargs)
        for l in chosen:
            layout = cap.keys(l)
            h = run_.captured[(str(taps[l]), step)][-1].float()  # (image tokens, channels), the conditional sample
            if h.shape[0] != layout.image:
                raise ValueError(f"{taps[l]} has {h.shape[0]} tokens but {l} has {layout.image} image keys")
            magnitude[l].append(h[:, picked[l]].norm(dim=-1).numpy())
            mass[l].append(cap.mass(l, step)[:, layout.image_slice].mean(0).numpy())
    out = {}
    for l in chosen:
        m, a = np.stack(magnitude[l]).astype(np.float64), np.stack(mass[l]).astype(np.float64)
        pr, sr = [], []
        for x, y in zip(m, a):
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                pr.append(np.nan), sr.append(np.nan)
                continue
            pr.append(float(pearsonr(x, y)[0]))
            sr.append(float(spearmanr(x, y)[0]))
        out[l] = SinkLink(l, str(taps[l]), int(step), picked[l], m, a, np.array(pr), np.array(sr))
    return out


def sink_shift(base, edits: dict[str, Sequence], layers: str | Sequence[str] | None = None, steps=None) -> list[dict]:
    """Do the sinks move when hidden-state channels are edited? For each unit of `base`, the top-1
    sink per (layer, step, head) is captured without edits and under each named list of
    `probe.Edit`s (e.g. zeroing the massive channels, or a random control).

    One row per (edit, unit, layer): top1_same (share of (step, head) whose top-1 key is unchanged),
    kind_same (its kind -- text / pad / image -- unchanged), sink_mass (the unedited top-1 mass),
    old_sink_mass (the mass the edited run gives the unedited top-1 key), edited_sink_mass."""

    if not isinstance(edits, dict) or not edits:
        raise ValueError("edits must be a non-empty dict {name: list of probe.Edit}")
    adapter = base.adapter
    chosen = resolve_layers(adapter, layers)

    def top1(unit, edit_list):
        with capture(adapter, layers=chosen, steps=steps) as cap:
            if edit_list:
                with probe.edit(adapter, list(edit_list)):
                    adapter.generate([unit], base.num_inference_steps, 1, **base.pipe_kwargs)
            else:
                adapter.generate([unit], base.num_inference_steps, 1, **base.pipe_kwargs)
        return cap

    rows = []
    for unit in base.units:
        ref = top1(unit, None)
        for name, edit_list in edits.items():
            cap = top1(unit, edit_list)
            for l in chosen:
                kinds = ref.keys(l).kinds()
                same, kind_same, m0, m_old, m1 = [], [], [], [], []
                for l_, s in ref.captured:
                    if l_ != l:
                        continue
                    a, b = ref.mass(l, s), cap.mass(l, s)
                    ia, ib = a.argmax(-1), b.argmax(-1)
                    same.append((ia == ib).double().mean().item())
                    kind_same.append(float(np.mean(kinds[ia.numpy()] == kinds[ib.numpy()])))
                    m0.append(a.max(-1).values.mean().item())
                    m_old.append(b.gather(-1, ia[:, None]).mean().item())
                    m1.append(b.max(-1).values.mean().item())
                rows.append({"edit": name, "prompt": unit[0], "seed": unit[1], "layer": l,
                             "top1_same": float(np.mean(same)), "kind_same": float(np.mean(kind_same)),
                             "sink_mass": float(np.mean(m0)), "old_sink_mass": float(np.mean(m_old)),
                             "edited_sink_mass": float(np.mean(m1))})
    return rows
