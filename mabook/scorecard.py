"""The claims scorecard: one row per claim, computed from the committed results JSONs.

Every claim the book puts to the test -- from the two 2026 papers (massive activations, Turri et
al., arXiv 2605.13974; attention sinks, arXiv 2605.09313) and from the two rival readings (Sun et
al. 2024: the massive activations are constants, so mean-replacement is harmless; Detail Guidance,
arXiv 2510.11538: they are timestep-driven and carry detail, not semantics) -- is one row of
`CLAIMS`: who claims it, the claim in one sentence, our test in one sentence, the results file and
the fields it reads, and the chapter section that runs the test. `rows` reads the numbers with
their 95 % confidence intervals as the big runs stored them and gives each claim a verdict by the
thresholds below (each claim's check: `mabook.checks`), fixed before any number is read. `load` reads every
``mabook/results/*.json``, `markdown` renders the rows as a table, and the page
``book/scorecard.ipynb`` shows it.

Verdicts (`VERDICTS`):

- ``holds`` / ``fails``: the stored CI clears the claim's line in its direction / in the other.
- ``unclear``: the CI straddles the line (or the data cannot decide).
- ``not testable here``: the organism cannot measure what the paper measured (CLIP-T, HPS-v2 and
  LPIPS need network weights mabook does not load; a claim about named real models needs those
  models). The row then reports a named *proxy* and the proxy's own verdict (`PROXY_VERDICTS`),
  never as if it were the paper's measure: a pixel-MSE ratio is not an LPIPS ratio.
- ``no current result``: the results file is missing, lacks a field the row reads, or was made on
  another checkpoint than the committed organism's (its ``checkpoint_sha256`` is not the sha256 in
  the committed card, as ``tests/test_robustness.py`` checks the big runs).
- ``no test yet``: nothing in the results speaks to the claim.

What this is not: an experiment. Nothing is generated; every number is read from a committed big
run, and importing this module imports neither torch nor the organism.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mabook import claims, files
from mabook.checks import CHECKS, Reading
from mabook.claims import (  # noqa: F401  (re-exported: scorecard.CLAIMS, scorecard.HOLDS, the thresholds)
    ALPHA,
    BREAK_DROP,
    CHAPTERS,
    CLAIMS,
    DG,
    DIFFERENCE_LINE,
    EMBEDDING_DRIVEN,
    FAILS,
    HOLDS,
    HPS_K,
    K_DISRUPTION,
    K_SINK,
    KEEP_MARGIN,
    MA,
    NO_RESULT,
    NO_TEST,
    NOT_TESTABLE,
    PRESENT_FACTOR,
    PROXY_VERDICTS,
    RATIO_LINE,
    SHARE_MARGIN,
    SINKS,
    STEP_DRIVEN,
    SUN,
    UNCLEAR,
    VERDICTS,
    Claim,
    anchor,
)
from mabook.notebook import is_static

RESULTS_DIR = Path(__file__).parent / "results"
# The committed organism's card, `mabook.organism.card_path(mabook.organism.CHECKPOINT)`: named here so
# that the scorecard reads the hash without importing torch (tests/test_scorecard.py checks the two agree).
CARD = Path(__file__).parent / "organism" / "checkpoints" / "organism.json"

# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


def load(results_dir: str | Path | None = None) -> dict[str, dict]:
    """{file name: parsed JSON} for every ``*.json`` in `results_dir` (default: the committed
    ``mabook/results``). A bare NaN or Infinity (files written before 2026-12) parses as a float; a
    null where a number is read (what mabook writes for NaN now) is NaN to every check (`number`)."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def committed_checkpoint(card: str | Path | None = None) -> str:
    """The committed organism's sha256, as its card records it (`mabook.organism.load` checks the
    weights against the same card)."""
    return json.loads(Path(card or CARD).read_text())["sha256"]


def provenance(results: dict[str, dict], checkpoint: str | None = None) -> list[dict]:
    """Per file: its checkpoint hash, mabook version and command, and whether it is current
    (made on the committed organism)."""
    checkpoint = checkpoint or committed_checkpoint()
    return [{"file": name, "checkpoint_sha256": data.get("checkpoint_sha256"), "mabook_version": data.get("mabook_version"),
             "command": data.get("command"), "current": data.get("checkpoint_sha256") == checkpoint}
            for name, data in results.items()]


