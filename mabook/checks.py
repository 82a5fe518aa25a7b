"""How each claim of the scorecard is read from its results file: the verdict rules (a CI against
a line fixed in `mabook.claims`), the number formatting, and one check per claim (`CHECKS`, by
claim id) returning a `Reading`. `mabook.scorecard` runs them over the committed results.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from mabook.claims import (
    ALPHA,
    BREAK_DROP,
    DIFFERENCE_LINE,
    EMBEDDING_DRIVEN,
    FAILS,
    HOLDS,
    HPS_K,
    K_DISRUPTION,
    K_SINK,
    KEEP_MARGIN,
    NOT_TESTABLE,
    PRESENT_FACTOR,
    RATIO_LINE,
    SHARE_MARGIN,
    STEP_DRIVEN,
    UNCLEAR,
)
from mabook.files import number

# ---------------------------------------------------------------------------------------------
# Verdict rules and formatting
# ---------------------------------------------------------------------------------------------


class Reading(NamedTuple):
    """What a check computes: the result in words, the verdict, the proxy's verdict (None when
    the claim is measured directly), one sentence of reading, and the headline number with its CI."""

    result: str
    verdict: str
    proxy_verdict: str | None
    reading: str
    value: float | None = None
    ci: tuple[float, float] | None = None


def num(x) -> str:
    """How the scorecard prints a number: three significant digits."""
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def with_ci(value, ci, unit: str = "") -> str:
    """``value [low, high]``, each with `num`; `unit` follows the value (``4.68x [3.99, 5.36]``)."""
    return f"{num(value)}{unit} [{num(ci[0])}, {num(ci[1])}]"


def _finite(ci) -> bool:
    return ci is not None and all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci)


def ratio_verdict(ci) -> str:
    """RATIO_LINE: holds above 1, fails below 1, unclear across (or without a finite CI)."""
    if not _finite(ci):
        return UNCLEAR
    return HOLDS if ci[0] > RATIO_LINE else FAILS if ci[1] < RATIO_LINE else UNCLEAR


def difference_verdict(ci) -> str:
    """DIFFERENCE_LINE: holds above 0, fails below 0, unclear across."""
    if not _finite(ci):
        return UNCLEAR
    return HOLDS if ci[0] > DIFFERENCE_LINE else FAILS if ci[1] < DIFFERENCE_LINE else UNCLEAR


def drop_interval(baseline: dict, row: dict, metric: str) -> tuple[float, float, float]:
    """(drop, low, high) of `metric` from the baseline row to `row`. The interval is the difference
    of the two stored CIs; it is the drop's own CI when every unit's baseline is the same (a CI of
    zero width, e.g. accuracy 1 [1, 1]), and wider -- conservative -- otherwise."""
    b, (b_lo, b_hi) = number(baseline[metric]), map(number, baseline[f"{metric}_ci"])
    v, (v_lo, v_hi) = number(row[metric]), map(number, row[f"{metric}_ci"])
    return b - v, b_lo - v_hi, b_hi - v_lo


def keep_verdict(drop_lo: float, drop_hi: float) -> str:
    """KEEP_MARGIN: "unchanged" holds when the drop's CI stays at or under the margin, fails above it."""
    return HOLDS if drop_hi <= KEEP_MARGIN else FAILS if drop_lo > KEEP_MARGIN else UNCLEAR


