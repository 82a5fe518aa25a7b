"""Markers declared in pyproject.toml, applied here.

- ``gpu``: needs a CUDA device; skipped (never failed) where there is none, e.g. in CI on CPU.
  The GPU runner (`.github/workflows/gpu.yml`) runs them with ``pytest -m gpu``.
- ``slow``: long-running; skipped unless ``FULL=1``.
- ``heavy``: left out of the fast subset, ``make test-fast`` (``pytest -m "not heavy"``, under two
  minutes on 2 cores): wheel builds, the browser, processes launched by a test (accelerate, a killed
  ``mabook discover``), training runs and big-run re-derivations. ``make test`` runs them all. Applied
  from `HEAVY` below -- one table, so files owned by different people need no edit -- and checked:
  an entry that matches no collected test (a renamed test) is a collection error, not a silently
  slower fast subset.

The committed organism (`trained_organism`) is loaded once per test session and shared by every
module: tests must leave it as they found it (no hooks, the stock scheduler and attention processors;
the modules that use it assert this).
"""

from __future__ import annotations

import os

import pytest

# file name -> None (the whole file) or test-name prefixes: "test_x" covers every parametrization of
# test_x, "test_x[id]" one of them. Measured on 2 cores (issue 19): the rest runs in about 80 s of CPU.
HEAVY: dict[str, tuple[str, ...] | None] = {
    "test_wheel.py": None,  # builds and installs a wheel
    "test_browser.py": None,  # the built book in Chromium
    "test_sweep.py": (  # accelerate launch of two processes
        "test_discover_on_two_processes_equals_one_process",
        "test_disrupt_stopped_on_one_process_resumes_on_two_and_equals_the_one_process_table",
        "test_sinks_sweep_equals_attention_run",
    ),
    "test_robustness.py": (
        "test_a_killed_run_leaves_the_previous_result_or_none",  # mabook discover processes, killed
        "test_another_cpu_kernel_set_agrees_within_the_stated_tolerance",  # a second process
        "test_rederive_",  # the big runs' re-derivations
    ),
    "test_organism.py": (  # training runs (test_training_is_deterministic_for_a_seed, 3 steps, stays)
        "test_a_few_training_steps_lower_the_loss",
        "test_trained_organism_draws_heldout_captions",
        "test_training_resumes_bit_identically",
        "test_emergence_log_is_written_and_read_back",
        "test_corrupt_snapshot_is_refused",
    ),
    "test_cli.py": (
        "test_every_verb_runs_on_a_real_family_with_world_prompts_and_never_judges",  # 4 families x 4 verbs
        "test_bench_train_prints_steps_per_second_and_budget",  # benchmarks: timed loops
        "test_bench_attention_prints_time_and_memory_against_sdpa",
    ),
    "test_bad_input.py": (
        "test_function_rejects_bad_input_clearly[embed-too-few-samples]",  # imports umap (numba: ~25 s of CPU)
        "test_cli_unknown_model_from_the_installed_command_is_one_line",  # a mabook process
    ),
    "test_spatial.py": ("test_embed_bad_input_gives_a_clear_error",),  # imports umap
}


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _heavy(item) -> bool:
    entry = HEAVY.get(item.path.name, ())
    return entry is None or any(item.name.startswith(p) for p in entry)


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect: every collected test is seen
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
    files = {item.path.name for item in items}
    whole_files = not any("::" in str(a) for a in config.args)  # tests picked by node id: nothing to check
    for name, prefixes in HEAVY.items():
        if not whole_files or name not in files or prefixes is None:
            continue
        for p in prefixes:
            if not any(i.path.name == name and i.name.startswith(p) for i in items):
                raise pytest.UsageError(f"tests/conftest.py HEAVY: no test in {name} starts with {p!r} (renamed?); "
                                        "update the table")
    for item in items:
        if _heavy(item):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def trained_organism():
    """(pipe, adapter) of the committed organism, progress bars off: loaded once per test session."""
    import mabook

    pipe, adapter = mabook.load("organism")
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter
