"""The exercises' registry and verdicts: what every chapter's checks share.

A chapter's module makes its decorator once, ``exercise = chapter("notebooks/<chapter>.ipynb")``,
and registers each check with ``@exercise("N.M", "title")``: the only place where the exercise's
number and the chapter's notebook are written. A check returns a `Verdict` (`right`, `wrong`,
`not_answered` or `cannot_check`); the registered function prints it as one line headed with the
exercise's number, plus the hint, and returns True only when the answer is right.
"""

from __future__ import annotations

import functools
import inspect
import re
import textwrap
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable

# exercise number -> check function; exercise number -> (notebook, title). Filled by @exercise.
CHECKS: dict[str, Callable[..., bool]] = {}
WHERE: dict[str, tuple[str, str]] = {}


@dataclass(frozen=True)
class Verdict:
    """What a check found: `kind` is "right", "wrong", "unanswered" or "unchecked" (the check cannot
    judge these inputs), with the line's text and the hint under it."""

    kind: str
    message: str = ""
    hint: str = ""

    def report(self, number: str) -> bool:
        """Print the verdict as exercise `number`'s line (and its hint); True only when right."""
        line = {
            "right": f"✅ Exercise {number}: correct." + (f" {self.message}" if self.message else ""),
            "wrong": f"❌ Exercise {number}: not yet. {self.message}",
            "unanswered": f"✏️ Exercise {number}: not answered yet (replace the None in the TODO line).",
            "unchecked": f"ℹ️ Exercise {number}: {self.message}",
        }[self.kind]
        if self.hint:
            line += "\n" + textwrap.fill(f"Hint: {self.hint}", width=100, initial_indent="   ", subsequent_indent="         ",
                                         break_long_words=False, break_on_hyphens=False)
        print(line)
        return self.kind == "right"


def right(detail: str = "") -> Verdict:
    """The answer is right; `detail` says what it shows."""
    return Verdict("right", detail)


def wrong(problem: str, hint: str) -> Verdict:
    """The answer is not right yet: `problem` names what is off, `hint` the way to the right one."""
    return Verdict("wrong", problem, hint)


def not_answered(hint: str) -> Verdict:
    """The TODO line is still as committed (the answer is None)."""
    return Verdict("unanswered", hint=hint)


def cannot_check(message: str) -> Verdict:
    """The check cannot judge these inputs (no ground truth, no rows): says why, counts as not right."""
    return Verdict("unchecked", message)


class OrganismOnly:
    """What a chapter passes to its exercises, on a real model, in place of what only the organism's
    run computes (the shapes world's judged pairs, rows, trajectories): any attribute, item, call or
    arithmetic on it gives it back and iterating it gives nothing, so the exercise's cells run as
    written, and the check says it cannot judge on this model instead of raising."""

    def __init__(self, what: str):
        self.what = what

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and IPython's display probe dunders: none is here
            raise AttributeError(name)
        return self

    def __getitem__(self, key):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def _same(self, *args):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _same
    __neg__ = __abs__ = __pow__ = __rpow__ = _same

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return self

    def __repr__(self) -> str:
        return f"<{self.what}: computed on the organism only>"


def chapter_number(notebook: str) -> str:
    """The chapter's number as its title writes it, read from the notebook's name:
    ``notebooks/02b_emergence.ipynb`` -> ``"2b"``."""
    m = re.match(r"(\d+)([a-z]?)_", PurePosixPath(notebook).name)
    if not m:
        raise ValueError(f"{notebook!r} is not a chapter (notebooks/NN_name.ipynb)")
    return f"{int(m.group(1))}{m.group(2)}"


def chapter(notebook: str) -> Callable[[str, str], Callable[[Callable[..., Verdict]], Callable[..., bool]]]:
    """The decorator that registers the checks of `notebook`'s exercises, made once per chapter module."""
    prefix = chapter_number(notebook)

    def exercise(number: str, title: str):
        """Register a check, which returns a `Verdict`, as exercise `number` of the chapter."""
        if number.split(".")[0] != prefix:
            raise ValueError(f"exercise {number} is not in chapter {prefix} ({notebook})")

        def register(fn: Callable[..., Verdict]) -> Callable[..., bool]:
            if number in CHECKS:
                raise ValueError(f"exercise {number} is registered twice")

            signature = inspect.signature(fn)

            @functools.wraps(fn)
            def check(*args, **kwargs) -> bool:
                given = signature.bind(*args, **kwargs).arguments
                missing = [name for name, value in given.items() if isinstance(value, OrganismOnly) and name != "answer"]
                if missing:  # a real model's run has no shapes-world judge: the chapter passes `OrganismOnly` for it
                    return cannot_check(f"cannot be checked on this model: it reads what only the organism's run "
                                        f"computes ({', '.join(missing)}); run the chapter with "
                                        "MODEL = \"organism\" to do it").report(number)
                return fn(*args, **kwargs).report(number)

            # the learner's view (help, the API page): the same arguments, a bool back
            check.__annotations__ = {**fn.__annotations__, "return": "bool"}
            check.__signature__ = signature.replace(return_annotation="bool")
            check.exercise = number
            CHECKS[number] = check
            WHERE[number] = (notebook, title)
            return check

        return register

    return exercise