def _one(items, what: str, **match) -> dict:
    found = [r for r in items if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise LookupError(f"{what}: {len(found)} rows match {match}")
    return found[0]


def _median(values) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _ks_where(verdicts: dict, word: str) -> str:
    ks = [str(k) for k, v in verdicts.items() if v == word]
    return ", ".join(ks) if ks else "none"


# ---------------------------------------------------------------------------------------------
# The checks, one per claim (registered by claim id)
# ---------------------------------------------------------------------------------------------

CHECKS: dict[str, Callable[[dict], Reading]] = {}


def _check(claim_id: str):
    def register(f):
        CHECKS[claim_id] = f
        return f
    return register


def _paired_row(data: dict, control: str, k: int) -> dict:
    return _one(data["paired_ratios"], "paired_ratios", metric="pixel_mse", control=control, k=k)


@_check("ma-critical-random")
def _ma_critical_random(data: dict) -> Reading:
    r = _paired_row(data, "random", K_DISRUPTION)
    by_k = {p["k"]: ratio_verdict(p["ci"]) for p in data["paired_ratios"] if p["control"] == "random" and p["metric"] == "pixel_mse"}
    return Reading(f"top-{K_DISRUPTION} / random-{K_DISRUPTION} pixel MSE: {with_ci(r['ratio'], r['ci'], 'x')} ({r['n_units']} units)",
                   ratio_verdict(r["ci"]), None,
                   f"CI above 1 at k = {_ks_where(by_k, HOLDS)}; straddles 1 at k = {_ks_where(by_k, UNCLEAR)}; "
                   f"below 1 at k = {_ks_where(by_k, FAILS)}.", r["ratio"], tuple(r["ci"]))


@_check("ma-critical-bottom")
def _ma_critical_bottom(data: dict) -> Reading:
    r = _paired_row(data, "bottom_abs_mean", K_DISRUPTION)
    by_k = {p["k"]: ratio_verdict(p["ci"]) for p in data["paired_ratios"]
            if p["control"] == "bottom_abs_mean" and p["metric"] == "pixel_mse"}
    share = number(r["control_damage"]) / number(r["top_damage"])
    return Reading(f"top-{K_DISRUPTION} / bottom-{K_DISRUPTION} (|mean|) pixel MSE: {with_ci(r['ratio'], r['ci'], 'x')}",
                   ratio_verdict(r["ci"]), None,
                   f"More damage than the bottom-k at k = {_ks_where(by_k, HOLDS)} (straddles 1 at k = {_ks_where(by_k, UNCLEAR)}); "
                   f"but the bottom-{K_DISRUPTION} is not marginal: its damage is {share:.0%} of the top-{K_DISRUPTION}'s "
                   f"({num(r['control_damage'])} vs {num(r['top_damage'])}).", r["ratio"], tuple(r["ci"]))


@_check("ma-spatial")
def _ma_spatial(data: dict) -> Reading:
    k = data["k_channels"]
    where = "all layers x steps"
    d = _one(data["differences"], "differences", where=where, control=f"random-{k}")
    s = {r["set"]: r for r in data["summary"] if r["source"] == "rendered"}
    d_all = _one(data["differences"], "differences", where=where, control="all")
    focus = _one(data["differences"], "differences", where="focus", control=f"random-{k}")
    vs_all = ("all channels outline the subject better" if d_all["ci"][1] < 0 else
              "the top-k beat all channels" if d_all["ci"][0] > 0 else "all channels do about as well")
    return Reading(f"token IoU top-{k} {with_ci(s[f'top-{k}']['token_iou'], s[f'top-{k}']['token_iou_ci'])} vs random-{k} "
                   f"{with_ci(s[f'random-{k}']['token_iou'], s[f'random-{k}']['token_iou_ci'])}; difference "
                   f"{with_ci(d['difference'], d['ci'])} ({d['n_units']} generations)",
                   difference_verdict(d["ci"]), None,
                   f"At the focus layer and step the difference is {with_ci(focus['difference'], focus['ci'])}. Top-{k} minus all "
                   f"channels: {with_ci(d_all['difference'], d_all['ci'])}: {vs_all}.", d["difference"], tuple(d["ci"]))


@_check("ma-transport-text")
def _ma_transport_text(data: dict) -> Reading:
    k = data["k_main"]
    d = _one(data["differences"], "differences", alpha=ALPHA, other=f"random-{k}", metric="took_source")
    sweep = {(r["set"], r["k_set"]): r for r in data["k_sweep_summary"]}
    took = lambda kind, kk: sweep[(kind, kk)]["took_source"]
    smaller = "; ".join(f"k = {kk}: {num(took('top', kk))} vs {num(took('random', kk))}" for kk in data["k_sweep"] if kk < k)
    top = sweep[("top", k)]
    return Reading(f"took the source: top-{k} {with_ci(top['took_source'], top['took_source_ci'])} vs random-{k} "
                   f"{num(took('random', k))}; difference {with_ci(d['difference'], d['ci'])} ({d['n_pairs']} pairs)",
                   difference_verdict(d["ci"]), None,
                   f"Only at k = {k} of 128 channels; the smaller sets move nothing (top vs random: {smaller}). Top-{k} keeps "
                   f"the target's other attributes in {num(top['kept_target'])} of pairs.", d["difference"], tuple(d["ci"]))


@_check("ma-transport-image")
def _ma_transport_image(data: dict) -> Reading:
    k = data["k"]
    d = _one(data["differences"], "differences", trajectory="invert", alpha=ALPHA, other=f"random-{k}")
    kind = data["pair_kinds"][0]
    top = _one(data["summary"], "summary", kind=kind, trajectory="invert", method=f"top-{k}", alpha=ALPHA)
    rnd = _one(data["summary"], "summary", kind=kind, trajectory="invert", method=f"random-{k}", alpha=ALPHA)
    recon = _one(data["reconstruction"], "reconstruction", start="fixed-point inversion")
    return Reading(f"took the reference, top-{k} minus random-{k}: {with_ci(d['difference'], d['ci'])} ({d['n']} pairs)",
                   difference_verdict(d["ci"]), None,
                   f"In {kind.replace('_', '-')} pairs top-{k} took it in {with_ci(top['took_source'], top['took_source_ci'])} "
                   f"(random-{k} {num(rnd['took_source'])}); the inversion itself is faithful (reconstruction |error| "
                   f"{num(recon['mae'])}, {recon['attributes_right']:.0%} of references right).", d["difference"], tuple(d["ci"]))


def _sink_window(data: dict) -> str:
    return f"{data['layer']}, all steps"  # chapter 6's one-block window (the paper's single layer)


def _sink_rows(data: dict, window: str) -> dict:
    return {r["k"]: r for r in data["summary"] if r["kind"] == "sink" and r["op"] == "score eta=0" and r["window"] == window}


@_check("sinks-text-alignment")
def _sinks_text_alignment(data: dict) -> Reading:
    base = _one(data["summary"], "summary", kind="baseline")
    one = _sink_rows(data, _sink_window(data))
    drop, lo, hi = drop_interval(base, one[K_SINK], "all_correct")
    every = {w: {k: keep_verdict(*drop_interval(base, r, "all_correct")[1:]) for k, r in sorted(_sink_rows(data, w).items())}
             for w in (_sink_window(data), "all layers, all steps")}
    words = "; ".join(f"{'one block' if w == _sink_window(data) else 'all blocks'}: kept at k = {_ks_where(v, HOLDS)}, lost at "
                      f"k = {_ks_where(v, FAILS)}, unclear at k = {_ks_where(v, UNCLEAR)}" for w, v in every.items())
    return Reading(f"proxy: all-attributes-correct drop at k = {K_SINK}, one block: {num(drop)} [{num(lo)}, {num(hi)}] "
                   f"({one[K_SINK]['n_units']} units)", NOT_TESTABLE, keep_verdict(lo, hi),
                   f"Proxy over k ({words}).", drop, (lo, hi))


@_check("sinks-perceptual-shift")
def _sinks_perceptual_shift(data: dict) -> Reading:
    window = _sink_window(data)
    # the mass-matched random control (random keys holding the sinks' attention mass) when the big run has it:
    # count-matched random keys hold less mass than the sinks, the confound the paper's own ratio carries
    control = "random-mass" if any(r.get("control") == "random-mass" and r["k"] == K_SINK and r["op"] == "score eta=0"
                                   and r["window"] == window for r in data["paired_ratios"]) else "random"
    name = "mass-matched random" if control == "random-mass" else "random"
    mse = _one(data["paired_ratios"], "paired_ratios", control=control, k=K_SINK, op="score eta=0", window=window,
               metric="pixel_mse")
    linear = [r for r in data.get("paired_ratios_linear", {}).get("pixel_mae", [])
              if r["control"] == control and r["k"] == K_SINK and r["op"] == "score eta=0" and r["window"] == window]
    if linear:  # a paired ratio on a metric linear in the change: the closest to LPIPS's scale we have
        mae = linear[0]
        result = (f"proxy: mean |difference| sink / {name} {with_ci(mae['ratio'], mae['ci'], 'x')} (paired); pixel MSE "
                  f"{with_ci(mse['ratio'], mse['ci'], 'x')}")
        value, ci = mae["ratio"], tuple(mae["ci"])
    else:
        sink = _one(data["summary"], "summary", kind="sink", k=K_SINK, op="score eta=0", window=window)
        rnd = _one(data["summary"], "summary", kind=control, k=K_SINK, op="score eta=0", window=window)
        result = (f"proxy: pixel MSE sink / {name} {with_ci(mse['ratio'], mse['ci'], 'x')} (paired, {mse['n_units']} units); "
                  f"mean |difference| {num(sink['pixel_mae'] / rnd['pixel_mae'])}x (ratio of means, no CI stored)")
        value, ci = mse["ratio"], tuple(mse["ci"])
    return Reading(result, NOT_TESTABLE, ratio_verdict(ci),
                   "The direction is the paper's (sink-specific when the CI is above 1); the size is not comparable with "
                   "its LPIPS 6.5x, nor is a squared metric's ratio with a linear one's."
                   + (" The control holds the sinks' attention mass (mass-matched), not only their number." if control == "random-mass"
                      else ""), value, ci)


@_check("sinks-hps")
def _sinks_hps(data: dict) -> Reading:
    base = _one(data["summary"], "summary", kind="baseline")
    one = _sink_rows(data, _sink_window(data))
    # a drop the CIs resolve: the sink-suppressed CI lies wholly below the baseline's (the paper counts HPS -0.005 as one)
    dropped = {k: number(r["cleanliness_ci"][1]) < number(base["cleanliness_ci"][0]) for k, r in sorted(one.items())}
    early = [k for k, d in dropped.items() if d and k < HPS_K]
    late_kept = [k for k, d in dropped.items() if not d and k >= HPS_K]
    late = [k for k in dropped if k >= HPS_K]
    proxy = FAILS if early or late_kept else HOLDS if late else UNCLEAR
    first = min((k for k, d in dropped.items() if d), default=None)
    r = one[first] if first is not None else one[max(one)]
    return Reading(f"proxy: cleanliness {with_ci(base['cleanliness'], base['cleanliness_ci'])} at baseline; "
                   f"{with_ci(r['cleanliness'], r['cleanliness_ci'])} at k = {r['k']}",
                   NOT_TESTABLE, proxy,
                   f"Cleanliness drops (CIs apart) at k = {', '.join(str(k) for k, d in dropped.items() if d) or 'none'} of "
                   f"{', '.join(str(k) for k in dropped)}" + (f", before k = {HPS_K}" if early else "") + "; the drop is "
                   + ", ".join(f"{num(base['cleanliness'] - r['cleanliness'])} at k = {k}" for k, r in sorted(one.items())) + ".",
                   r["cleanliness"], tuple(r["cleanliness_ci"]))


@_check("sinks-where")
def _sinks_where(data: dict) -> Reading:
    kinds = ("text", "pad", "image")
    share = _one(data["mass_by_kind"], "mass_by_kind", layer="(share of keys)")
    layers = [r for r in data["mass_by_kind"] if r["layer"] != "(share of keys)"]
    most = [max(kinds, key=lambda kind: r[kind] / share[kind]) for r in layers]
    counts = {kind: most.count(kind) for kind in kinds}
    top1 = [r["most common top-1 kind"] for r in data["movement"]]
    majority = len(layers) / 2
    proxy = HOLDS if counts["pad"] > majority else FAILS if max(counts["text"], counts["image"]) > majority else UNCLEAR
    median_pad = _median([r["pad"] / share["pad"] for r in layers])
    return Reading(f"proxy: most over-attended kind (mass / share of keys) is padding in {counts['pad']}, image in "
                   f"{counts['image']}, text in {counts['text']} of {len(layers)} layers",
                   NOT_TESTABLE, proxy,
                   f"Padding is {share['pad']:.0%} of the keys and gets {num(median_pad)}x its share (median layer); the top-1 "
                   f"sink's most common kind is image in {top1.count('image')}, padding in {top1.count('pad')}, text in "
                   f"{top1.count('text')} layers.", counts["pad"] / len(layers), None)


@_check("sinks-differ")
def _sinks_differ(data: dict) -> Reading:
    orgs = data["organisms"]
    kind = {n: max(o["sinks"]["top1_kind"], key=o["sinks"]["top1_kind"].get) for n, o in orgs.items()}
    differ = len(set(kind.values())) > 1
    return Reading("top-1 sink mostly on: " + "; ".join(f"{n} {k} ({orgs[n]['sinks']['top1_kind'][k]:.0%})" for n, k in kind.items()),
                   HOLDS if differ else FAILS, None,
                   f"At {orgs['control']['sinks']['layer']}, {len(orgs)} organisms of one architecture: "
                   + ("the kind changes with one training factor." if differ else "every organism puts them on the same kind.")
                   + " Organisms, not the paper's real models.")


@_check("sun-zero-vs-mean")
def _sun_zero_vs_mean(data: dict) -> Reading:
    top = {r["op"]: r for r in data["summary"] if r["kind"] == "top" and r["k"] == K_DISRUPTION}
    base = _one(data["summary"], "summary", kind="baseline")
    zero, mean = top["zero"], top["mean"]
    _, lo, hi = drop_interval(base, mean, "all_correct")
    intact = keep_verdict(lo, hi)
    # zeroing clearly worse: the two CIs apart (unpaired, so conservative)
    (z_lo, z_hi), (m_lo, m_hi) = map(number, zero["pixel_mse_ci"]), map(number, mean["pixel_mse_ci"])
    order = HOLDS if z_lo > m_hi else FAILS if m_lo > z_hi else UNCLEAR
    verdict = HOLDS if order == HOLDS and intact == HOLDS else FAILS if FAILS in (order, intact) else UNCLEAR
    token = f"; per-token mean {num(top['token_mean']['pixel_mse'])}" if "token_mean" in top else ""
    return Reading(f"pixel MSE, top-{K_DISRUPTION} zeroed {with_ci(zero['pixel_mse'], zero['pixel_mse_ci'])} vs mean-replaced "
                   f"{with_ci(mean['pixel_mse'], mean['pixel_mse_ci'])}",
                   verdict, None,
                   f"Zeroing moves pixels {zero['pixel_mse'] / mean['pixel_mse']:.0f}x as much{token}; after mean-replacement "
                   f"all attributes are right in {with_ci(mean['all_correct'], mean['all_correct_ci'])} (zeroed: "
                   f"{num(zero['all_correct'])}).", zero["pixel_mse"] / mean["pixel_mse"], None)


def _shares(organism: dict) -> list[float]:
    return [number(r["norm_share"]) for r in organism["layers"]]


@_check("sun-explicit-constants")
def _sun_explicit_constants(data: dict) -> Reading:
    orgs = data["organisms"]
    control, affine = _shares(orgs["control"]), _shares(orgs["norm-affine"])
    mx, mn = max(affine) / max(control), (sum(affine) / len(affine)) / (sum(control) / len(control))
    below = mx < 1 - SHARE_MARGIN and mn < 1 - SHARE_MARGIN
    not_below = mx >= 1 - SHARE_MARGIN and mn >= 1 - SHARE_MARGIN
    return Reading(f"LayerNorm share, max / mean over layers: norm-affine {num(max(affine))} / {num(sum(affine) / len(affine))} "
                   f"vs control {num(max(control))} / {num(sum(control) / len(control))}",
                   HOLDS if below else FAILS if not_below else UNCLEAR, None,
                   f"norm-affine / control: max {mx:.2f}x, mean {mn:.2f}x (shrinks = both below {1 - SHARE_MARGIN:.2f}x). "
                   "No CI stored: one draw of 16 prompts.", mx, None)


@_check("dg-timestep-split")
def _dg_timestep_split(data: dict) -> Reading:
    top = [number(r["prompt_share"]) for r in data["decomposition_top"]]
    rnd = [number(r["prompt_share"]) for r in data["decomposition_random"]]
    verdict = HOLDS if max(top) < STEP_DRIVEN else FAILS if min(top) >= STEP_DRIVEN else UNCLEAR
    return Reading(f"prompt share of the top-{K_DISRUPTION}'s variance: median {num(_median(top))} (layers {num(min(top))}-"
                   f"{num(max(top))}); random-{K_DISRUPTION} {num(_median(rnd))}",
                   verdict, None,
                   f"The step explains the majority in {sum(s < STEP_DRIVEN for s in top)} of {len(top)} layers; the prompt still "
                   f"a quarter or more in {sum(s >= 0.25 for s in top)}. No CI stored.", _median(top), None)


@_check("dg-timestep-swap")
def _dg_timestep_swap(data: dict) -> Reading:
    swap = data["organisms"]["control"]["timestep_swap"]
    emb, inp = [number(r["embedding"]) for r in swap], [number(r["input"]) for r in swap]
    verdict = (HOLDS if min(emb) >= EMBEDDING_DRIVEN else FAILS if all(e < EMBEDDING_DRIVEN for e in emb) else UNCLEAR)
    return Reading(f"embedding share {num(min(emb))}-{num(max(emb))}, input {num(min(inp))}-{num(max(inp))} over "
                   f"{len(swap)} layers (channel {swap[0]['channel']})",
                   verdict, None,
                   f"The channel follows the embedding in {sum(e >= EMBEDDING_DRIVEN for e in emb)} of {len(emb)} layers. "
                   "No CI stored.", min(emb), None)


@_check("dg-no-timestep")
def _dg_no_timestep(data: dict) -> Reading:
    org = data["organisms"]["no-timestep"]
    cfg = org["organism_config"]
    line = PRESENT_FACTOR / (cfg["attention_head_dim"] * cfg["num_attention_heads"])
    share = max(_shares(org))
    control = max(_shares(data["organisms"]["control"]))
    quality = "passes the quality bars" if org["quality"]["passes"] else "fails quality bars (" + "; ".join(org["quality"]["fails"]) + ")"
    return Reading(f"top channel's LayerNorm share, max over layers: {num(share)} vs the 'present' line {num(line)} "
                   f"(control {num(control)})",
                   FAILS if share >= line else HOLDS, None,
                   f"Without the timestep embedding a massive channel still forms (present in "
                   f"{sum(s >= line for s in _shares(org))} of {len(org['layers'])} layers). The no-timestep organism {quality}."
                   if share >= line else "No massive channel without the timestep embedding.", share, None)


@_check("dg-detail-not-semantics")
def _dg_detail_not_semantics(data: dict) -> Reading:
    attributes = ("color", "shape", "size", "position")
    base = _one(data["summary"], "summary", kind="baseline")
    zero = {(r["kind"], r["k"]): r for r in data["summary"] if r["op"] == "zero"}
    ks = sorted(k for kind, k in zero if kind == "top")
    detail = next((k for k in ks if base["cleanliness"] - zero[("top", k)]["cleanliness"] >= BREAK_DROP), None)
    worst = lambda r: max(attributes, key=lambda a: base[a] - r[a])
    semantics = next((k for k in ks if base[worst(zero[("top", k)])] - zero[("top", k)][worst(zero[("top", k)])] >= BREAK_DROP), None)
    if detail is None and semantics is None:
        return Reading(f"nothing breaks by {BREAK_DROP:g} up to k = {max(ks)}", UNCLEAR, None, "Neither kind of damage reaches the line.")
    verdict = (HOLDS if semantics is None or (detail is not None and detail < semantics) else
               FAILS if detail is None or semantics < detail else UNCLEAR)
    parts = []
    if detail is not None:
        r = zero[("top", detail)]
        parts.append(f"cleanliness from k = {detail} ({num(base['cleanliness'])} to {with_ci(r['cleanliness'], r['cleanliness_ci'])})")
    if semantics is not None:
        r = zero[("top", semantics)]
        a = worst(r)
        parts.append(f"an attribute from k = {semantics} ({a} {num(base[a])} to {with_ci(r[a], r[f'{a}_ci'])})")
    reading = "Detail breaks first." if verdict == HOLDS else "Content breaks first." if verdict == FAILS else "Both break together."
    if semantics is not None and ("random", semantics) in zero:
        r = zero[("random", semantics)]
        a = worst(r)
        reading += (f" At k = {semantics}, random-{semantics} loses {a} by {num(base[a] - r[a])}"
                    + (": the attribute loss is not specific to the massive channels." if base[a] - r[a] >= BREAK_DROP else "."))
    return Reading("top-k zeroed breaks " + "; ".join(parts), verdict, None, reading,
                   float(detail) if detail is not None else None, None)
