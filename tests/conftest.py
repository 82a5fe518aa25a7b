"""Markers declared in pyproject.toml, applied here.

- ``gpu``: needs a CUDA device; skipped (never failed) where there is none, e.g. in CI on CPU.
  The GPU runner (`.github/workflows/gpu.yml`) runs them with ``pytest -m gpu``.
- ``slow``: long-running; skipped unless ``FULL=1``.
"""

from __future__ import annotations

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    wants_gpu = [item for item in items if "gpu" in item.keywords]
    if wants_gpu and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (the gpu marker)")
        for item in wants_gpu:
            item.add_marker(skip)
    if os.environ.get("FULL", "").strip().lower() not in {"1", "true", "yes", "on"}:
        skip = pytest.mark.skip(reason="slow: run with FULL=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def trained_organism():
    """(pipe, adapter) of the committed organism, progress bars off (one per test module)."""
    import mabook

    pipe, adapter = mabook.load("organism")
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter
