"""The attention kernels `python -m mabook.bench attention` times (chapter 6): the stock SDPA call,
capturing the attention mass beside it, and the top-1 sink intervention through the edited SDPA call
or the explicit chunked softmax, on random q, k, v at a real model's shapes."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mabook import softmax
from mabook.realshape import memory_mark

VARIANTS = ("sdpa", "capture", "intervene", "explicit")


def call(variant: str, q, k, v, image: slice, chunk_elements: int, eta: float, dose: str):
    """One attention call as the processor makes it: "sdpa" (the stock call), "capture" (the stock call
    plus the mass), "intervene" (the mass the sinks are chosen from, with each query's logsumexp where
    the dose needs it, then one SDPA call with the top-1 sink edited), "explicit" (the same intervention
    through the explicit chunked softmax: what every intervention cost before issue 23)."""
    if variant == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if variant == "capture":  # the stock output, plus the mass on the side
        out = F.scaled_dot_product_attention(q, k, v)
        softmax.image_query_mass(q, k, image, chunk_elements)
        return out
    if variant == "explicit":
        mass = softmax.image_query_mass(q, k, image, chunk_elements)
        return softmax.attention(q, k, v, [softmax.Edit(mass.topk(1, -1).indices, "score", eta, dose)], chunk_elements)[0]
    if softmax.needs_logsumexp("score", eta, dose):
        mass, lse = softmax.image_query_mass(q, k, image, chunk_elements, lse=True)
    else:
        mass, lse = softmax.image_query_mass(q, k, image, chunk_elements), None
    return softmax.edited_attention(q, k, v, [softmax.Edit(mass.topk(1, -1).indices, "score", eta, dose)], lse, chunk_elements)


def inputs(heads: int, image: int, text: int, head_dim: int, device: str, dtype: str):
    """Seeded random q, k, v (1, heads, text + image, head_dim) and the image keys' slice."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, text + image, head_dim, device=device).to(getattr(torch, dtype)) for _ in range(3))
    return q, k, v, slice(text, text + image)


def peak_memory(variant: str, heads: int, image: int, text: int, head_dim: int, device: str, repeats: int,
                chunk_elements: int, eta: float = 0.0, dose: str = "redistribute", dtype: str = "float32") -> dict:
    """Peak memory of one variant: run it (after one warm-up call) on random (1, heads, text + image, head_dim) tensors in this
    (fresh) process; what the call added over its inputs at its worst moment (`realshape.memory_mark`: on
    CUDA the allocator's peak, on CPU the resident set's high-water mark, reset before the call)."""
    q, k, v, image_slice = inputs(heads, image, text, head_dim, device, dtype)
    call(variant, q, k, v, image_slice, chunk_elements, eta, dose)  # warm-up: kernels' one-time buffers
    base = memory_mark(device)
    start = time.perf_counter()
    for _ in range(repeats):
        call(variant, q, k, v, image_slice, chunk_elements, eta, dose)
    extra = None if base is None else memory_mark(device, base)
    return {"variant": variant, "seconds": (time.perf_counter() - start) / repeats, "extra_bytes": extra}


def times(heads: int, image: int, text: int, head_dim: int, device: str, repeats: int, chunk_elements: int,
          eta: float, dose: str, dtype: str, variants=VARIANTS) -> dict:
    """Seconds of every variant, in one process, interleaved: each round runs every variant once, the
    order reversed every other round (so drift in machine load hits all alike), after one warm-up round."""
    q, k, v, image_slice = inputs(heads, image, text, head_dim, device, dtype)
    seconds = {name: [] for name in variants}
    for r in range(repeats + 1):
        for name in variants if r % 2 == 0 else variants[::-1]:
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call(name, q, k, v, image_slice, chunk_elements, eta, dose)
            if device != "cpu":
                torch.cuda.synchronize()
            if r:
                seconds[name].append(time.perf_counter() - start)
    return seconds