# ---------------------------------------------------------------------------------------------
# Rows and the table
# ---------------------------------------------------------------------------------------------


def _stale(name: str, data: dict | None, checkpoint: str) -> str | None:
    """Why a file gives no current result, or None when it is current."""
    if data is None:
        return f"mabook/results/{name} is missing: run the chapter with FULL=1."
    made_on = data.get("checkpoint_sha256")
    if made_on != checkpoint:
        return (f"{name} was made on checkpoint {str(made_on)[:12]}, the committed organism is {checkpoint[:12]}: "
                f"regenerate it with `{data.get('command', 'its chapter under FULL=1')}`.")
    return None


def rows(results: dict[str, dict], checkpoint: str | None = None) -> list[dict]:
    """One dict per claim of `CLAIMS`, in order: the claim's fixed fields (id, paper, claim, test,
    file, fields, section, proxy) and what the results give it (result, verdict, proxy_verdict,
    reading, value, ci). `checkpoint`: the sha256 the files must have been made on (default: the
    committed organism's card)."""
    checkpoint = checkpoint or committed_checkpoint()
    out = []
    for claim in CLAIMS:
        row = {"id": claim.id, "paper": claim.paper, "claim": claim.claim, "test": claim.test, "file": claim.file,
               "fields": list(claim.fields), "section": claim.section, "proxy": claim.proxy}
        data = results.get(claim.file)
        why = _stale(claim.file, data, checkpoint)
        check = CHECKS.get(claim.id)
        if why is None and check is None:
            reading = Reading("", NO_TEST, None, "Nothing in the results speaks to this claim yet.")
        elif why is None:
            try:
                reading = check(data)
            except (KeyError, LookupError, IndexError, TypeError, ZeroDivisionError) as e:  # a file without a field it needs
                reading = Reading("", NO_RESULT, None, f"{claim.file} lacks what this row reads ({type(e).__name__}: {e}).")
        else:
            reading = Reading("", NO_RESULT, None, why)
        out.append(row | reading._asdict())
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table: claim (and who claims it), our test (file and fields), result
    with 95 % CI, verdict (with the proxy's, when the paper's measure is not available), reading,
    and a link to the chapter section."""
    header = ["claim", "our test", "result [95 % CI]", "verdict", "reading", "section"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        claim = next(c for c in CLAIMS if c.id == r["id"])
        verdict = f"**{r['verdict']}**" + (f" (proxy: **{r['proxy_verdict']}**)" if r["proxy_verdict"] else "")
        test = f"{r['test']} `{r['file']}`: " + "; ".join(f"`{f}`" for f in r["fields"]) + (f". *{r['proxy']}*" if r["proxy"] else "")
        where = f"{CHAPTERS.get(claim.chapter, claim.chapter)}: [{claim.heading or 'the chapter'}]({r['section']})"
        lines.append("| " + " | ".join(_cell(x) for x in (f"*{r['paper']}*: {r['claim']} (`{r['id']}`)", test, r["result"] or "-",
                                                         verdict, r["reading"], where)) + " |")
    return "\n".join(lines)


THRESHOLDS = ("RATIO_LINE", "DIFFERENCE_LINE", "KEEP_MARGIN", "BREAK_DROP", "STEP_DRIVEN", "EMBEDDING_DRIVEN", "PRESENT_FACTOR",
              "SHARE_MARGIN", "K_DISRUPTION", "K_SINK", "HPS_K", "ALPHA")


def thresholds() -> dict[str, tuple[float, str]]:
    """{name: (value, why)} for every threshold of `THRESHOLDS`; the why is the constant's comment
    in `mabook.claims`, read from the source so that the page and the code cannot disagree."""
    source = Path(claims.__file__).read_text()
    out = {}
    for name in THRESHOLDS:
        m = re.search(rf"^{name} = [^#\n]+#\s*(.+(?:\n#   .+)*)", source, flags=re.M)
        if m is None:
            raise LookupError(f"threshold {name} has no comment saying why")
        out[name] = (globals()[name], " ".join(line.lstrip("# ").strip() for line in m.group(1).splitlines()))
    return out


def thresholds_markdown() -> str:
    """The thresholds as a Markdown list: name, value, why."""
    return "\n".join(f"- `{name} = {value:g}`: {why}." for name, (value, why) in thresholds().items())


def provenance_markdown(results: dict[str, dict], checkpoint: str | None = None) -> str:
    """Where each results file came from, as a Markdown table: checkpoint hash (and whether it is
    the committed organism's), mabook version, command."""
    checkpoint = checkpoint or committed_checkpoint()
    lines = ["| file | checkpoint | mabook | command |", "|---|---|---|---|"]
    for p in provenance(results, checkpoint):
        made = f"`{str(p['checkpoint_sha256'])[:12]}`" + (" (committed organism)" if p["current"] else " (**another checkpoint**)")
        lines.append("| " + " | ".join(_cell(x) for x in (f"`{p['file']}`", made, p["mabook_version"], f"`{p['command']}`")) + " |")
    return f"The committed organism's checkpoint: `{checkpoint[:12]}`.\n\n" + "\n".join(lines)


def real_runs_markdown(root: str | Path | None = None) -> str:
    """The runs on real models filed with `mabook VERB --results` (`files.real_result_path`), as a
    Markdown table: model, verb, file, mabook version, command; a sentence when there are none."""
    folder = Path(root) if root is not None else files.REAL_RESULTS
    found = sorted(folder.glob("*/*.json")) if folder.is_dir() else []
    if not found:
        return ("No run on a real model is filed yet. On a GPU, `mabook VERB --model <hub id> --out DIR --results` files "
                "its summary as `mabook/results/real/<model>/<verb>.json`; commit the file and it is listed here.")
    lines = ["| model | verb | file | mabook | command |", "|---|---|---|---|---|"]
    for path in found:
        data = json.loads(path.read_text())
        cells = (f"`{data.get('model', path.parent.name)}`", data.get("verb", path.stem), f"`{path.relative_to(folder.parent)}`",
                 data.get("mabook_version", ""), f"`{data.get('command', '')}`")
        lines.append("| " + " | ".join(_cell(str(x)) for x in cells) + " |")
    return "\n".join(lines)


def findings(chapter: str, results: dict[str, dict] | None = None, checkpoint: str | None = None,
             brief: bool = False) -> str:
    """A chapter's findings as Markdown, from the committed big runs: for each claim the chapter
    tests (`Claim.chapter`), the verdict, the claim, the number with its 95 % CI and the reading --
    then where the numbers come from (file, checkpoint, command). `brief`: one line per claim
    (verdict, claim, number), for the chapter's Summary. The chapter notebook's name, e.g.
    ``"02_disruption.ipynb"``; the rows are `rows`' own, so the chapter and the scorecard page
    cannot disagree."""
    if chapter not in CHAPTERS:
        raise ValueError(f"chapter {chapter!r} tests no claim; allowed: {list(CHAPTERS)}")
    results = load() if results is None else results
    checkpoint = checkpoint or committed_checkpoint()
    mine = [r for r, c in zip(rows(results, checkpoint), CLAIMS) if c.chapter == chapter]
    lines = []
    for r in mine:
        verdict = f"**{r['verdict']}**" + (f" (proxy: **{r['proxy_verdict']}**)" if r["proxy_verdict"] else "")
        result = f" {r['result']}." if r["result"] else ""
        if brief:
            lines.append(f"- {verdict}: {r['claim']} ({r['paper']}){result}")
        else:
            lines.append(f"- {verdict}: *{r['paper']}*: {r['claim']}{result} {r['reading']}"
                         + (f" *{r['proxy']}*" if r["proxy"] else ""))
    if brief:
        return "\n".join(lines)
    files = list(dict.fromkeys(r["file"] for r in mine))
    made = [p for p in provenance(results, checkpoint) if p["file"] in files]
    sources = "; ".join(f"`{p['file']}` (checkpoint `{str(p['checkpoint_sha256'])[:12]}`"
                        + (", the committed organism" if p["current"] else ", **not the committed organism**")
                        + f"; made by `{p['command']}`)" for p in made) or "no results file yet"
    missing = [f for f in files if f not in results]
    sources += "".join(f"; `{f}` is missing" for f in missing)
    return ("\n".join(lines) + f"\n\nFrom {sources}. Verdict words and their thresholds: "
            f"[the scorecard]({_scorecard_link()}), fixed before the numbers were read.")


def _scorecard_link() -> str:
    """The scorecard page from a chapter: its built page on the static site (a Markdown output's link
    is not resolved by the book build), the notebook in Jupyter."""
    return "../book/scorecard.html" if is_static() else "../book/scorecard.ipynb"
