"""Per (step, tap, channel) streaming statistics of hidden states: memory independent of tokens and batch.

`mabook.probe.collect` fills one `Statistics` during a pipeline call (``run.stats``): at every tap
and denoising step, each channel's abs_mean, mean, std, max_abs, median_abs and norm_share
(`STATISTICS`, defined in `Statistics`) are accumulated from the hidden states the hook sees
(`channel_moments`: a few fused ops per call) into one (6, channels) float64 tensor and three counts,
whatever the number of tokens or samples. Runs pool exactly (`Statistics.merge`, Chan et al.'s
parallel update): one run per prompt or per process gives the numbers of one run over all.
`save` and `load` keep them as safetensors, in layout `FORMAT`.

Taps and steps are `mabook.probe`'s (see its glossary); this module only keys by them.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mabook.files import atomic_path

STREAMS = ("img", "txt")
CONDITIONING = "temb"  # the opt-in stream of the AdaLN conditioning: one token per sample


@dataclass(frozen=True)
class Tap:
    """The output of block `block_path` (a module path, e.g. "transformer_blocks.2") on one stream."""

    block_path: str
    stream: str = "img"

    def __post_init__(self):
        if not isinstance(self.block_path, str):
            raise TypeError(f"Tap.block_path must be a str, got {type(self.block_path).__name__}")
        if self.stream not in (*STREAMS, CONDITIONING):
            raise ValueError(f"unknown stream {self.stream!r}; allowed: {[*STREAMS, CONDITIONING]}")

    def __str__(self) -> str:
        return f"{self.block_path}.{self.stream}"


STATISTICS = ("abs_mean", "mean", "std", "max_abs", "median_abs", "norm_share")
MEDIAN_TOKENS = 256  # median_abs is exact over at most this many tokens per sample (see channel_moments)
_ROWS = ("abs_mean_sum", "mean", "m2", "median_abs_sum", "max_abs", "norm_var_sum")  # the accumulator's rows
FORMAT = 3  # version of the saved layout (1: E[x^2] - E[x]^2 moments, first-sample medians; 2: no norm_var_sum)


@functools.lru_cache(maxsize=16)
def median_tokens(num_tokens: int) -> torch.Tensor | None:
    """The tokens median_abs reads: all of them up to MEDIAN_TOKENS, else a fixed random subset.

    The subset depends only on the sequence length (seeded by it), never on batching or the call.
    """
    if num_tokens <= MEDIAN_TOKENS:
        return None
    g = torch.Generator().manual_seed(num_tokens)
    return torch.randperm(num_tokens, generator=g)[:MEDIAN_TOKENS].sort().values


def channel_moments(hidden_states: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-channel moments of one call: a few fused ops, no loop over channels.

    hidden_states: (batch_size, sequence_length, channels). Returns (rows (6, channels) float64,
    tokens) with rows as in `_ROWS`: sum over samples of |mean over tokens|; the mean over all
    tokens and samples; m2, the sum of squared deviations from that mean (centred, so a channel at
    1e4 with std 1 keeps its std: E[x^2] - E[x]^2 would cancel to 0 in float32); the sum over
    samples of each sample's median |x| over `median_tokens` (torch's lower median); max |x|; and
    norm_var_sum, the sum over tokens of (x_c - mean of the token over channels)^2: each channel's
    part of the variance a LayerNorm divides by (see `Statistics`, "norm_share").
    """
    x = hidden_states.detach().float()  # statistics never join an autograd graph
    B, N, C = x.shape
    token_mean = x.mean(1)  # (B, C)
    mu = token_mean.mean(0)  # (C,)
    d = x - mu  # exact in float32 where x is near mu (Sterbenz), which is where cancellation would bite
    # mu's own rounding error e = mean(d) is corrected in float64: the exact mean is mu + e, and
    # sum (d - e)^2 = sum d^2 - N e^2 is the centred sum of squares. Each float64 sum is the float32
    # tensor's float64 copy summed (what `sum(dtype=float64)` does), one copy reused for all three.
    wide = d.to(torch.float64)
    e = wide.sum((0, 1)) / (B * N)
    m2 = wide.copy_(d.square_()).sum((0, 1)) - e.square() * (B * N)
    a = torch.abs(x.transpose(1, 2), out=x.new_empty(B, C, N))  # |x|, channels-last: one row per (sample, channel)
    max_abs = a.amax((0, 2))
    idx = median_tokens(N)
    median = lower_median(a if idx is None else a[:, :, idx.to(x.device)], max_abs).sum(0, dtype=torch.float64)  # (C,)
    norm_var = wide.copy_(torch.sub(x, x.mean(2, keepdim=True), out=d).square_()).sum((0, 1))  # (C,)
    rows = torch.stack((token_mean.abs().sum(0, dtype=torch.float64), mu.double() + e, m2.clamp_min(0), median,
                        max_abs.double(), norm_var))
    return rows, B * N


