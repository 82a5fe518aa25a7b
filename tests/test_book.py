"""Checks of the book's sources that need no build: fast, so they run with the unit tests.

The build itself (every chapter executed, every page in a browser) is `python -m mabook.book test`.
"""

from __future__ import annotations

import pkgutil
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

import mabook
from mabook import book, links, notebook

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _first_code_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next((c.source for c in nb.cells if c.cell_type == "code"), "")


# ---------------------------------------------------------------------------------------------
# Table of contents and configuration
# ---------------------------------------------------------------------------------------------


def test_every_toc_entry_exists():
    files = book.toc_files(ROOT)  # raises on an entry with no file
    assert files[0] == "book/intro.md"


def test_every_notebook_is_in_the_toc():
    in_toc = set(book.toc_notebooks(ROOT))
    missing = [p.relative_to(ROOT).as_posix() for p in NOTEBOOKS if p.relative_to(ROOT).as_posix() not in in_toc]
    assert not missing, f"notebooks not in _toc.yml: {missing}"


def test_a_failing_cell_fails_the_build():
    execute = CONFIG["execute"]
    assert execute["raise_on_error"] is True
    assert execute["execute_notebooks"] == "force"  # the cache hashes code cells only
    assert execute["allow_errors"] is False


def test_repository_is_named_consistently():
    assert CONFIG["repository"]["url"] == notebook.REPOSITORY
    assert CONFIG["repository"]["branch"] == notebook.REF
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_mabook_sphinx_extension_is_loaded():
    assert "mabook.book" in CONFIG["sphinx"]["extra_extensions"]


def test_api_page_lists_every_module():
    listed = re.findall(r"```\{automodule\} (\S+)", (ROOT / "book" / "api.md").read_text())
    modules = {m.name for m in pkgutil.walk_packages(mabook.__path__, "mabook.") if not m.name.split(".")[-1].startswith("_")}
    assert sorted(modules - set(listed)) == [], "modules missing from book/api.md"
    assert sorted(set(listed) - modules) == [], "book/api.md lists modules that do not exist"


def test_plotly_js_ships_with_plotly():
    assert book._plotly_js().is_file()


# ---------------------------------------------------------------------------------------------
# Notebooks as committed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them before committing"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_starts_with_setup(path):
    source = _first_code_cell(path)
    assert "from mabook.notebook import setup" in source and "setup(" in source, (
        f"{path.name}: the first code cell must call mabook.notebook.setup()"
    )
    if "%pip install" in source:
        assert f'"{notebook.PIP_SPEC}"' in source, f"{path.name}: Colab must install {notebook.PIP_SPEC!r}"


# ---------------------------------------------------------------------------------------------
# Pieces of the build, without building
# ---------------------------------------------------------------------------------------------


