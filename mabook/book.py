"""Build and test the published book: ``python -m mabook.book build|test|gpu``.

``build``  executes every chapter (forced; a failing cell fails the build) and writes the static
           site to ``_build/html``; prints per-chapter execution time. Every local link and
           anchor of the site is then checked offline (`mabook.links`): a broken one fails the build.
``links``  that check alone, on an already built site.
``test``   what CI runs (``make test``): 1. the unit tests; 2. every chapter executed once under
           nbmake, in a staged copy (`stage_dir`, under the temp dir) so the committed notebooks stay free of
           outputs; 3. the book built from that stage with execution off, reusing those outputs;
           4. the real-browser test of the built pages (headless Chromium). Ends with one line
           ``total: N passed, N failed, N skipped`` over all four parts; exits non-zero if any
           part failed.
``gpu``    the GPU runner (``.github/workflows/gpu.yml``): the ``gpu``-marked tests, then the
           chapters under nbmake with ``MODEL`` set to a real model, then the book from them.

``FULL=1`` in the environment switches the chapters to their big settings (kernels inherit it).

This module is also a Sphinx extension (listed in ``_config.yml``), because a static page needs
three things that Jupyter Book does not do by itself:

- plotly.js, copied from the installed plotly package into ``_static`` and loaded only on pages
  that hold a figure (no CDN at reading time); MathJax likewise, from the ``django-static-mathjax``
  package;
- ``MABOOK_STATIC=1`` in the environment of the kernels that Jupyter Book starts, so that
  `mabook.notebook.setup` emits figures as HTML and replaces widgets by a note;
- the execution time of every chapter, written to ``_build/exec_times.json``.

What this is not: a replacement for ``jupyter-book``; it stages sources, calls it and reads its log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import plotly

from mabook.links import check_links
from mabook.notebook import STATIC_ENV_VAR

# What the book is made of, relative to the repository root. The stage copies exactly these.
SOURCES = ("_config.yml", "_toc.yml", "book", "notebooks")
BUILD_DIR = "_build"
EXECUTED_DIR = "_build/notebooks"  # the chapters as executed by `test`/`gpu` (CI artifacts)
HTML_DIR = "_build/html"
EXEC_TIMES = "_build/exec_times.json"
BOOK_LOG = "_build/book.log"
SCREENSHOTS = "_build/screenshots"

CELL_TIMEOUT_S = 900  # per cell, as `execute.timeout` in _config.yml
GPU_CELL_TIMEOUT_S = 3600  # a real model with FULL=1
BUDGET_S = 600  # the whole book must build on 2 CPU cores within this (issue #4)

# Warnings that mean a reader would see a broken page. Any of these fails the build.
FATAL_WARNINGS = (
    "mystnb.unknown_mime_type",  # an output (e.g. a plotly figure) silently dropped from the page
    "autodoc: failed to import",  # an API page without its content
    "toctree contains reference to nonexisting document",
    "image file not readable",
    "Executing notebook failed",
)


# ---------------------------------------------------------------------------------------------
# Paths and sources
# ---------------------------------------------------------------------------------------------


def repo_root() -> Path:
    """The repository root: the working directory if it holds ``_toc.yml``, else the checkout
    this module was imported from (an editable install)."""
    cwd = Path.cwd()
    if (cwd / "_toc.yml").is_file():
        return cwd
    here = Path(__file__).resolve().parents[1]
    if (here / "_toc.yml").is_file():
        return here
    raise FileNotFoundError("run from the repository root (no _toc.yml found)")


def toc_files(root: Path) -> list[str]:
    """Every document of ``_toc.yml`` (root first), as paths relative to the root with suffix."""
    import yaml  # deferred: PyYAML comes with the optional `book` extra (jupyter-book)

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    names: list[str] = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                names.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    found = []
    for name in names:
        matches = [s for s in (".ipynb", ".md") if (root / f"{name}{s}").is_file()]
        if not matches and Path(name).suffix and (root / name).is_file():
            matches = [""]
        if not matches:
            raise FileNotFoundError(f"_toc.yml lists {name!r}, but neither {name}.ipynb nor {name}.md exists")
        found.append(f"{name}{matches[0]}")
    return found


def toc_notebooks(root: Path) -> list[str]:
    """The chapters that are notebooks, in book order."""
    return [f for f in toc_files(root) if f.endswith(".ipynb")]


def stage_dir(root: Path) -> Path:
    """Where the book sources are staged: outside the repository, because nbmake refuses to
    collect notebooks under any ``_build`` folder. One per checkout."""
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / "mabook-stage" / key


def stage(root: Path, execute: str, *, notebooks: bool = True) -> Path:
    """Copy the book sources (see `stage_dir`), with ``execute_notebooks: execute``.

    notebooks: False keeps the staged notebooks (and the outputs nbmake wrote into them) and
    refreshes everything else, e.g. to rebuild the pages after editing markdown.
    """
    dest = stage_dir(root)
    if notebooks and dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "_build")
    for name in SOURCES:
        if name == "notebooks" and not notebooks:
            continue
        src, dst = root / name, dest / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dst)
    stage_config(dest, execute)
    return dest


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    returncode: int
    seconds: float
    html: Path
    exec_times: dict[str, float] = field(default_factory=dict)
    fatal: list[str] = field(default_factory=list)
    warnings: int = 0
    broken_links: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.fatal and not self.broken_links


def _run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Run cmd, streaming its output to the console and to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def jupyter_book(source: Path, root: Path, log: Path) -> int:
    """``jupyter-book build source --path-output root``: HTML lands in ``root/_build/html``."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
        "build",
        str(source),
        "--path-output",
        str(root),
        "--all",  # a fresh environment: otherwise unchanged chapters are neither read nor executed
    ]
    env = dict(os.environ, **{STATIC_ENV_VAR: "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    return _run_logged(cmd, log, env=env)


def build(root: Path | None = None, *, execute: bool = True) -> BuildResult:
    """Build the book into ``_build/html``.

    execute: True runs every chapter (``make book``); False builds from the outputs already in
    the staged notebooks (``test``, after nbmake ran them).
    """
    root = root or repo_root()
    t0 = time.perf_counter()
    if execute:
        source = stage(root, "force")
    else:
        if not (stage_dir(root) / "notebooks").is_dir():
            raise FileNotFoundError(f"nothing staged in {stage_dir(root)}: run the chapters first (`test`)")
        source = stage(root, "off", notebooks=False)
    times_file = root / EXEC_TIMES
    times_file.unlink(missing_ok=True)
    html = root / HTML_DIR
    if html.exists():
        shutil.rmtree(html)  # a stale page must not pass the browser test
    log = root / BOOK_LOG
    print(f"== jupyter-book build {source} (execute={'force' if execute else 'off'})", flush=True)
    rc = jupyter_book(source, root, log)
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())  # drop terminal colours
    fatal = [line for line in text.splitlines() if any(p in line for p in FATAL_WARNINGS)]
    warnings = sum(1 for line in text.splitlines() if "WARNING:" in line)
    exec_times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    broken = check_links(html) if (html / "index.html").is_file() else []
    result = BuildResult(rc, time.perf_counter() - t0, html, exec_times, fatal, warnings, broken)
    _report_build(result)
    return result


def stage_config(source: Path, execute: str) -> None:
    """Set ``execute.execute_notebooks`` in the staged ``_config.yml``."""
    import yaml  # deferred: as in toc_files

    config_file = source / "_config.yml"
    config = yaml.safe_load(config_file.read_text())
    config.setdefault("execute", {})["execute_notebooks"] = execute
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))


