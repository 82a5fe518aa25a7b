"""The first cell of every chapter: one call that makes a notebook run the same everywhere.

A chapter runs in four places: a reader's Colab session, a local Jupyter, the CI that executes it
under nbmake, and the book build that turns it into a static page. `setup` hides the differences:

- on Colab it asks for the widget manager that ipywidgets 8 needs there (``MABOOK_COLAB=1`` makes
  a kernel behave as on Colab without Colab's ``google.colab`` module: the wheel test uses it);
- it picks the device ("cuda" when there is one, else "cpu") and a dtype that device handles well;
- it reads ``FULL`` from the environment (``FULL=1``: the big settings, e.g. on a GPU);
- it chooses how plotly figures are shown. Live kernels keep plotly's own choice. On a static page
  (the book build, marked by ``MABOOK_STATIC=1`` in the environment) a figure becomes a ``<div>``
  plus a script that draws it with the plotly.js the book ships in ``_static``, so the page needs
  no CDN; and an ipywidget, which would be an empty box without a kernel, becomes a visible note
  asking the reader to run the chapter live.

What this is not: an installer. On Colab mabook must be importable before ``setup`` can run, so
the chapter's first cell installs it itself, with the pip line `PIP_SPEC` (``tests/test_book.py``
checks that every chapter uses exactly this line)::

    try:
        from mabook.notebook import setup
    except ImportError:  # on Colab: install the pinned mabook, then import it
        %pip install -q "mabook @ git+https://github.com/mabook-dev/mabook@main"
        from mabook.notebook import setup
    env = setup()
"""

from __future__ import annotations

import html
import os
import random
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import plotly.io as pio
from plotly.io import to_html
from plotly.io._base_renderers import MimetypeRenderer

from mabook import files

try:  # widgets, replaced by a note on static pages (`_replace_widgets_by_note`); none installed: nothing to replace
    import ipywidgets
    from IPython import get_ipython
except ImportError:
    ipywidgets = get_ipython = None
try:  # a plotly FigureWidget is a widget too (it needs anywidget, an optional package)
    from plotly.basewidget import BaseFigureWidget
except ImportError:
    BaseFigureWidget = None

# The one place the repository is named; `_config.yml` and the chapters' install cell repeat it
# and `tests/test_book.py` checks that they agree.
REPOSITORY = "https://github.com/mabook-dev/mabook"
# Which version Colab installs: a branch or a tag. Readers of a tagged book get the tagged code.
REF = "main"
PIP_SPEC = f"mabook @ git+{REPOSITORY}@{REF}"

# Set by `mabook.book` (and by the book's Sphinx extension) for kernels whose output becomes a
# static HTML page.
STATIC_ENV_VAR = "MABOOK_STATIC"
STATIC_RENDERER = "mabook_static"
# MABOOK_COLAB=1: behave as on Colab (`on_colab()` is True) where google.colab is not importable:
# the Colab path is tested offline this way (tests/test_wheel.py).
COLAB_ENV_VAR = "MABOOK_COLAB"

WIDGET_NOTE = (
    "Interactive explorer: it needs a running kernel. Open this chapter live "
    "(the Colab button at the top of the page, or a local Jupyter) to use it."
)


@dataclass(frozen=True)
class Env:
    """Where a chapter runs. Returned by `setup`; chapters read it, never change it.

    Attributes:
        device: ``"cuda"`` or ``"cpu"`` (a torch device string).
        dtype: the torch dtype models should be loaded in: ``torch.bfloat16`` on a GPU that
            supports it, else ``torch.float32``.
        on_colab: True inside Google Colab (or when ``MABOOK_COLAB=1`` says to behave as there).
        full: True when ``FULL=1``: chapters switch to their big settings (more prompts, steps,
            seeds). Off by default so that the whole book builds on 2 CPU cores in minutes.
        static: True when the output becomes a static page (the book build): no kernel will be
            there to answer widgets.
    """

    device: str
    dtype: object  # torch.dtype; typed loosely so that importing this module does not need torch
    on_colab: bool
    full: bool
    static: bool = False

    def pipe_kwargs(self, default: dict) -> dict:
        """A real model's pipeline-call arguments: `default` (the chapter's, e.g. 512 px), or the JSON
        object in ``PIPE_KWARGS`` when the environment sets it -- e.g. ``PIPE_KWARGS='{"height":
        1024, "width": 1024}'`` for full resolution, or a tiny pipeline's size in the tests."""
        return pipe_kwargs_from_env(default)


PIPE_KWARGS_ENV_VAR = "PIPE_KWARGS"


def pipe_kwargs_from_env(default: dict) -> dict:
    """`Env.pipe_kwargs`: ``PIPE_KWARGS`` (a JSON object) if set, else a copy of `default`."""
    raw = os.environ.get(PIPE_KWARGS_ENV_VAR, "").strip()
    if not raw:
        return dict(default)
    import json  # deferred: read only when a chapter runs on a real model with an override

    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{PIPE_KWARGS_ENV_VAR} must be a JSON object of pipeline-call arguments, e.g. "
                         f"'{{\"height\": 1024, \"width\": 1024}}', got {raw!r}")
    return value


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def on_colab() -> bool:
    """True inside a Google Colab kernel, or when ``MABOOK_COLAB=1`` asks to behave as on one."""
    return "google.colab" in sys.modules or _flag(COLAB_ENV_VAR)