def lower_median(a: torch.Tensor, max_abs: torch.Tensor) -> torch.Tensor:
    """Each row's lower median (sorted index (n - 1) // 2, torch.median's): (batch_size, channels)
    from `a` (batch_size, channels, n), NaN where a row holds a NaN. `a` may be reordered in place.

    On the CPU a selection in numpy (`ndarray.partition`, introselect, in place), 6-10x faster than
    torch.median at the organism's shapes, where the per-sample median was most of what the probe
    cost (issue 23: 1.054x -> 1.146x a bare run when it went from the first sample to every sample).
    `max_abs` (a's max) tells whether a NaN is present: then torch's median, which propagates it
    (a partition would sort it last and return a number)."""
    if a.device.type != "cpu" or bool(max_abs.isnan().any()):
        return a.median(-1).values
    a = a.contiguous()  # a token subset is a copy already
    k = (a.shape[-1] - 1) // 2
    a.numpy().partition(k, axis=-1)
    return a[..., k]


def _combine(a: torch.Tensor, na: int, b: torch.Tensor, nb: int) -> torch.Tensor:
    """Pool two accumulators over na and nb tokens (Chan et al.'s parallel mean/variance update)."""
    n = na + nb
    out = a.clone()
    out[0] += b[0]
    out[3] += b[3]
    delta = b[1] - a[1]
    out[1] = a[1] + delta * (nb / n)
    out[2] = a[2] + b[2] + delta.square() * (na * nb / n)
    torch.maximum(a[4], b[4], out=out[4])
    out[5] += b[5]
    return out


