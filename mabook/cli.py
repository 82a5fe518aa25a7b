"""Command line: one verb per experiment, each a module of `mabook.experiments`.

    mabook discover  --prompts 16 --out runs/discovery      # chapter 1: statistics + top-k table
    mabook disrupt   --k 1 2 4 8 --out runs/disruption      # chapter 2: top-k vs control channels
    mabook cluster   --tap single_transformer_blocks.1.img --out DIR   # chapter 3: K-means masks, IoU
    mabook transport --source "a red circle ..." --target "a blue square ..." --out DIR   # chapters 4-5
    mabook sinks     --k 1 2 5 10 --out runs/sinks          # chapter 6: sinks vs equal-budget keys
    mabook sweep disrupt --prompts 64 --out runs/sweep      # discover, disrupt or sinks as shards over
                                                            # `accelerate launch` processes (`mabook.sweep`)

Each verb's options, defaults and checks are its module's `Config`; the files it writes are listed
in that module's docstring (`mabook VERB --help` shows both). This module parses, loads the model,
runs the experiment and reports errors; nothing imports it. `mabook sweep` writes the verb's files,
plus the sweep's counts in the summary; shards go to --shards (default OUT/shards) and are skipped
when already there (a killed sweep resumes). Exit code 3: --stop-after N reached (a test hook).

--prompts is a text file (one prompt per line), an integer N (N held-out captions of the shapes
world, for the organism), or the prompts themselves (none of them empty).

Errors and exit codes. A bad value -- an argument out of range, an unknown name, a missing or
corrupt file, a model id that is neither 'organism', a local directory nor loadable from the hub --
prints one line on stderr, ``mabook VERB: error: ...``, naming the value and what is allowed, and
exits with 2 (as argparse does for a malformed command line, which prints the same one line).
``--debug`` (before or after the verb) shows the traceback instead. Ctrl-C prints one line and
exits with 130. 0 is success.

Real models. ``--results`` (after the verb) also files the run's summary JSON as
``mabook/results/real/<model>/<verb>.json`` (`mabook.files.real_result_path`), which the book's
scorecard page lists; refused on the organism, whose findings are the chapters' big runs.

Progress. ``--progress`` / ``--no-progress`` (after the verb): bars over the batches, conditions
and shards, and one line estimating the run's time from one timed denoising step, on stderr
(`mabook.progress`); default: on when stderr is a terminal. The estimate and the bars change no
number.

Interruptions. Every file in --out is written atomically (`mabook.files`: a temporary file in the
same directory, fsync, rename), so a run killed at any moment leaves each file either complete from
the new run, complete from the previous run, or absent -- never half a JSON or PNG. The summary JSON
(topk.json, summary.json, iou.json, transport.json) is written last; it records the command, the
mabook version and the checkpoint hash.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
import warnings
from pathlib import Path

from mabook import files, progress
from mabook.config import read_prompts  # noqa: F401  (the CLI's reading of --prompts, as `mabook.cli.read_prompts`)
from mabook.experiments import SWEEPS, VERBS, module

EXIT_BAD_INPUT = 2  # a bad value (one line on stderr), as argparse's exit code for a bad command line
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, the shell's convention
DEBUG_HELP = "on an error, show the full traceback instead of one line"
PROGRESS_HELP = ("progress bars, and a time estimate from one timed step, on stderr (default: on when stderr is a "
                 "terminal; MABOOK_PROGRESS=0/1 sets it too)")


@contextlib.contextmanager
def _quiet_libraries(debug: bool = False):
    """While loading a model: no FutureWarnings or hub-client chatter on stderr (the error, if any,
    is our one line); with --debug, everything."""
    if debug:
        yield
        return
    from diffusers.utils import logging as diffusers_logging  # deferred, as every heavy import here: `mabook --help`
    from transformers.utils import logging as transformers_logging  # and a bad option answer without loading torch

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def check_device(device: str) -> None:
    import torch  # deferred: see _quiet_libraries

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; allowed: 'cpu', 'cuda', 'cuda:N', 'mps'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA device here; allowed: 'cpu'")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: no MPS device here; allowed: 'cpu'")


def load_model(config, verb: str, debug: bool = False):
    """(pipe, adapter) of `config.model` on `config.device` in `config.dtype`; a pipeline is required."""
    import torch  # deferred: see _quiet_libraries

    from mabook import models

    check_device(config.device)
    with _quiet_libraries(debug):
        pipe, adapter = models.load(config.model, device=config.device, dtype=getattr(torch, config.dtype),
                                    **({"path": config.checkpoint} if config.checkpoint else {}))
    if pipe is None:
        raise ValueError(f"--model {config.model!r} holds only a transformer; `{verb}` needs a pipeline "
                         "(a directory with model_index.json, or a hub id)")
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter


def _out_dir(path: str) -> Path:
    """--out, created; refused if it is an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {path!r} is an existing file; allowed: a directory (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _record(args, config, pipe, seconds: float, **extra) -> dict:
    """What every summary JSON starts with: the settings (the config, the prompts it read, --out, the
    seconds) and the provenance (mabook version, the command, the checkpoint hash)."""
    settings = {"command": args.command, **config.to_dict(), "out": args.out, "prompts": config.prompt_list,
                "seconds": seconds, **extra}
    return {"settings": settings, **files.provenance(args.command_line, getattr(pipe, "card", {}).get("sha256"))}


RESULTS_HELP = ("a real model: also file the run's summary JSON as mabook/results/real/<model>/<verb>.json, which the "
                "book's scorecard page lists (commit it; the organism's findings are the chapters' big runs)")
SUMMARY_FILES = {"discover": "topk.json", "disrupt": "summary.json", "cluster": "iou.json", "sinks": "summary.json",
                 "transport": "transport.json"}  # each verb's summary JSON, written last


def _check_results(args, config) -> None:
    if getattr(args, "results", False) and config.model == "organism":
        raise ValueError("--results files a real model's run; the organism's findings are the chapters' big runs "
                         "(FULL=1 jupyter execute notebooks/...); allowed: --results with --model <hub id or directory>")


def _file_results(args, config, verb: str, out: Path) -> str | None:
    """With --results: the verb's summary JSON copied to `files.real_result_path` (atomically); the line to print."""
    if not getattr(args, "results", False):
        return None
    summary = json.loads((out / SUMMARY_FILES[verb]).read_text())
    target = files.real_result_path(config.model, verb)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(target, {"model": config.model, "verb": verb, **summary})
    return f"filed as {target} (commit it: the scorecard page lists it)"


def run_verb(module, args: argparse.Namespace) -> int:
    """`mabook VERB`: the config (checked), the model, the experiment, its files; a summary on stdout."""
    config = module.Config.from_args(args)
    _check_results(args, config)
    pipe, adapter = load_model(config, args.command, args.debug)
    config.check_adapter(adapter)  # fail before generating, not after
    out = _out_dir(args.out)
    start = time.perf_counter()
    result = module.run(config, adapter)
    seconds = time.perf_counter() - start
    lines = module.write(config, result, out, _record(args, config, pipe, seconds))
    filed = _file_results(args, config, args.command, out)
    print(f"{args.command}: {len(config.prompt_list)} prompt(s) x {len(getattr(config, 'seeds', [0]))} seed(s) x "
          f"{config.num_inference_steps} steps in {seconds:.1f} s -> {out}")
    print("\n".join(lines + ([filed] if filed else [])))
    return 0


def run_sweep(module, args: argparse.Namespace) -> int:
    """`mabook sweep VERB`: the model on this process's device, the shards; the main process merges and writes."""
    from mabook import sweep  # deferred: see _quiet_libraries

    config = module.Config.from_args(args)
    _check_results(args, config)
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is an existing file; allowed: a directory (created if missing)")
    shards = sweep.check_shard_dir(args.shards or out / "shards")
    state = sweep.process_state(config.device)
    if not state.is_main_process:  # one process draws the bars
        progress.configure(False)
    config = config.replace(device=sweep.process_device(state, config.device))
    pipe, adapter = load_model(config, f"sweep {args.experiment}", args.debug)
    config.check_adapter(adapter)
    started = time.perf_counter()
    try:
        result = sweep.run(config, adapter, shards, state=state, stop_after=args.stop_after)
    except sweep.Stopped as e:
        print(f"mabook sweep: process {state.process_index}: {e}", file=sys.stderr)
        return sweep.EXIT_STOPPED
    if result is None:  # not the main process: its shards are written
        return 0
    out.mkdir(parents=True, exist_ok=True)
    c = result.counts
    record = _record(args, config, pipe, result.seconds, experiment=args.experiment, shards=str(shards),
                     stop_after=args.stop_after, processes=state.num_processes)
    record["sweep"] = {"processes": state.num_processes, "shards": c.total, "reused": c.reused, "computed": c.computed,
                       "main_compute_seconds": c.compute_seconds, "main_io_seconds": c.io_seconds,
                       "seconds": time.perf_counter() - started}
    lines = module.write(config, result, out, record)
    filed = _file_results(args, config, args.experiment, out)
    lines += [filed] if filed else []
    print(f"{args.experiment}: {c.total} shards ({c.reused} reused, {c.computed} computed) on {state.num_processes} "
          f"process(es) in {result.seconds:.1f} s -> {out}")
    print("\n".join(lines))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported as the one line every other error is."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _verb_parser(commands, verb: str, run, complete: bool, **defaults) -> argparse.ArgumentParser:
    """A verb's parser: its config's options (`complete`: else only its name and help, so that
    `mabook --help` imports no experiment), --out, and --debug after the verb too."""
    if not complete:
        return commands.add_parser(verb, help=VERBS[verb])
    mod = module(verb)
    doc = (mod.__doc__ or "").split("\n\n", 1)
    parser = commands.add_parser(verb, help=VERBS[verb], description=doc[0], epilog=doc[1] if len(doc) > 1 else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.Config.add_arguments(parser, **defaults)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--results", action="store_true", help=RESULTS_HELP)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=PROGRESS_HELP)
    # SUPPRESS: never resets the top-level flag
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    parser.set_defaults(func=functools.partial(run, mod))
    return parser


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `mabook` parser; with `argv`, only the verb it names is built in full (None: every verb)."""
    words = [a for a in (argv or []) if not a.startswith("-")]
    wanted = set(words[:2]) if argv is not None else set(VERBS)
    parser = _Parser(prog="mabook", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        _verb_parser(commands, verb, run_verb, verb in wanted and (argv is None or words[0] == verb))
    names = ", ".join(SWEEPS)
    sweeps = commands.add_parser("sweep", help=f"run {names} as shards over accelerate's processes; merge",
                                 description=f"mabook sweep {{{names}}} [the verb's options] --out DIR [--shards DIR] "
                                 "[--stop-after N]: the verb's computation as shards (mabook.sweep)")
    experiments = sweeps.add_subparsers(dest="experiment", required=True, metavar="{" + ",".join(SWEEPS) + "}")
    for verb in SWEEPS:
        complete = argv is None or (words[:1] == ["sweep"] and verb in wanted)
        parser_ = _verb_parser(experiments, verb, run_sweep, complete, device="auto")
        if complete:
            parser_.add_argument("--shards", default=None, help="shard directory (default OUT/shards; several machines: "
                                 "a shared one)")
            parser_.add_argument("--stop-after", type=int, default=None, help="test hook: stop after this process wrote N "
                                 "shards")
    return parser


# Bad input, as our checks raise it: a bad value (ValueError, TypeError, KeyError), a missing or
# unreadable file or a model that cannot be loaded (OSError: FileNotFoundError, models.ModelNotFoundError).
BAD_INPUT = (ValueError, TypeError, KeyError, OSError)


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        text = f"unknown key {error.args[0]!r}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """The `mabook` command: 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    words = [a for a in argv if a != "--debug"]
    if len(words) > 1 and words[0] == "sweep" and not words[1].startswith("-") and words[1] not in SWEEPS:
        print(f"mabook sweep: error: unknown experiment {words[1]!r}; allowed: {list(SWEEPS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = build_parser(argv).parse_args(argv)
    args.command_line = files.command_line(argv, "mabook")
    progress.configure(getattr(args, "progress", None))  # this command's choice; automatic again afterwards
    try:
        return _run(args)
    finally:
        progress.configure(None)


def _run(args: argparse.Namespace) -> int:
    """The parsed command: its exit code, bad input and Ctrl-C as one line (--debug: the traceback)."""
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mabook {args.command}: interrupted; every file already in --out is complete (written atomically)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except BAD_INPUT as e:  # bad input: one line, no traceback
        print(f"mabook {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
