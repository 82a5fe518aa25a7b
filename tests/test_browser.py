"""The built book in a real browser: every page of ``_build/html`` loaded by headless Chromium.

Run by ``python -m mabook.book test`` after the build (it installs Debian's chromium if needed);
on its own, ``pytest tests/test_browser.py`` after ``make book``. Skipped when there is no built
book or no Chromium, unless ``MABOOK_REQUIRE_BROWSER=1`` (set by ``mabook.book test``).

For every page it asserts:

- no JavaScript error (console errors and uncaught exceptions);
- no request leaves the local server: the book is self-contained (plotly.js and MathJax are
  served from ``_static``);
- every plotly figure is drawn: it has data and an SVG of non-zero size;
- every image loads (``naturalWidth > 0``);
- no ipywidget was left as an empty box (a widget view without a kernel);
- on chapter (notebook) pages, the Colab button opens this chapter's notebook on the main branch.

And once: an exercise's solution is folded away behind a "Show solution" toggle that opens it.

A full-page screenshot of each page is saved to ``_build/screenshots/`` (CI artifacts).
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from mabook import book, notebook

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("MABOOK_HTML", ROOT / book.HTML_DIR))
SCREENSHOTS = ROOT / book.SCREENSHOTS
REQUIRED = os.environ.get("MABOOK_REQUIRE_BROWSER") == "1"
# Pages Sphinx generates that are not the book's content.
SKIP_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
]


def _pages() -> list[str]:
    if not (HTML / "index.html").is_file():
        return []
    pages = []
    for path in sorted(HTML.rglob("*.html")):
        rel = path.relative_to(HTML).as_posix()
        if rel in SKIP_PAGES or rel.split("/")[0] in {"_static", "_sources", "_modules", "_images"}:
            continue
        pages.append(rel)
    return pages


PAGES = _pages()


def _missing(reason: str):
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = book.chromium_path()
    if executable is None:
        _missing("no Chromium (install Debian's chromium, or set CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e .[test])")
    with sync_playwright() as p:
        # A fresh profile per run; playwright never downloads a browser here.
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def test_the_book_was_built():
    if not PAGES:
        _missing(f"no built book at {HTML} (python -m mabook.book build)")
    assert "index.html" in PAGES


@pytest.mark.parametrize("page_path", PAGES or ["(no book built)"])
def test_page_renders(page_path, server, browser):
    if not PAGES:
        _missing(f"no built book at {HTML}")
    page = browser.new_page()
    errors, external = [], []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))

    def route(r):
        if urlparse(r.request.url).hostname == "127.0.0.1":
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    try:
        page.goto(f"{server}/{page_path}", wait_until="load")
        _draw_figures(page)
        _typeset_math(page)
        _save_screenshot(page, page_path)
        assert not external, f"requests left the local server: {external}"
        assert not errors, "JavaScript errors:\n" + "\n".join(errors)
        _check_figures(page)
        _check_images(page)
        _check_no_empty_widgets(page)
        if page_path.startswith("notebooks/"):
            _check_colab_button(page, page_path)
    finally:
        page.close()


def test_an_exercise_solution_toggle_opens(server, browser):
    chapters = [p for p in PAGES if p.startswith("notebooks/") and "Show solution" in (HTML / p).read_text()]
    if not chapters:
        _missing(f"no chapter page with an exercise solution in {HTML}")
    page = browser.new_page()
    try:
        page.goto(f"{server}/{chapters[0]}", wait_until="load")
        details = page.locator("details.hide", has=page.locator("summary", has_text="Show solution")).first
        summary, source = details.locator("summary"), details.locator(".cell_input").first
        summary.scroll_into_view_if_needed()
        assert summary.is_visible(), f"{chapters[0]}: the solution toggle is not visible"
        assert not source.is_visible(), f"{chapters[0]}: the solution is shown before the toggle is opened"
        summary.click()
        source.wait_for(state="visible", timeout=5_000)
        assert details.evaluate("d => d.open") is True
        assert "exercises.check_" in source.inner_text(), "the opened cell is not an exercise solution"
        assert details.locator("summary", has_text="Hide solution").is_visible()
    finally:
        page.close()


def _draw_figures(page) -> None:
    # Plotly draws synchronously on load; wait for every figure that should exist.
    page.wait_for_function(
        "document.querySelectorAll('.plotly-graph-div').length"
        " === document.querySelectorAll('.plotly-graph-div.js-plotly-plot').length",
        timeout=30_000,
    )


def _typeset_math(page) -> None:
    # MathJax 3 typesets after load; its startup promise settles when the page's math is done.
    page.evaluate(
        "() => (window.MathJax && MathJax.startup && MathJax.startup.promise)"
        " ? MathJax.startup.promise.then(() => true) : true"
    )


def _check_figures(page) -> None:
    figures = page.evaluate(
        """() => Array.from(document.querySelectorAll('.plotly-graph-div')).map(gd => {
            const svg = gd.querySelector('svg.main-svg');
            const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
            return {id: gd.id, traces: (gd.data || []).length, width: box.width, height: box.height};
        })"""
    )
    empty = [f for f in figures if f["traces"] == 0 or f["width"] == 0 or f["height"] == 0]
    assert not empty, f"plotly figures not drawn: {empty}"


def _check_images(page) -> None:
    page.evaluate("() => document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=15_000)
    broken = page.evaluate(
        "() => Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.currentSrc || i.src)"
    )
    assert not broken, f"images that did not load: {broken}"


def _check_no_empty_widgets(page) -> None:
    views = page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    assert views == 0, f"{views} ipywidget view(s) without a kernel: use mabook.notebook.setup() in the first cell"


def _check_colab_button(page, page_path: str) -> None:
    notebook_path = page_path[: -len(".html")] + ".ipynb"
    org_repo = urlparse(notebook.REPOSITORY).path.strip("/")
    expected = f"https://colab.research.google.com/github/{org_repo}/blob/{notebook.REF}/{notebook_path}"
    links = page.eval_on_selector_all(
        "a[href*='colab.research.google.com']", "els => els.map(e => e.getAttribute('href'))"
    )
    assert links, f"{page_path}: no Colab launch button"
    assert set(links) == {expected}, f"{page_path}: Colab button links to {links}, expected {expected}"


SCREENSHOT_MAX_PX = 16_384  # Chromium's largest texture side


def _save_screenshot(page, page_path: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    name = page_path[: -len(".html")].replace("/", "__") + ".png"
    # A full-page capture of a very tall page (the API reference is ~130,000 px) outruns the 30 s
    # screenshot timeout on a slow machine; the artifact shows the top SCREENSHOT_MAX_PX of a page.
    height = page.evaluate("document.documentElement.scrollHeight")
    if height <= SCREENSHOT_MAX_PX:
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
    else:
        width = page.evaluate("document.documentElement.scrollWidth")
        clip = {"x": 0, "y": 0, "width": width, "height": SCREENSHOT_MAX_PX}
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True, clip=clip)
