"""Chapter 6's experiment on `mabook.attention`'s mechanism: where the sinks sit and how they move,
and sink vs random / bottom / mass-matched random key interventions over a `disruption.Baseline`
(the link between sinks and massive channels: `mabook.sink_links`).

Reading a capture (``with attention.capture(adapter) as cap: pipe(...)``): `sinks(cap, k)` lists
the top-k keys per (layer, step, head) with where they sit, `mass_by_kind(cap)` the mass on text,
pad and image keys, `movement(cap, k)` how the sinks move between steps -- all on the mass averaged
over the captured samples (per sample, as the paper computes them: `mabook.sink_samples`).

Running the experiment: `run(base, interventions)` regenerates every unit under each
`attention.KeyIntervention` (or `MassMatched`: random keys drawn until they hold the sinks' mass,
`mass_matched_keys`) and returns chapter 2's table, with the mass each intervention's keys held per
unit; `paired_ratios` compares sink with control damage unit by unit, `mass_removed` the mass the
sinks and each control took away.
"""

from __future__ import annotations

import contextlib
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mabook import attention, disruption, probe, softmax
from mabook import progress as progress_
from mabook.attention import Capture, KeyIntervention, op_label, resolve_layers
from mabook.models import Adapter
from mabook.stats import bootstrap_ci, paired_ratio_ci

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
# Chapter 6's experiments: interventions over a disruption.Baseline
# ---------------------------------------------------------------------------------------------

CONTROLS = ("random", "bottom", "random-mass")  # every control of a sink intervention (paired_ratios reads them all)
COUNT_CONTROLS = ("random", "bottom")  # the controls matched on the number of keys: `interventions`' default, as before
SELECTIONS = (*attention.SELECTIONS, "random-mass")  # which keys an intervention of this chapter hits
RANDOM_KINDS = ("random", "random-mass")  # the seeded controls (n_random draws each)
# a mass-matched key set is "matched" when the mass it holds is within this fraction of the top-k
# sinks' mass (per sample, head and call); where the draw cannot get there (`mass_matched_keys`) it
# stops as close as it gets, and the share of (call, head) rows within it is reported
# (`mass_removed`: "within_tolerance")
MASS_TOLERANCE = 0.05


