"""Progress bars and time estimates for the long loops (the chapters' runners, the verbs, `mabook sweep`).

Two things, both off unless someone is there to read them:

- `bar(items, desc)`: the items, wrapped in a `tqdm.auto` bar (a widget in a Jupyter kernel, text
  on a terminal), cleared when the loop ends, so a finished cell or command keeps no bar;
- `estimate(what, images, steps)`: around a heavy loop, one line as soon as one denoising step
  has been timed, e.g. ``disruption, 4 condition(s) x 24 unit(s): 96 images x 20 steps ~ 2.1 min
  (estimated from one timed step)``. The step is timed inside the run itself (`timed_step`, around
  the pipeline calls of `Adapter.generate` and `Adapter.denoise` (`discovery.collect_statistics`) and `spatial.capture`):
  the second transformer call of the loop's first batch (the first carries one-off warm-up),
  divided by the images in that batch. No extra generation
  is made for it, so the estimate costs nothing and never enters a probe that is open around the
  loop. Decoding, text encoding and the metrics are not counted. Nested loops print once: only the
  outermost open estimate speaks.

When is it on? ``progress=True`` / ``False`` where a function takes it; else the process's
default, set by the command line's ``--progress`` / ``--no-progress`` (`configure`) or the
``MABOOK_PROGRESS`` environment variable (1 or 0); else on in a Jupyter kernel and when stderr is
a terminal, and off otherwise: in the test suite, in pipes and logs, and on the book's static pages
(``MABOOK_STATIC=1``), where a widget would be an empty box.

What this is not: a profiler. The estimate assumes every step of every image costs what the timed
one did.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Iterator

ENV = "MABOOK_PROGRESS"  # "1" or "0": the default for every loop of this process
STATIC_ENV = "MABOOK_STATIC"  # the book build's static pages (`mabook.notebook.STATIC_ENV_VAR`)

_forced: bool | None = None  # `configure`'s choice (the command line's --progress / --no-progress)
_open: list["Estimate"] = []  # the estimates open around the running loop, outermost first


def configure(on: bool | None) -> None:
    """The default of every loop in this process: True, False, or None (automatic again)."""
    global _forced
    if on is not None and not isinstance(on, bool):
        raise ValueError(f"progress must be True, False or None (automatic), got {on!r}")
    _forced = on


def in_kernel() -> bool:
    """True inside a Jupyter (IPython kernel) session: a notebook, Colab, nbmake."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _flag(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    return True if value in {"1", "true", "yes", "on"} else False if value in {"0", "false", "no", "off"} else None


def enabled(progress: bool | None = None) -> bool:
    """Whether a loop shows its bar and estimate: `progress` if given, else the default (see the module)."""
    if progress is not None:
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be True, False or None (automatic), got {progress!r}")
        return progress
    if _forced is not None:
        return _forced
    if _flag(ENV) is not None:
        return bool(_flag(ENV))
    if _flag(STATIC_ENV):
        return False
    return in_kernel() or sys.stderr.isatty()


def bar(items: Iterable, desc: str, total: int | None = None, unit: str = "it", progress: bool | None = None):
    """`items`, in a tqdm.auto bar labelled `desc` when progress is on and there are two or more
    (else `items` itself)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if not enabled(progress) or (total is not None and total < 2):
        return items
    from tqdm.auto import tqdm  # deferred: `mabook --help` imports no more than it needs

    return tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def duration(seconds: float) -> str:
    """0.35 s, 12 s, 3.4 min, 2.5 h, 1.2 days."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def say(line: str) -> None:
    """One line beside the bars: stdout in a kernel (the cell's output), stderr elsewhere (not the
    command's output)."""
    out = sys.stdout if in_kernel() else sys.stderr
    try:
        from tqdm.auto import tqdm  # deferred: as in bar

        tqdm.write(line, file=out)
    except ImportError:
        print(line, file=out, flush=True)


class Estimate:
    """An open estimate: `images` images of `steps` steps each, named `what`; `line` once timed."""

    def __init__(self, what: str, images: int, steps: int):
        self.what, self.images, self.steps = what, int(images), int(steps)
        self.line: str | None = None

    def report(self, seconds_per_image_step: float) -> None:
        """Print the line (once) from one timed step's seconds per image."""
        if self.line is not None:
            return
        total = seconds_per_image_step * self.images * self.steps
        self.line = (f"{self.what}: {self.images} images x {self.steps} steps ~ {duration(total)} "
                     "(estimated from one timed step)")
        say(self.line)


@contextlib.contextmanager
def estimate(what: str, images: int, steps: int, progress: bool | None = None) -> Iterator[Estimate | None]:
    """Around a heavy loop: its line is printed when the first `timed_step` inside reports (only the
    outermost open estimate prints; a nested one yields None)."""
    if not enabled(progress) or _open:
        yield None
        return
    for name, value in (("images", images), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"estimate {name} must be an int >= 0, got {value!r}")
    current = Estimate(what, images, steps)
    _open.append(current)
    try:
        yield current
    finally:
        _open.remove(current)


@contextlib.contextmanager
def timed_step(transformer, images: int) -> Iterator[None]:
    """Around one pipeline call of `images` images: times one transformer call (the second, or the
    first when there is only one) and reports it to the open estimate. A no-op when none is open
    or it has already spoken."""
    pending = [e for e in _open[:1] if e.line is None]
    if not pending or images < 1:
        yield
        return
    calls: list[tuple[float, float]] = []

    def before(module, args):
        calls.append((time.perf_counter(), 0.0))

    def after(module, args, output):
        calls[-1] = (calls[-1][0], time.perf_counter())
        if len(calls) == 2:
            report(calls[1])

    def report(call):
        start, stop = call
        pending[0].report((stop - start) / images)

    handles = [transformer.register_forward_pre_hook(before), transformer.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) == 1 and calls[0][1]:
        report(calls[0])
