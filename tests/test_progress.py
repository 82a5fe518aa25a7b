"""Progress bars and time estimates (`mabook.progress`): off without a reader, one estimate line per
heavy loop from one timed step (not the warm-up call), nothing changed in what is computed, and the
command line's --progress / --no-progress."""

from __future__ import annotations

import io
import re
import sys
import time

import numpy as np
import pytest
import torch

from mabook import cli, disruption, progress

CAPTIONS = ["a large red circle at the top left on a black background", "a small blue square at the center on a white background"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class Slow(torch.nn.Module):
    """A stand-in transformer: each call sleeps `first` seconds the first time, `then` after."""

    def __init__(self, first: float, then: float):
        super().__init__()
        self.first, self.then, self.calls = first, then, 0

    def forward(self, x):
        time.sleep(self.first if self.calls == 0 else self.then)
        self.calls += 1
        return x


def _seconds(line: str) -> float:
    value, unit = re.search(r"~ ([\d.]+) (s|min|h|days) ", line).groups()
    return float(value) * {"s": 1, "min": 60, "h": 3600, "days": 86400}[unit]


@pytest.fixture
def automatic(monkeypatch):
    """No environment setting, no command-line choice: the automatic default."""
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv(progress.STATIC_ENV, raising=False)
    progress.configure(None)
    yield
    progress.configure(None)


def test_default_is_off_without_a_reader_on_at_a_terminal_and_off_on_static_pages(automatic, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe, a log, the test suite
    items = [1, 2, 3]
    assert not progress.enabled() and progress.bar(items, "x") is items
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress.enabled()
    monkeypatch.setenv(progress.STATIC_ENV, "1")  # the book build: a widget would be an empty box
    assert not progress.enabled()
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.enabled()
    progress.configure(False)  # the command line's --no-progress wins over the environment
    assert not progress.enabled() and progress.enabled(True)
    with pytest.raises(ValueError, match=r"progress must be True, False or None \(automatic\), got 'yes'"):
        progress.enabled("yes")


def test_bar_shows_every_item_and_none_for_a_single_one(automatic, monkeypatch):
    out = _Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    assert list(progress.bar(range(5), "things", progress=True)) == [0, 1, 2, 3, 4]
    assert "things:" in out.getvalue() and "0/5" in out.getvalue()  # tqdm draws at most every 0.1 s
    one = [7]
    assert progress.bar(one, "one", progress=True) is one


def test_estimate_times_the_second_call_not_the_warm_up(automatic, capsys):
    """40 images x 10 steps at 0.05 s per call of 4 images: ~5 s; the 0.6 s first call would say 60 s."""
    net = Slow(first=0.6, then=0.05)
    with progress.estimate("demo", images=40, steps=10, progress=True) as shown:
        for _ in range(2):  # two batches of 4 images, 10 steps each
            with progress.timed_step(net, images=4):
                for _ in range(10):
                    net(torch.zeros(1))
    assert shown.line.startswith("demo: 40 images x 10 steps ~ ") and shown.line.endswith("(estimated from one timed step)")
    assert 4.5 <= _seconds(shown.line) <= 9, shown.line
    assert capsys.readouterr().err.count("demo: 40 images") == 1


def test_a_one_step_loop_is_timed_on_its_only_call_and_nested_estimates_print_once(automatic, capsys):
    net = Slow(first=0.1, then=0.1)
    with progress.estimate("outer", images=6, steps=1, progress=True) as outer:
        with progress.estimate("inner", images=2, steps=1, progress=True) as inner:
            with progress.timed_step(net, images=2):
                net(torch.zeros(1))
    assert inner is None and 0.25 <= _seconds(outer.line) <= 0.6  # 6 images x 0.05 s
    err = capsys.readouterr().err
    assert "outer: 6 images x 1 steps" in err and "inner" not in err
    with progress.estimate("off", images=6, steps=1, progress=False) as off:
        with progress.timed_step(net, images=2):
            net(torch.zeros(1))
    assert off is None and not net._forward_hooks and not net._forward_pre_hooks


def test_progress_changes_no_image_and_the_outermost_loop_speaks(automatic, trained_organism, capsys):
    _, adapter = trained_organism
    units = [(c, s) for s in (0, 1) for c in CAPTIONS]
    quiet = adapter.generate(units, 2, batch_size=2, progress=False)
    shown = adapter.generate(units, 2, batch_size=2, progress=True)
    assert np.array_equal(quiet, shown)
    assert "generate: 4 images x 2 steps ~ " in capsys.readouterr().err
    base = disruption.baseline(adapter, CAPTIONS, [0], num_inference_steps=2)
    disruption.run(base, disruption.conditions(base, [1], ["top"]), progress=True)
    err = capsys.readouterr().err
    assert "disruption, 1 condition(s) x 2 unit(s): 2 images x 2 steps ~ " in err and "generate:" not in err


def test_cli_progress_flag(automatic, tmp_path, capsys):
    argv = ["discover", "--prompts", "2", "--batch-size", "1", "--num-inference-steps", "2",
            "--out", str(tmp_path / "d")]
    assert cli.build_parser(argv).parse_args(argv).progress is None
    assert cli.build_parser(argv + ["--no-progress"]).parse_args(argv + ["--no-progress"]).progress is False
    assert cli.main(argv + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"sweep discover, 2 shard\(s\): 2 images x 2 steps ~ [\d.]+ s \(estimated from one timed step\)", err), err
    assert progress.enabled() is False  # the command's choice ends with the command (stderr here is no terminal)
    assert cli.main(argv + ["--no-progress"]) == 0
    assert "estimated" not in capsys.readouterr().err