@dataclass(frozen=True)
class MassMatched(KeyIntervention):
    """The mass-matched random control: per (sample, head) at each call, seeded random keys (never one
    of that head's top-k sinks) drawn one by one until they hold the mass the top-k sinks hold there.

    The mass is the one the sink intervention reads to find its sinks: the unedited incoming mass
    over the image queries at that call (`mass_matched_keys`, which says how the draw stops). The
    draw order is the count-matched "random" control's for the same seed; the number of keys varies
    per (sample, head). tolerance: the relative mismatch counted as matched (`MASS_TOLERANCE`).
    Every other field is `KeyIntervention`'s; on the score path under dose "redistribute" only eta
    0 and 1 are allowed (that rule at 0 < eta < 1 would count a padded key list's repeated key
    twice; use dose "renormalise" or a value path)."""

    keys: str = "random-mass"
    tolerance: float = MASS_TOLERANCE

    def __post_init__(self):
        if self.keys != "random-mass":
            raise ValueError(f"MassMatched keys must be 'random-mass', got {self.keys!r}; for {list(attention.SELECTIONS)} "
                             "use attention.KeyIntervention")
        # every shared field checked as the count-matched control checks it
        KeyIntervention("random", self.k, self.path, self.eta, self.layers, self.steps, self.seed, self.dose)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be a number in (0, 1) (a fraction of the sinks' mass), got {self.tolerance!r}")
        if self.path == "score" and self.dose == "redistribute" and 0 < self.eta < 1:
            raise ValueError(f"random-mass takes eta 0 or 1 under dose 'redistribute', got eta={self.eta!r}; allowed: "
                             "eta in {0, 1}, dose 'renormalise', or a value path (its key count differs per head)")

    @property
    def name(self) -> str:
        return f"{self.keys}-{self.k}#{self.seed} {op_label(self)}"


VALUE_PATHS = tuple(p for p in attention.PATHS if p != "score")


@dataclass(frozen=True)
class Combined:
    """The paper's combined intervention: the score path and a value path on the same keys, in one
    attention (`attention.intervene` nests them: each part chooses its keys from the unedited mass,
    so the same selection, k and seed choose the same keys; the value rows are replaced and the
    probabilities scaled in one pass). score: a score-path `KeyIntervention` (or `MassMatched`);
    value: one on "value_zero" or "value_mean" with the same keys, k, seed, layers and steps.
    `run` records what the score part's keys held; the table's op reads e.g.
    "score eta=0 + value_zero"."""

    score: KeyIntervention
    value: KeyIntervention

    def __post_init__(self):
        for part, paths in (("score", ("score",)), ("value", VALUE_PATHS)):
            iv = getattr(self, part)
            if not isinstance(iv, KeyIntervention) or iv.path not in paths:
                raise ValueError(f"Combined.{part} must be a KeyIntervention on path {' or '.join(paths)}, got {iv!r:.120}")
        for name in ("keys", "k", "seed", "layers", "steps"):
            a, b = getattr(self.score, name), getattr(self.value, name)
            if a != b:
                raise ValueError(f"Combined parts must hit the same keys: {name} is {a!r} on the score path and {b!r} "
                                 "on the value path")

    keys = property(lambda self: self.score.keys)
    k = property(lambda self: self.score.k)
    seed = property(lambda self: self.score.seed)
    layers = property(lambda self: self.score.layers)
    steps = property(lambda self: self.score.steps)

    @property
    def parts(self) -> tuple[KeyIntervention, KeyIntervention]:
        return self.score, self.value

    @property
    def name(self) -> str:
        return f"{self.score.name} + {self.value.path}"


def combined(keys: str = "sink", k: int = 1, value_path: str = "value_zero", eta: float = 0.0, layers=None, steps=None,
             seed: int = 0) -> Combined:
    """`Combined` of `intervention(keys, k, "score", eta, ...)` and `intervention(keys, k, value_path, ...)`."""
    return Combined(intervention(keys, k, "score", eta, layers, steps, seed), intervention(keys, k, value_path, 0.0, layers,
                                                                                          steps, seed))


def op_of(iv: KeyIntervention | Combined) -> str:
    """The table's "op": `attention.op_label`, or for a `Combined` both parts', "score eta=0 + value_zero"."""
    return f"{op_label(iv.score)} + {iv.value.path}" if isinstance(iv, Combined) else op_label(iv)


def intervention(keys: str = "sink", k: int = 1, path: str = "score", eta: float = 0.0, layers=None, steps=None,
                 seed: int = 0, dose: str = "redistribute") -> KeyIntervention:
    """A `KeyIntervention` for keys in `attention.SELECTIONS`, a `MassMatched` for "random-mass"."""
    if keys == "random-mass":
        return MassMatched(k=k, path=path, eta=eta, layers=layers, steps=steps, seed=seed, dose=dose)
    if keys not in attention.SELECTIONS:
        raise ValueError(f"unknown keys {keys!r}; allowed: {list(SELECTIONS)}")
    return KeyIntervention(keys, k, path, eta, layers, steps, seed, dose)


@dataclass
class MassMatch:
    """What `mass_matched_keys` chose, per (sample, head); B samples, H heads.

    keys: (B, H, n) key indices, n the largest count; a row with fewer keys repeats its first key
    (a repeated index edits the same key once). count: (B, H) keys chosen. target: (B, H) mass of
    the top-k sinks. matched: (B, H) mass of the chosen keys. within: (B, H) |matched - target| <=
    tolerance * target."""

    keys: torch.Tensor
    count: torch.Tensor
    target: torch.Tensor
    matched: torch.Tensor
    within: torch.Tensor


def mass_matched_keys(mass, k: int, seed: int = 0, layer: str = "", step: int = 0,
                      tolerance: float = MASS_TOLERANCE) -> MassMatch:
    """Random keys holding the mass of the top-k sinks, per (sample, head).

    mass: (heads, keys) or (samples, heads, keys), a tensor or array of incoming mass (each head's row
    sums to 1: `Capture.mass`, or what an intervention reads at a call). The keys are drawn in one
    seeded random order per (seed, layer, step) -- the count-matched "random" control's draw,
    shared by the samples of a call -- skipping each row's top-k sinks. With T the sinks' mass and
    the band T +- tolerance * T, keys are taken in that order while the total stays at most
    T + band; a key that would take it beyond is passed over, and the draw goes on
    until the total reaches T - band. If the keys run out first the total is as close as the draw
    gets from below (every non-sink key, if even they hold less than T). Only the pass-over looks at
    a key's mass, and only near the end. A 2-D mass gives 2-D results (the sample axis dropped)."""
    squeeze = False
    if isinstance(mass, np.ndarray):
        mass = torch.from_numpy(mass)
    if not isinstance(mass, torch.Tensor):
        raise TypeError(f"mass must be a tensor or array of shape (heads, keys) or (samples, heads, keys), got {type(mass).__name__}")
    if mass.ndim == 2:
        mass, squeeze = mass[None], True
    if mass.ndim != 3 or mass.shape[-1] < 2:
        raise ValueError(f"mass must have shape (heads, keys) or (samples, heads, keys) with >= 2 keys, got {tuple(mass.shape)}")
    if not torch.isfinite(mass).all() or (mass < 0).any():
        raise ValueError("mass must be finite and non-negative (incoming attention mass), got negative or non-finite values")
    B, H, S = mass.shape
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= S - 1:
        raise ValueError(f"k must be an int in [1, {S - 1}] (keys at {layer or 'this layer'}: {S}; one non-sink key must "
                         f"remain to draw), got {k!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1) (a fraction of the sinks' mass), got {tolerance!r}")
    # the count-matched control's draw (attention's "random", the same generator and order)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{layer}|{step}".encode()))
    draw = torch.rand(H, S, generator=g).to(mass.device).expand(B, H, S).clone()
    sinks_ = mass.topk(k, dim=-1).indices
    draw.scatter_(-1, sinks_, 2.0)  # above any draw in [0, 1): the sinks come last, never drawn
    order = draw.argsort(-1)[..., :S - k]  # the non-sink keys in draw order
    N = S - k
    m = mass.double()
    target = m.gather(-1, sinks_).sum(-1)
    drawn = m.gather(-1, order)  # (B, H, N): each drawn key's mass, in draw order
    band = tolerance * target
    lower, upper = target - band, target + band
    pos = torch.arange(N, device=mass.device)
    total = torch.zeros_like(target)
    taken = torch.zeros_like(drawn, dtype=torch.bool)
    cursor = torch.zeros_like(target, dtype=torch.long)  # the next undecided key
    active = torch.ones_like(target, dtype=torch.bool)
    for _ in range(N):  # one round per skipped key: usually a few
        budget = upper - total
        fits = (pos >= cursor[..., None]) & (drawn <= budget[..., None])  # keys that fit alone
        active &= fits.any(-1)
        if not active.any():
            break
        start = fits.double().argmax(-1)  # the next key that fits: the ones before it are skipped
        run = drawn * (pos >= start[..., None])
        run = run.cumsum(-1)  # the total added by taking every key from start on
        keep = (pos >= start[..., None]) & (run <= budget[..., None])  # a run from start: it stays within budget
        reach = keep & (total[..., None] + run >= lower[..., None])
        stop = torch.minimum(start + keep.sum(-1) - 1,  # the run's end, or the key that reaches the band
                             torch.where(reach.any(-1), reach.double().argmax(-1), torch.full_like(start, N)))
        take = keep & (pos <= stop[..., None]) & active[..., None]
        taken |= take
        total = total + (drawn * take).sum(-1)
        cursor = torch.where(active, stop + 1, cursor)
        active &= (total < lower) & (cursor < N)
    count = taken.sum(-1)
    matched = (drawn * taken).sum(-1)
    n = int(count.max())
    first = torch.where(taken, pos, pos + N).argsort(-1)[..., :n]  # the taken keys' positions first, in draw order
    keys = order.gather(-1, first)
    keys = torch.where(pos[:n] < count[..., None], keys, keys[..., :1])
    within = (matched - target).abs() <= band
    out = MassMatch(keys, count, target, matched, within)
    if squeeze:
        out = MassMatch(*(t[0] for t in (keys, count, target, matched, within)))
    return out


def interventions(ks: Sequence[int], path: str = "score", eta: float = 0.0, layers=None, n_random: int = 3,
                  dose: str = "redistribute", controls: Sequence[str] = COUNT_CONTROLS) -> list[KeyIntervention]:
    """The experiment's interventions: at each k, the sinks and each control in `controls` (from
    `CONTROLS`; `n_random` seeded draws of each random one), in the order sink, then the controls
    sorted by name."""
    if isinstance(controls, str) or not all(c in CONTROLS for c in controls):
        raise ValueError(f"controls must be a list drawn from {list(CONTROLS)}, got {controls!r}")
    return [intervention(keys, k, path, eta, layers, seed=seed, dose=dose)
            for k in ks for keys in ("sink", *sorted(dict.fromkeys(controls)))
            for seed in (range(n_random) if keys in RANDOM_KINDS else [0])]


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


class Recorded(attention.Intervention):
    """`attention.Intervention` for every kind of `SELECTIONS` (a `MassMatched` chooses with
    `mass_matched_keys`) that also sums, per sample of each pipeline call, what the chosen keys held.

    `begin(n)` before a pipeline call of n units; `finish()` after it: per unit, the mean over the
    calls (layers x steps x the unit's samples, guidance halves alike) and heads of "mass_removed"
    (the unedited mass on the chosen keys: what the score path at eta = 0 removes, a fraction 1 - eta
    of it under the default dose; on the value path the mass whose values are replaced), "sink_mass"
    (the top-k sinks' mass at the same calls), "keys_used" (distinct keys chosen) and, for
    `MassMatched`, "within_tolerance" (share of rows matched within its tolerance)."""

    def __init__(self, adapter: Adapter, intervention: KeyIntervention, chunk_elements: int | None = None):
        super().__init__(adapter, intervention, chunk_elements)
        self._n, self._acc = 0, {}

    def begin(self, n: int) -> None:
        self._n, self._acc = n, {}

    def choose(self, layer: str, mass: torch.Tensor) -> softmax.Edit:
        iv = self.intervention
        if isinstance(iv, MassMatched):
            match = mass_matched_keys(mass, iv.k, iv.seed, layer, self.step, iv.tolerance)
            chosen, within = match.keys, match.within
            self.chosen[(layer, self.step)] = chosen.cpu()
            edit = softmax.Edit(chosen, iv.path, float(iv.eta), iv.dose)
        else:
            edit, within = super().choose(layer, mass), None
            chosen = edit.chosen
        if self._n:
            self._record(mass, chosen, within)
        return edit

    def _record(self, mass, chosen, within) -> None:
        B, H, _ = mass.shape
        if B % self._n:
            raise ValueError(f"an attention call of {B} samples in a pipeline call of {self._n} units: cannot tell the units apart")
        hit = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, chosen, True)
        m = mass.double()
        values = {"mass_removed": (m * hit).sum(-1), "sink_mass": m.topk(self.intervention.k, dim=-1).values.sum(-1),
                  "keys_used": hit.sum(-1).double(), "rows": torch.ones(B, H, dtype=torch.float64, device=mass.device)}
        if within is not None:
            values["within_tolerance"] = within.double()
        unit = torch.arange(B, device=mass.device) % self._n  # guidance halves: [uncond; cond] of the same units
        for name, v in values.items():
            acc = self._acc.get(name)
            if acc is None:
                acc = self._acc[name] = torch.zeros(self._n, dtype=torch.float64, device=mass.device)
            acc.index_add_(0, unit, v.sum(-1))

    def finish(self) -> list[dict]:
        """Per unit of the last `begin`: the means above ({} for a unit no call edited)."""
        if not self._acc:
            return [{} for _ in range(self._n)]
        acc = {name: v.cpu().numpy() for name, v in self._acc.items()}
        rows = acc.pop("rows")
        return [{name: float(v[i] / rows[i]) for name, v in acc.items()} if rows[i] else {} for i in range(self._n)]


def run(base, interventions: Sequence[KeyIntervention | Combined], batch_size: int = 16, keep_images: int = 4,
        progress: bool | None = None):
    """Regenerate every unit of `base` (a `disruption.Baseline`) under each intervention.

    Returns a `disruption.Result` whose table has disruption's metric columns (pixel MSE, MAE and
    SSIM to the unit's baseline; the judge's attributes, cleanliness and mask IoU on organism
    captions; LPIPS to the baseline and CLIP-T to the prompt if the baseline has their networks --
    the paper's measures on real models: `disruption.baseline(..., lpips_net=..., clip_model=...)`)
    and condition = the intervention's name, kind = "sink" / "random" / "bottom" / "random-mass", k,
    op = `op_of`, window = `window_label`: `disruption.summary` and `paired_ratios` below read it
    as they read chapter 2's (`paired_ratios(table, "lpips")`: the paper's sink / random LPIPS
    ratio); seed_keys is the random draw's seed; mass_removed, sink_mass, keys_used (and
    within_tolerance for "random-mass") what the intervention's keys held in that unit's generation
    (`Recorded`; `mass_removed(table)` summarises them).
    A `Combined` runs its score and value parts in one attention. Baseline rows are included.
    progress: a bar over the interventions and the time estimate
    (`mabook.progress`)."""

    if not interventions:
        raise ValueError("interventions must be a non-empty list of KeyIntervention")
    for iv in interventions:
        if not isinstance(iv, (KeyIntervention, Combined)):
            raise TypeError(f"interventions must be KeyIntervention or Combined objects, got {type(iv).__name__}")
    labels = [f"{iv.name} | {window_label(iv)}" for iv in interventions]
    if len(set(labels)) != len(labels):
        raise ValueError("interventions must be distinct (keys, k, seed, path, eta, window); got duplicates")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    for iv in interventions:  # fail before generating: unknown layers, unsupported family
        resolve_layers(base.adapter, iv.layers)
    table = [{**m, "condition": "baseline", "kind": "baseline", "k": 0, "op": "none", "window": "none"}
             for m in base.metrics]
    kept = {"baseline": base.images[:keep_images]}
    what = f"sinks, {len(interventions)} intervention(s) x {len(base.units)} unit(s)"
    with progress_.estimate(what, len(interventions) * len(base.units), base.num_inference_steps, progress):
        for iv, label in progress_.bar(list(zip(interventions, labels)), "interventions", progress=progress):
            images, held = [], []
            with contextlib.ExitStack() as stack:
                # a Combined's score part records (and chooses as it would alone); its value part nests inside it
                rec, *_ = [stack.enter_context(Recorded(base.adapter, part)) for part in getattr(iv, "parts", (iv,))]
                for start in range(0, len(base.units), batch_size):  # one pipeline call per batch: its samples are its units
                    chunk = base.units[start:start + batch_size]
                    rec.begin(len(chunk))
                    images.append(base.adapter.generate(chunk, base.num_inference_steps, batch_size, progress, **base.pipe_kwargs))
                    held += rec.finish()
            images = np.concatenate(images)
            for m, h in zip(disruption.unit_metrics(base, images), held):
                table.append({**m, "condition": iv.name, "kind": iv.keys, "k": iv.k, "op": op_of(iv),
                              "window": window_label(iv), "seed_keys": iv.seed, **h})
            kept[label] = images[:keep_images]
    return disruption.Result(table, kept, list(interventions))


def paired_ratios(table: Sequence[dict], metric: str = "pixel_mse", controls: Sequence[str] = CONTROLS) -> list[dict]:
    """Per (op, window, k, control): mean sink damage / mean control damage over the same units,
    with a paired bootstrap 95 % CI resampling prompts (`disruption.paired_ratios` with
    treated="sink", cluster=`disruption.CLUSTER`; random key sets, count- or mass-matched, are
    averaged per unit first). Rows as disruption's, plus "op" and "window"."""

    out = []
    for op, win in dict.fromkeys((r["op"], r["window"]) for r in table if r["kind"] == "sink"):
        for r in disruption.paired_ratios(table, metric, controls, op=op, window=win, treated="sink"):
            out.append({**r, "op": op, "window": win})
    return out


def mass_removed(table: Sequence[dict], cluster: str | None = disruption.CLUSTER) -> list[dict]:
    """Did the controls take away as much attention as the sinks? One row per (kind, k, op, window)
    of a `run` table: "mass_removed" (mean over units of the unedited mass on the chosen keys, per
    call and head; random sets averaged per unit first) with a bootstrap 95 % CI resampling prompts
    (`cluster` as in `disruption.summary`), "keys" (distinct keys chosen per (call, head)),
    "sink_mass" (the top-k sinks' mass in the same generations), "vs_sink" (paired ratio of the mean
    mass removed to the sink intervention's of the same k, op and window, with "vs_sink_ci"), and
    for "random-mass" "within_tolerance" (share of (call, head) rows within `MASS_TOLERANCE`).
    Tables made before these columns existed give []."""
    rows = [r for r in table if r["kind"] != "baseline" and "mass_removed" in r]
    groups = list(dict.fromkeys((r["kind"], r["k"], r["op"], r["window"]) for r in rows))

    def ci(values: dict, other: dict | None = None):
        units = [u for u in values if other is None or u in other]
        if len(units) < 2:
            return (float("nan"), float("nan"))
        labels = [p for p, _ in units] if cluster == "prompt" and len({p for p, _ in units}) > 1 else None
        if other is None:
            return bootstrap_ci([values[u] for u in units], groups=labels)
        return paired_ratio_ci([values[u] for u in units], [other[u] for u in units], groups=labels)

    if cluster not in (None, "prompt"):
        raise ValueError(f"unknown cluster {cluster!r}; allowed: 'prompt' or None")
    out = []
    for kind, k, op, win in groups:
        where = dict(kind=kind, k=k, op=op, window=win)
        removed = disruption.unit_values(rows, "mass_removed", **where)
        sink = disruption.unit_values(rows, "mass_removed", **{**where, "kind": "sink"})
        entry = {"kind": kind, "k": k, "op": op, "window": win,
                 "mass_removed": float(np.mean(list(removed.values()))), "mass_removed_ci": ci(removed),
                 "keys": float(np.mean(list(disruption.unit_values(rows, "keys_used", **where).values()))),
                 "sink_mass": float(np.mean(list(disruption.unit_values(rows, "sink_mass", **where).values())))}
        both = [u for u in removed if u in sink]
        if kind == "sink":
            entry["vs_sink"], entry["vs_sink_ci"] = 1.0, (1.0, 1.0)
        elif both:
            a, b = np.mean([removed[u] for u in both]), np.mean([sink[u] for u in both])
            entry["vs_sink"] = float(a / b) if b > 0 else float("nan")
            entry["vs_sink_ci"] = ci(removed, sink)
        if kind == "random-mass":
            entry["within_tolerance"] = float(np.mean(list(disruption.unit_values(rows, "within_tolerance", **where).values())))
        entry["n_units"] = len(removed)
        if cluster:
            entry["n_prompts"] = len({p for p, _ in removed})
        out.append(entry)
    return out