def is_static() -> bool:
    """True when this kernel's output becomes a static HTML page (``MABOOK_STATIC=1``)."""
    return _flag(STATIC_ENV_VAR)


def setup(
    *,
    device: str | None = None,
    dtype: object | None = None,
    full: bool | None = None,
    seed: int | None = 0,
    quiet: bool = False,
) -> Env:
    """Prepare the kernel for a chapter and say where it runs.

    Args:
        device: force a device (``"cpu"``, ``"cuda"``); default: ``"cuda"`` if available.
        dtype: force a torch dtype; default: bfloat16 on a CUDA device that supports it, else
            float32 (CPU bfloat16 matmuls are slow and the organism is trained in float32).
        full: force the big settings on or off; default: the ``FULL`` environment variable.
        seed: seed for torch, numpy and random, so that a rerun draws the same figures;
            ``None`` leaves the generators alone.
        quiet: do not print the one-line summary.

    Returns:
        An `Env` describing the kernel.
    """
    import torch  # deferred: importing this module must not need torch (mabook.book imports it; see Env.dtype)

    colab = on_colab()
    static = is_static()

    # 1. device and dtype
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dtype is None:
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    if full is None:
        full = _flag("FULL")

    # 2. seeds
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # 3. display: Colab's widget manager, plotly renderer, widgets on static pages
    if colab:
        try:
            from google.colab import output  # type: ignore[import-not-found]  # deferred: exists only on Colab
        except ImportError:  # MABOOK_COLAB=1 outside Colab: nothing to enable
            pass
        else:
            output.enable_custom_widget_manager()
    _configure_plotly(static=static, colab=colab)
    if static:
        _replace_widgets_by_note()

    env = Env(device=device, dtype=dtype, on_colab=colab, full=bool(full), static=static)
    if not quiet:
        where = "Colab" if colab else ("static page" if static else "local kernel")
        dtype_name = str(dtype).replace("torch.", "")
        print(
            f"mabook {_version()} | {where} | device={device} dtype={dtype_name} | "
            f"FULL={int(env.full)}"
        )
    return env


def _version() -> str:
    try:
        return version("mabook")
    except PackageNotFoundError:
        return "(not installed)"


def _configure_plotly(*, static: bool, colab: bool) -> None:
    """Static pages: `StaticPageRenderer`, registered once. Colab: plotly's "colab" renderer
    (plotly guesses Colab from an environment variable that not every runtime sets). Other live
    kernels: plotly's own choice (JupyterLab, Notebook 7, VS Code)."""
    if static:
        if STATIC_RENDERER not in pio.renderers:
            pio.renderers[STATIC_RENDERER] = StaticPageRenderer()
        pio.renderers.default = STATIC_RENDERER
    elif colab:
        pio.renderers.default = "colab"


class StaticPageRenderer(MimetypeRenderer):
    """A plotly renderer for static book pages: ``text/html`` only, a ``<div>`` and a script that
    calls the global ``Plotly`` (loaded by the page from ``_static/plotly.min.js``; see
    `mabook.book`). No plotly.js and no MathJax are inlined or fetched from a CDN.

    plotly's default renderer in a kernel emits ``application/vnd.plotly.v1+json``, which
    myst-nb does not render: the figure would silently vanish from the page.
    """

    def __init__(self, config: dict | None = None):
        self.config = dict(config or {})

    def to_mimebundle(self, fig_dict):
        height = (fig_dict.get("layout") or {}).get("height") or 450
        page = to_html(
            fig_dict,
            config={"responsive": True, **self.config},
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            default_height=height,
            validate=False,
        )
        return {"text/html": page}


def _replace_widgets_by_note() -> None:
    """On a static page an ipywidget is an empty box: show a visible note instead.

    Uses IPython's formatter registry (type-registered printers take precedence over a widget's
    own ``_repr_mimebundle_``), so ``display(widget)``, ``interact`` and a widget as the last
    expression of a cell all give the note.
    """
    if ipywidgets is None:  # no widgets, nothing to replace
        return
    shell = get_ipython()
    if shell is None:
        return
    formatter = shell.display_formatter.mimebundle_formatter
    formatter.for_type(ipywidgets.DOMWidget, _widget_note_bundle)
    # a plotly FigureWidget is a widget too, but it can be drawn without a kernel
    if BaseFigureWidget is None:  # FigureWidget needs anywidget
        return
    formatter.for_type(BaseFigureWidget, _figure_widget_bundle)


def _figure_widget_bundle(widget, include=None, exclude=None):
    return StaticPageRenderer().to_mimebundle(widget.to_dict())


def _widget_note_bundle(widget, include=None, exclude=None):
    note = html.escape(WIDGET_NOTE)
    return {
        "text/html": f'<div class="mabook-widget-note admonition note"><p>{note}</p></div>',
        "text/plain": WIDGET_NOTE,
    }


def write_summary(path, payload: dict, *, notebook: str, default=None):
    """A chapter's big-run summary (``mabook/results/*.json``), written atomically (`mabook.files`:
    temp file, fsync, rename -- a kernel killed mid-write leaves the previous summary) with the
    mabook version and the command that reproduces it (``FULL=1 jupyter execute notebooks/<notebook>``)
    beside the payload's own "checkpoint_sha256". Returns the path."""
    command = f"FULL=1 jupyter execute notebooks/{notebook}"
    return files.write_json(path, files.with_provenance(payload, command), default=default)