def _report_build(result: BuildResult) -> None:
    print()
    if result.exec_times:
        print("Chapter execution time (jupyter-book):")
        for name, seconds in result.exec_times.items():
            print(f"  {seconds:8.1f} s  {name}")
        print(f"  {sum(result.exec_times.values()):8.1f} s  all chapters")
    print(f"Book build: {result.seconds:.1f} s ({result.warnings} warnings; log: {BOOK_LOG})")
    if result.seconds > BUDGET_S:
        print(f"NOTE: the build took longer than the {BUDGET_S} s budget of issue #4")
    for line in result.fatal:
        print(f"FATAL: {line}")
    for line in result.broken_links:
        print(f"BROKEN LINK: {line}")
    if result.ok:
        print(f"HTML: {result.html / 'index.html'}")
    else:
        print(f"Book build FAILED (exit code {result.returncode}, {len(result.fatal)} fatal warnings, "
              f"{len(result.broken_links)} broken links)")


# ---------------------------------------------------------------------------------------------
# Testing
# ---------------------------------------------------------------------------------------------


@dataclass
class Counts:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def __iadd__(self, other: Counts) -> Counts:
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped
        return self

    def __str__(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def junit_results(path: Path) -> tuple[Counts, dict[str, float]]:
    """Counts and per-test seconds from a pytest JUnit XML file."""
    counts, seconds = Counts(), {}
    if not path.is_file():
        return counts, seconds
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            counts.failed += 1
        elif "skipped" in tags:
            counts.skipped += 1
        else:
            counts.passed += 1
        name = case.get("name", "")
        seconds[name] = float(case.get("time", 0.0))
    return counts, seconds


def pytest(args: list[str], junit: Path, env: dict[str, str] | None = None) -> tuple[int, Counts, dict[str, float]]:
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    print("== " + " ".join(["pytest", *args]), flush=True)
    rc = subprocess.call(cmd, env=env)
    counts, seconds = junit_results(junit)
    if rc not in (0, 5) and counts.failed == 0:
        counts.failed += 1  # pytest failed outside any test (collection error, crash)
    return (0 if rc == 5 else rc), counts, seconds


def run_chapters(
    root: Path, junit: Path, *, timeout: int = CELL_TIMEOUT_S, env: dict[str, str] | None = None
) -> tuple[int, Counts, dict[str, float]]:
    """Execute every chapter once under nbmake, in the stage, writing outputs into the staged
    copies (``--overwrite``) for the book build to reuse, and copying them to ``_build/notebooks``."""
    source = stage(root, "off")
    notebooks = [str(source / nb) for nb in toc_notebooks(root)]
    if not notebooks:
        print("no notebooks in _toc.yml")
        return 0, Counts(), {}
    env = dict(env or os.environ, **{STATIC_ENV_VAR: "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    args = ["--nbmake", "--overwrite", f"--nbmake-timeout={timeout}", f"--rootdir={source}", "-v", *notebooks]
    rc, counts, seconds = pytest(args, junit, env=env)
    print("Chapter execution time (nbmake):")
    for nb in notebooks:
        name = Path(nb).name
        print(f"  {seconds.get(name, float('nan')):8.1f} s  {Path(nb).relative_to(source)}")
    print(f"  {sum(seconds.values()):8.1f} s  all chapters")
    executed = root / EXECUTED_DIR
    if executed.exists():
        shutil.rmtree(executed)
    shutil.copytree(source / "notebooks", executed, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return rc, counts, seconds


def chromium_path() -> str | None:
    """The Chromium binary the browser test drives (``CHROMIUM`` overrides)."""
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    """Install Debian's chromium when it is missing (CI starts from a fresh machine)."""
    found = chromium_path()
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise RuntimeError("Chromium is missing and apt-get is not available: install chromium, or set CHROMIUM")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("== installing chromium (apt-get)", flush=True)
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "chromium"], check=True, env=env, stdout=subprocess.DEVNULL)
    found = chromium_path()
    if not found:
        raise RuntimeError("apt-get installed chromium but no chromium binary is on PATH")
    return found


def test(root: Path | None = None, *, browser: bool = True) -> int:
    """The whole test suite (what CI runs). Returns the exit code."""
    root = root or repo_root()
    t0 = time.perf_counter()
    out = root / BUILD_DIR
    out.mkdir(exist_ok=True)
    total = Counts()
    failed_parts = []
    timings = {}

    def part(name: str, rc: int, counts: Counts, started: float) -> None:
        nonlocal total
        total += counts
        timings[name] = time.perf_counter() - started
        if rc != 0:
            failed_parts.append(name)

    # 1. unit tests
    t = time.perf_counter()
    rc, counts, _ = pytest(["tests", "--ignore=tests/test_browser.py", "-q", "--durations=5"], out / "junit-unit.xml")
    part("unit tests", rc, counts, t)

    # 2. every chapter once, under nbmake, in the stage
    t = time.perf_counter()
    rc, counts, _ = run_chapters(root, out / "junit-notebooks.xml")
    part("notebooks (nbmake)", rc, counts, t)

    # 3. the book from the staged outputs (execution off)
    t = time.perf_counter()
    result = build(root, execute=False)
    part("book build", 0 if result.ok else 1, Counts(passed=1) if result.ok else Counts(failed=1), t)

    # 4. the built pages in a real browser (also after fatal warnings: a page that exists is checked)
    if browser and (result.html / "index.html").is_file():
        t = time.perf_counter()
        try:
            ensure_chromium()
            env = dict(os.environ, MABOOK_REQUIRE_BROWSER="1", MABOOK_HTML=str(result.html))
            rc, counts, _ = pytest(["tests/test_browser.py", "-q"], out / "junit-browser.xml", env=env)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f"browser test could not start: {e}")
            rc, counts = 1, Counts(failed=1)
        part("browser test", rc, counts, t)
    elif browser:
        print("browser test skipped: the book did not build")
        failed_parts.append("browser test (not run)")

    print()
    print("Time per part:")
    for name, seconds in timings.items():
        print(f"  {seconds:8.1f} s  {name}")
    print(f"  {time.perf_counter() - t0:8.1f} s  all")
    if failed_parts:
        print("FAILED: " + ", ".join(failed_parts))
    print(f"total: {total}")
    return 1 if failed_parts else 0


def gpu(root: Path | None = None) -> int:
    """The GPU runner: gpu-marked tests, then the chapters on ``MODEL``, then the book."""
    root = root or repo_root()
    out = root / BUILD_DIR
    out.mkdir(exist_ok=True)
    print(f"MODEL={os.environ.get('MODEL', 'organism')} FULL={os.environ.get('FULL', '0')}")
    rc1, c1, _ = pytest(["tests", "-m", "gpu", "-v", "--ignore=tests/test_browser.py"], out / "junit-gpu.xml")
    rc2, c2, _ = run_chapters(root, out / "junit-notebooks.xml", timeout=GPU_CELL_TIMEOUT_S)
    result = build(root, execute=False)
    total = Counts()
    total += c1
    total += c2
    print(f"total: {total}")
    return 0 if (rc1 == 0 and rc2 == 0 and result.ok) else 1


def bench_book(root: Path | None = None, *, execute: bool = True) -> dict[str, float]:
    """Build the book once and time it, for ``python -m mabook.bench book``.

    Returns seconds per chapter (keys: notebook paths such as ``notebooks/00_model_organism.ipynb``)
    plus ``"book build"`` (the whole build, wall clock). Raises RuntimeError if the build fails.
    """
    result = build(root, execute=execute)
    if not result.ok:
        raise RuntimeError(f"book build failed (see {BOOK_LOG})")
    return {**result.exec_times, "book build": result.seconds}


# ---------------------------------------------------------------------------------------------
# Sphinx extension (loaded by jupyter-book through _config.yml: sphinx.extra_extensions)
# ---------------------------------------------------------------------------------------------

PLOTLY_JS = "plotly.min.js"
MATHJAX_DIR = "mathjax"
# The parts of MathJax 3's es5 distribution that tex-mml-chtml.js loads (fonts, TeX extensions
# on demand, the accessibility menu); the other combined bundles are not needed.
_MATHJAX_PARTS = ("tex-mml-chtml.js", "output/chtml", "input/tex/extensions", "a11y", "ui", "sre", "adaptors")


def _plotly_js() -> Path:
    return Path(plotly.__file__).parent / "package_data" / PLOTLY_JS


def _mathjax_es5() -> Path | None:
    try:
        import mathjax  # the django-static-mathjax distribution: MathJax 3 as package data
    except ImportError:
        return None
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    return es5 if (es5 / "tex-mml-chtml.js").is_file() else None


def _on_config_inited(app, config) -> None:
    if _mathjax_es5() is not None:
        config.mathjax_path = f"{MATHJAX_DIR}/tex-mml-chtml.js"  # relative to _static
    else:
        from sphinx.util import logging  # deferred: Sphinx comes with the optional `book` extra; this runs inside it

        logging.getLogger(__name__).warning(
            "mabook: django-static-mathjax is not installed, math loads MathJax from a CDN"
        )


def _on_page_context(app, pagename, templatename, context, doctree) -> None:
    _dedupe_scripts(context.get("script_files"))
    if "plotly-graph-div" in (context.get("body") or ""):
        app.add_js_file(PLOTLY_JS)  # only this page; Sphinx resets the list for every page


def _dedupe_scripts(scripts) -> None:
    """Drop repeated inline scripts. sphinx-thebe adds its inline configuration with filename
    None, Sphinx 7.4 re-adds it from its registry with filename "", and the page then declares
    ``const THEBE_JS_URL`` twice: a JavaScript error on every page."""
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:
        attributes = getattr(js, "attributes", {}) or {}
        key = (getattr(js, "filename", js) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def _on_build_finished(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    static.mkdir(exist_ok=True)
    shutil.copy2(_plotly_js(), static / PLOTLY_JS)
    es5 = _mathjax_es5()
    if es5 is not None:
        for part in _MATHJAX_PARTS:
            src, dst = es5 / part, static / MATHJAX_DIR / part
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    _write_exec_times(app)


def _write_exec_times(app) -> None:
    """Per-chapter execution seconds from myst-nb's metadata -> ``<outdir>/../exec_times.json``."""
    metadata = getattr(app.env, "nb_metadata", {}) or {}
    times = {}
    for docname in sorted(metadata):
        data = metadata[docname].get("exec_data")
        if data and data.get("runtime") is not None:
            times[str(app.env.doc2path(docname, base=False))] = round(float(data["runtime"]), 2)
    (Path(app.outdir).parent / "exec_times.json").write_text(json.dumps(times, indent=1))


def setup(app):
    """Sphinx entry point (this module is listed in ``_config.yml`` under extra_extensions)."""
    # Kernels started by this build inherit the environment: mark their output as a static page.
    os.environ[STATIC_ENV_VAR] = "1"
    app.connect("config-inited", _on_config_inited)
    app.connect("html-page-context", _on_page_context)
    app.connect("build-finished", _on_build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mabook.book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="execute every chapter and build _build/html")
    b.add_argument("--no-execute", action="store_true", help="build from the staged outputs of a previous test run")
    t = sub.add_parser("test", help="unit tests, chapters under nbmake, book build, browser test")
    t.add_argument("--no-browser", action="store_true", help="skip the real-browser test")
    sub.add_parser("gpu", help="the GPU runner: gpu tests and the chapters on $MODEL")
    k = sub.add_parser("links", help="check every local link and anchor of a built site (offline)")
    k.add_argument("html", nargs="?", default=None, help=f"the site (default: {HTML_DIR})")
    args = parser.parse_args(argv)
    if args.command == "build":
        return 0 if build(execute=not args.no_execute).ok else 1
    if args.command == "test":
        return test(browser=not args.no_browser)
    if args.command == "links":
        site = Path(args.html) if args.html else repo_root() / HTML_DIR
        broken = check_links(site)
        for line in broken:
            print(f"BROKEN LINK: {line}")
        print(f"{len(broken)} broken links in {site}")
        return 1 if broken else 0
    return gpu()


if __name__ == "__main__":
    sys.exit(main())
