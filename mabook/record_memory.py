"""What a transport record costs in memory, known before anything is generated: `record_bytes`
(from `transport.record`'s arguments alone), `check_memory` (its refusal over a budget), and
`bytes_recorded` (the same count from shapes alone, for the benchmarks)."""

from __future__ import annotations

from typing import Sequence

import torch

from mabook import probe
from mabook.models import Adapter


def padded_text_tokens(adapter: Adapter, pipe_kwargs: dict) -> int:
    """The text tokens a text-stream tap carries per sample (what the pipeline pads the prompt to):
    the organism's max_text_length, FLUX's T5 max_sequence_length (512), SD3's 77 CLIP + 256 T5."""
    if adapter.family.name == "organism":
        return int(adapter.pipe.organism_config.max_text_length)
    if adapter.family.name == "flux":
        return int(pipe_kwargs.get("max_sequence_length") or 512)
    if adapter.family.name == "sd3":  # CLIP's tokens (77) joined with T5's
        return int(getattr(adapter.pipe, "tokenizer_max_length", 77)) + int(pipe_kwargs.get("max_sequence_length") or 256)
    return 0  # PixArt, SANA: no text stream


def record_bytes(adapter: Adapter, chosen: dict[str, list[int]], steps: Sequence[int], mask: torch.Tensor,
                 pipe_kwargs: dict) -> int:
    """The bytes `record` will hold: per tap, its tokens (image taps: the masked tokens of every
    unit; text taps: `padded_text_tokens` per unit; the conditioning: one per unit) x its channels x the
    steps x the guidance halves (2 where the family batches [uncond; cond]) x the bytes per value
    of the transformer's dtype."""
    param = next(adapter.transformer.parameters())
    halves = 2 if adapter.family.guidance_batch else 1
    units = mask.shape[0]
    per_tap = {"img": int(mask.sum()), "txt": units * padded_text_tokens(adapter, pipe_kwargs), probe.CONDITIONING: units}
    values = sum(per_tap[tap.rsplit(".", 1)[1]] * len(cs) for tap, cs in chosen.items())
    return values * len(steps) * halves * param.element_size()


def size_text(n: float) -> str:
    """A byte count for a reader: 45.2 GB, 3.1 MB, 1.02 kB, 512 bytes."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g} bytes"


def check_memory(adapter: Adapter, chosen: dict[str, list[int]], steps: Sequence[int], mask: torch.Tensor,
                 pipe_kwargs: dict, all_channels: bool, max_bytes: int | None) -> int:
    """`record`'s refusal, before generating: every channel of a model other than the organism
    without `max_bytes`, or any record over `max_bytes`. Returns the estimate (`record_bytes`)."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)) or max_bytes < 0):
        raise ValueError(f"max_bytes must be a number of bytes >= 0 (or None), got {max_bytes!r}")
    need = record_bytes(adapter, chosen, steps, mask, pipe_kwargs)
    what = (f"{len(chosen)} taps x {len(steps)} steps x {mask.shape[0]} unit(s), "
            f"{max(len(cs) for cs in chosen.values())} channels per tap")
    if all_channels and adapter.family.name != "organism" and max_bytes is None:
        raise ValueError(f"record: channels='all' of {adapter.family.name} keeps ~{size_text(need)} in host memory "
                         f"({what}; estimated before generating); allowed: name the channels (e.g. a top-k set), or "
                         f"pass max_bytes >= {need} to allow it")
    if max_bytes is not None and need > max_bytes:
        raise ValueError(f"record: {what} keeps ~{size_text(need)}, over max_bytes={max_bytes:g}; allowed: fewer "
                         f"channels, taps, steps or units, or max_bytes >= {need}")
    return need


def bytes_recorded(blocks: int, tokens: int, steps: int, k: int, bytes_per_value: int = 2, halves: int = 2) -> int:
    """What a record of k channels costs at `blocks` image taps x `tokens` x `steps`, both CFG halves."""
    return blocks * tokens * steps * k * bytes_per_value * halves
