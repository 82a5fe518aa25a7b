"""How the attention sinks relate to the massive channels (chapter 6, section 7 "Sinks and massive channels").

Two questions, on the units of a `disruption.Baseline`, regenerated one at a time:

- Correlation: `sink_activation_link(base)` sets, per image token, the magnitude of the massive
  channels in the hidden state that enters an attention layer (the previous block's image-stream
  output, `feeding_tap`) against the token's incoming attention mass (mean over heads), at one
  step: per image Pearson and Spearman over its tokens (`SinkLink`, `SinkLink.summary`: their means
  over images with bootstrap CIs, and how often the most-attended key is the largest-magnitude token).
- Cause: `sink_shift(base, edits)` captures the top-1 sink of every (layer, step, head) without
  edits and under each named list of `probe.Edit`s (zeroing the massive channels, or a random
  control) and says how often it stays on the same key, of the same kind, and what mass it keeps.

What this is not: the sinks themselves (`mabook.attention`: capture and key interventions;
`mabook.sinks`: where they sit and move, interventions vs controls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from mabook import probe
from mabook.attention import capture, resolve_layers
from mabook.models import Adapter
from mabook.stats import bootstrap_ci


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