def test_stage_turns_execution_off_and_copies_the_sources(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n")
    (tmp_path / "notebooks").mkdir()
    dest = book.stage(tmp_path, "off")
    try:
        assert "_build" not in dest.parts  # nbmake skips notebooks under any _build folder
        staged = yaml.safe_load((dest / "_config.yml").read_text())
        assert staged["execute"]["execute_notebooks"] == "off"
        assert staged["execute"]["raise_on_error"] is True
        assert (dest / "book" / "intro.md").is_file()
    finally:
        shutil.rmtree(dest)


def test_static_renderer_emits_html_that_uses_the_shipped_plotly():
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    bundle = notebook.StaticPageRenderer().to_mimebundle(fig.to_dict())
    assert list(bundle) == ["text/html"]
    page = bundle["text/html"]
    assert "Plotly.newPlot" in page and "plotly-graph-div" in page
    assert "<script src" not in page and "cdn" not in page.lower()  # no CDN, nothing fetched
    assert len(page) < 50_000  # plotly.js itself is not inlined


def test_setup_reads_full_and_picks_cpu(monkeypatch):
    import torch

    monkeypatch.setenv("FULL", "1")
    monkeypatch.delenv(notebook.STATIC_ENV_VAR, raising=False)
    env = notebook.setup(device="cpu", quiet=True)
    assert env == notebook.Env(device="cpu", dtype=torch.float32, on_colab=False, full=True, static=False)
    monkeypatch.setenv("FULL", "0")
    assert notebook.setup(device="cpu", quiet=True).full is False


def test_a_real_models_pipeline_arguments_are_the_chapters_unless_the_environment_names_others(monkeypatch):
    env = notebook.setup(device="cpu", quiet=True)
    default = {"height": 512, "width": 512}
    monkeypatch.delenv("PIPE_KWARGS", raising=False)
    got = env.pipe_kwargs(default)
    assert got == default and got is not default  # a copy: a chapter may add to it
    monkeypatch.setenv("PIPE_KWARGS", '{"height": 1024, "width": 1024, "use_resolution_binning": false}')
    assert env.pipe_kwargs(default) == {"height": 1024, "width": 1024, "use_resolution_binning": False}
    for bad in ("[512, 512]", "height=1024", "{"):
        monkeypatch.setenv("PIPE_KWARGS", bad)
        with pytest.raises(ValueError) as err:
            env.pipe_kwargs(default)
        assert "\n" not in str(err.value) and repr(bad) in str(err.value) and "JSON object" in str(err.value)
    chapters = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0[1-6]_*.ipynb"))
    for chapter in chapters:  # every chapter with a real-model branch reads it
        assert "env.pipe_kwargs(" in chapter.read_text(), chapter.name


def test_setup_rejects_an_unknown_device():
    with pytest.raises(ValueError, match="device must be"):
        notebook.setup(device="tpu", quiet=True)


def test_widget_note_is_visible_text():
    bundle = notebook._widget_note_bundle(object())
    assert "run" in bundle["text/plain"].lower() and "mabook-widget-note" in bundle["text/html"]


def test_closing_line_is_one_ci_can_read(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase name="a" time="1.5"/>'
        '<testcase name="b" time="0.1"><failure/></testcase>'
        '<testcase name="c" time="0"><skipped/></testcase></testsuite></testsuites>'
    )
    counts, seconds = book.junit_results(junit)
    assert str(counts) == "1 passed, 1 failed, 1 skipped"
    assert seconds == {"a": 1.5, "b": 0.1, "c": 0.0}
    assert re.fullmatch(r"\w+: \d+ passed, \d+ failed(, \d+ skipped)?", f"total: {counts}")



def test_link_check_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "theme.html").write_text('<a href="nowhere.html">third-party</a>')  # not read
    (tmp_path / "book" / "page.html").write_text('<h1 id="sec">S</h1><a name="old-anchor"></a><a href="../index.html#top">up</a>')
    (tmp_path / "index.html").write_text(
        '<div id="top"></div>'
        '<a href="book/page.html#sec">ok</a> <a href="book/page.html#old-anchor">ok</a> <a href="#top">ok</a>'
        '<a href="book/">folder without index</a> <a href="#">ok</a> <a href="https://example.org/x.html">external</a>'
        '<a href="mailto:a@b.c">mail</a> <link rel="stylesheet" href="_static/theme.html"> <script src="_static/missing.js"></script>'
        '<a href="book/missing.html">broken</a> <a href="book/page.html#nope">broken anchor</a> <a href="#gone">broken</a>'
        '<img src="_images/missing%20file.png">'
    )
    broken = links.check_links(tmp_path)
    assert broken == [
        "index.html -> book/: no such file",
        "index.html -> _static/missing.js: no such file",
        "index.html -> book/missing.html: no such file",
        "index.html -> book/page.html#nope: no id 'nope' in book/page.html",
        "index.html -> #gone: no id 'gone' in index.html",
        "index.html -> _images/missing%20file.png: no such file",
    ]
    (tmp_path / "book" / "index.html").write_text("<p>now it exists</p>")
    assert len(links.check_links(tmp_path)) == 5


def test_a_broken_link_fails_the_build(tmp_path):
    ok = book.BuildResult(0, 1.0, tmp_path)
    assert ok.ok
    assert not book.BuildResult(0, 1.0, tmp_path, broken_links=["index.html -> x.html: no such file"]).ok


def test_setup_behaves_as_on_colab_when_told(monkeypatch):
    import sys

    import plotly.io as pio

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv(notebook.STATIC_ENV_VAR, raising=False)
    assert not notebook.on_colab()
    monkeypatch.setenv(notebook.COLAB_ENV_VAR, "1")
    renderer = pio.renderers.default
    try:
        env = notebook.setup(device="cpu", quiet=True)  # no google.colab module here: tolerated
        assert env.on_colab and pio.renderers.default == "colab"
    finally:
        pio.renderers.default = renderer
