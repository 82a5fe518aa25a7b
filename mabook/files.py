"""Writing results so that an interrupted run loses nothing, and saying what produced them.

Every file mabook writes as a result (the CLI's ``--out`` files, the chapters' big-run summaries
under ``mabook/results/``, statistics and checkpoints) goes through `atomic_path`: the content is
written to a temporary file in the same directory, flushed to disk (fsync), then renamed onto the
target with `os.replace`, which POSIX makes atomic. A run killed at any moment (Ctrl-C, SIGKILL,
a full disk, a power cut after the rename) therefore leaves at the target either the previous
complete file or the new complete file -- never half a JSON. A killed run may leave its temporary
file behind (``.<name>.<random>.tmp``, hidden, never read by mabook).

`provenance` is what every summary JSON records beside its numbers: the mabook version and the
command that produced it (the checkpoint hash is added by the writer that knows it).

What this is not: a lock. Two runs writing one ``--out`` directory at once each leave complete
files, but which run's file survives is whichever renamed last.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed
from pathlib import Path
from typing import Iterator, Sequence

# Test-only: `tests/test_robustness.py` sets this to a file name; the process then kills itself
# (SIGKILL, no clean-up) after writing that file's temporary copy and before renaming it.
KILL_BEFORE_REPLACE_ENV = "MABOOK_TEST_KILL_BEFORE_REPLACE"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)``: `tmp` (same directory) replaces `p` only if the
    block finishes; on any exception, KeyboardInterrupt included, `p` is untouched and `tmp` removed.

    The directory must exist. The new file gets the usual permissions (0666 minus the umask)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: its directory {path.parent} does not exist")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # whatever wrote tmp (safetensors, PIL, open()) is on disk before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if os.environ.get(KILL_BEFORE_REPLACE_ENV) == path.name:
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **open_kwargs):
    """``with atomic_open(p, "w") as f: f.write(...)``: an `open` whose file appears complete or not at all."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a new file: mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_text(path: str | Path, text: str) -> Path:
    """`Path.write_text`, atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def finite(value, default=None):
    """`value` as strict JSON can hold it: NaN and +-infinity become None (JSON's null), numpy
    scalars and arrays Python numbers and lists, tuples lists -- in dicts and lists at any depth.
    `default` converts any other object first (as `json.dumps`'s `default`)."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # without importing numpy here
        value = value.tolist()  # an array: nested lists; a scalar: a Python number
    if isinstance(value, dict):
        return {k: finite(v, default) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, default) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)) or default is None:
        return value
    return finite(default(value))


def number(value) -> float:
    """A number read from a mabook JSON: null (what `write_json` writes for NaN) is NaN."""
    return float("nan") if value is None else float(value)


def write_json(path: str | Path, payload, indent: int = 1, default=None) -> Path:
    """JSON (indent 1, trailing newline, as every mabook JSON), atomically. The text is made before
    the file is opened, so an unserialisable payload leaves nothing behind. Strict JSON: NaN and
    infinities are written as null (`finite`; a reader of a number takes null as NaN, `number`) --
    Python's bare NaN is no JSON, and other readers refuse it."""
    return write_text(path, json.dumps(finite(payload, default), indent=indent, allow_nan=False) + "\n")


REAL_RESULTS = Path(__file__).parent / "results" / "real"  # runs on real models, one folder per model (`real_result_path`)


def real_result_path(model: str, verb: str, root: str | Path | None = None) -> Path:
    """Where `mabook VERB --results` files a real model's summary: results/real/<model>/<verb>.json,
    <model> the hub id with "/" as "--" (a local directory: its name)."""
    name = str(model).rstrip("/")
    slug = name.replace("/", "--") if not Path(name).exists() else Path(name).name
    if not slug or slug in (".", ".."):
        raise ValueError(f"model {model!r} names no folder for its results; allowed: a hub id or a directory")
    return Path(root if root is not None else REAL_RESULTS) / slug / f"{verb}.json"


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Rows as CSV, atomically; the columns are every key any row has, in first-seen order (rows
    lacking a column leave it empty)."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def save_image(image, path: str | Path, format: str | None = None) -> Path:
    """A PIL image saved atomically (format from the suffix unless given)."""
    path = Path(path)
    fmt = format or {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return path


def version() -> str:
    """The installed mabook's version (the source tree's from pyproject.toml if not installed)."""
    try:
        return installed("mabook")
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "unknown"


def command_line(argv: Sequence[str] | None = None, program: str | None = None) -> str:
    """The command as a shell would take it: `program` (default: the running script) and argv."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if program is None:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        if program in ("__main__.py", "cli.py"):
            program = "mabook"
    return shlex.join([program, *map(str, argv)])


def provenance(command: str | None = None, checkpoint_sha256: str | None = None) -> dict:
    """{"mabook_version", "command"} (and "checkpoint_sha256" when given): what a summary JSON
    records beside its numbers."""
    out = {"mabook_version": version(), "command": command if command is not None else command_line()}
    if checkpoint_sha256 is not None:
        out["checkpoint_sha256"] = checkpoint_sha256
    return out


def with_provenance(payload: dict, command: str | None = None) -> dict:
    """`payload` with "mabook_version" and "command" added right after its "checkpoint_sha256" (or
    first); keys the payload already has are kept as they are."""
    extra = {k: v for k, v in provenance(command).items() if k not in payload}
    if "checkpoint_sha256" not in payload:
        return {**extra, **payload}
    out = {}
    for key, value in payload.items():
        out[key] = value
        if key == "checkpoint_sha256":
            out.update(extra)
    return out


def stamp(path: str | Path, command: str) -> Path:
    """Add the provenance fields to a summary JSON written without them (e.g. by an older mabook),
    changing nothing else (but a bare NaN of an older file, which becomes null: `write_json`):
    ``python -m mabook.files stamp FILE "COMMAND"``. Refuses a file whose layout would change (not
    indent-1 JSON as mabook writes it)."""
    path = Path(path)
    text = path.read_text()
    payload = json.loads(text)
    if json.dumps(payload, indent=1) + "\n" != text:
        raise ValueError(f"{path} is not laid out as mabook writes JSON (indent 1); stamping it would rewrite it")
    return write_json(path, with_provenance(payload, command))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "stamp":
        raise SystemExit('usage: python -m mabook.files stamp FILE "COMMAND"')
    print(f"stamped {stamp(sys.argv[2], sys.argv[3])}")