class Statistics:
    """Streaming per-channel statistics of hidden states, per (step, tap).

    Over the tokens of one stream, per channel:
      abs_mean    |mean over tokens| per sample, averaged over samples (the paper's statistic)
      mean        mean over tokens and samples
      std         standard deviation over tokens and samples (population; stable at any mean)
      max_abs     max |x| over tokens and samples
      median_abs  median |x| over tokens per sample (exact for <= MEDIAN_TOKENS tokens, else over a
                  fixed subset of that many), averaged over samples: the same number however the
                  samples are batched
      norm_share  the channel's share of the variance a LayerNorm over channels divides by:
                  sum over tokens of (x_c - token mean)^2 / the same summed over all channels.
                  Comparable across widths (uniform is 1/channels); a massive activation in the
                  LLM sense holds > 0.9 on its tokens, where it acts as a constant after the norm
    Each (step, tap) holds one (6, channels) float64 tensor and three counts (samples, tokens,
    calls): memory does not grow with tokens or batch. Merging is exact (Chan's update).
    """

    def __init__(self):
        self.taps: list[Tap] = []  # in the order first seen (forward order)
        self.timesteps: dict[int, float | None] = {}
        self._acc: dict[tuple[int, Tap], torch.Tensor] = {}
        self._count: dict[tuple[int, Tap], int] = {}  # samples
        self._tokens: dict[tuple[int, Tap], int] = {}  # samples x tokens
        self._calls: dict[tuple[int, Tap], int] = {}  # forward calls

    # -- accumulation (called from the hook) ---------------------------------------------------

    def update(self, tap: Tap, step: int, hidden_states: torch.Tensor) -> None:
        rows, tokens = channel_moments(hidden_states)
        self._add((step, tap), rows, hidden_states.shape[0], tokens, 1)

    def _add(self, key: tuple[int, Tap], rows: torch.Tensor, samples: int, tokens: int, calls: int) -> None:
        if key not in self._acc:
            if key[1] not in self.taps:
                self.taps.append(key[1])
            self._acc[key] = rows.clone()
            self._count[key], self._tokens[key], self._calls[key] = samples, tokens, calls
            return
        self._acc[key] = _combine(self._acc[key], self._tokens[key], rows, tokens)
        self._count[key] += samples
        self._tokens[key] += tokens
        self._calls[key] += calls

    # -- reading ---------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        return sorted({s for s, _ in self._acc})

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators."""
        return sum(a.numel() * a.element_size() for a in self._acc.values())

    def layers(self, stream: str = "img") -> list[Tap]:
        return [t for t in self.taps if t.stream == stream]

    def counts(self, tap: Tap | str, step: int) -> dict[str, int]:
        """{"samples", "tokens", "calls"} accumulated at one (step, tap)."""
        key = (step, self._check("mean", tap, step))
        return {"samples": self._count[key], "tokens": self._tokens[key], "calls": self._calls[key]}

    def _check(self, name: str, tap: Tap | str, step: int | None) -> Tap:
        if name not in STATISTICS:
            raise ValueError(f"unknown statistic {name!r}; allowed: {list(STATISTICS)}")
        found = next((t for t in self.taps if str(t) == str(tap)), None)
        if found is None:
            raise ValueError(f"no statistics for tap {str(tap)!r}; collected: {[str(t) for t in self.taps]}")
        if step is not None and (step, found) not in self._acc:
            raise ValueError(f"no statistics for step {step!r} at {found}; collected steps: {self.steps}")
        return found

    def get(self, name: str, tap: Tap | str, step: int | None = None) -> torch.Tensor:
        """One statistic (channels,) float64 at one tap, at `step` or pooled over all steps (None)."""
        tap = self._check(name, tap, step)
        keys = [(step, tap)] if step is not None else [(s, tap) for s in self.steps if (s, tap) in self._acc]
        acc, tokens = self._acc[keys[0]], self._tokens[keys[0]]
        for k in keys[1:]:
            acc, tokens = _combine(acc, tokens, self._acc[k], self._tokens[k]), tokens + self._tokens[k]
        samples = sum(self._count[k] for k in keys)
        if name == "abs_mean":
            return acc[0] / samples
        if name == "mean":
            return acc[1].clone()
        if name == "std":
            return (acc[2] / tokens).sqrt()
        if name == "median_abs":
            return acc[3] / samples
        if name == "norm_share":
            return acc[5] / acc[5].sum()
        return acc[4].clone()  # max_abs

    def array(self, name: str, stream: str = "img", step: int | None = None) -> np.ndarray:
        """(layers, channels) numpy array of a statistic for every layer of a stream."""
        return np.stack([self.get(name, t, step).cpu().numpy() for t in self.layers(stream)])

    def per_step(self, name: str, stream: str = "img") -> np.ndarray:
        """(steps, layers, channels) numpy array."""
        return np.stack([self.array(name, stream, s) for s in self.steps])

    @classmethod
    def merge(cls, runs: Sequence["Statistics"]) -> "Statistics":
        """Pool several runs (e.g. one per prompt, or one per process) as if collected in one.

        Steps are pooled by index, so the runs must share a schedule: a step whose timestep
        differs between two runs (other num_inference_steps, scheduler or strength) is refused.
        """
        if not runs or not all(isinstance(r, Statistics) for r in runs):
            raise TypeError("merge needs a non-empty sequence of Statistics")
        out = cls()
        for i, r in enumerate(runs):
            for step, t in r.timesteps.items():
                known = out.timesteps.get(step)
                if known is not None and t is not None and not math.isclose(known, t, rel_tol=1e-5, abs_tol=1e-6):
                    raise ValueError(
                        f"cannot merge statistics from different schedules: step {step} ran at timestep {known:g} "
                        f"in an earlier run but at {t:g} in run {i}; merge only runs with the same num_inference_steps, "
                        "scheduler and strength")
                out.timesteps.setdefault(step, t)
            for key, acc in r._acc.items():
                out._add(key, acc, r._count[key], r._tokens[key], r._calls[key])
        out.timesteps = dict(sorted(out.timesteps.items()))
        return out

    # -- files -------------------------------------------------------------------------------------

    def to_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata): one (6, channels) tensor per "{prefix}step/tap" key, in insertion
        order (merging is order-sensitive), and the counts, taps and timesteps as JSON-able data.
        `from_tensors` reads them back; `save` and the sweep's shards store them."""
        tensors = {f"{prefix}{s}/{t}": a.cpu().contiguous() for (s, t), a in self._acc.items()}
        meta = {
            "format": FORMAT,
            "taps": [[t.block_path, t.stream] for t in self.taps],
            "counts": {f"{s}/{t}": c for (s, t), c in self._count.items()},
            "tokens": {f"{s}/{t}": c for (s, t), c in self._tokens.items()},
            "calls": {f"{s}/{t}": c for (s, t), c in self._calls.items()},
            "timesteps": {str(s): v for s, v in self.timesteps.items()},
            "rows": list(_ROWS),
            "median_tokens": MEDIAN_TOKENS,
        }
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors, meta: dict, prefix: str = "") -> "Statistics":
        """Statistics from `to_tensors`' output (tensors: a dict, or anything with get_tensor(key))."""

        if meta.get("format") != FORMAT:
            raise ValueError(f"statistics in format {meta.get('format', 1)}; this mabook reads format {FORMAT}: "
                             "collect them again")
        get = tensors.get_tensor if hasattr(tensors, "get_tensor") else tensors.__getitem__
        stats = cls()
        stats.taps = [Tap(b, s) for b, s in meta["taps"]]
        by_name = {str(t): t for t in stats.taps}
        for key, count in meta["counts"].items():
            step, name = key.split("/", 1)
            k = (int(step), by_name[name])
            stats._acc[k] = get(prefix + key)
            stats._count[k], stats._tokens[k], stats._calls[k] = int(count), int(meta["tokens"][key]), int(meta["calls"][key])
        stats.timesteps = {int(s): v for s, v in meta["timesteps"].items()}
        return stats

    def save(self, path: str | Path) -> None:
        """safetensors: `to_tensors`' tensors, its metadata as JSON. Written atomically
        (`mabook.files.atomic_path`): an interrupted save leaves the previous file or none."""
        tensors, meta = self.to_tensors()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"mabook_statistics": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        """Statistics saved by `save`; a missing, truncated or foreign file is one clear error."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"statistics file not found: {path} (`mabook discover --out DIR` writes DIR/stats.safetensors)")
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("mabook_statistics")
                if raw is None:
                    raise ValueError(f"{path} is not a mabook statistics file (no 'mabook_statistics' metadata)")
                meta = json.loads(raw)
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} holds statistics in format {meta.get('format', 1)}, this mabook reads format "
                                     f"{FORMAT}: collect them again")
                return cls.from_tensors(f, meta)
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                             "collect the statistics again") from None
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has malformed mabook statistics metadata ({type(e).__name__}: {e}); "
                             "collect the statistics again") from None
