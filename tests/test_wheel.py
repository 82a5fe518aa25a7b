"""The Colab path, proven offline: what ``%pip install "mabook @ git+…"`` gives a reader.

1. The wheel is built from a copy of the package sources (the files git would clone: tracked and
   untracked-but-not-ignored), so building leaves the checkout untouched.
2. It carries the committed checkpoints (``mabook/organism/checkpoints/*``) and the big-run
   summaries (``mabook/results/*.json``): a Colab kernel has no checkout to read them from.
3. It installs (``--no-index``, dependencies resolved) into a fresh virtual environment that cannot
   see the repository: the environment reuses the test environment's *dependencies* (torch,
   diffusers, ... through a ``.pth`` file pointing at a view of its site-packages without mabook),
   never its editable mabook, and runs from a temporary directory. Downloading torch again would
   test the network, not mabook.
4. A kernel of that environment runs chapter 0's first cells (the set-up cell, the parameters, the
   shapes world, the checkpoint loaded and described) and one generation, judged, with
   ``MABOOK_COLAB=1``: `mabook.notebook.setup` behaves as on Colab without Google's module.
5. On Python 3.12 (Colab's is newer than 3.11), when the machine has an interpreter: the wheel
   installs with ``--no-deps`` (torch for 3.12 is not available offline), ``import mabook`` works,
   the package data is found, and every module byte-compiles. Skipped with a reason otherwise.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = ROOT / "notebooks" / "00_model_organism.ipynb"
# Chapter 0's cells that run from the installed wheel: they start with these lines.
CHAPTER_CELLS = (
    "try:\n    from mabook.notebook import setup",  # the Colab install / set-up cell
    "import json",  # imports and parameters
    "print(\"sizes:\"",  # the shapes world
    "pipe = organism.load(",  # the checkpoint, hash-checked, and the architecture table
)
KERNEL = "mabook-wheel-test"


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _source_files() -> list[str]:
    """The package's files as a clone would have them (tracked + untracked not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", "pyproject.toml", "README.md", "mabook"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
        files = [f for f in out if f and (ROOT / f).is_file()]
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    files = ["pyproject.toml", "README.md"]
    files += [p.relative_to(ROOT).as_posix() for p in (ROOT / "mabook").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")]
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for f in _source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, src])
    (built,) = dist.glob("mabook-*.whl")
    return built


NOT_PACKAGE_DATA = ("/partial/", "/history/")


def test_wheel_holds_the_checkpoints_and_results(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # A training run's resumable state (``checkpoints/variants/partial/<variant>/``), committed so that a long run
    # can continue on another machine, and an earlier organism kept to re-derive a results file
    # (``checkpoints/history/``) are not package data: they stay out of the wheel.
    committed = [f for f in _source_files() if f.startswith(("mabook/organism/checkpoints/", "mabook/results/"))
                 and not any(d in f for d in NOT_PACKAGE_DATA)]
    assert any(f.endswith("checkpoints/organism.safetensors") for f in committed)
    assert any(f.startswith("mabook/results/") and f.endswith(".json") for f in committed)
    missing = [f for f in committed if f.endswith((".safetensors", ".json")) and f not in names]
    assert not missing, f"not in the wheel: {missing}"
    modules = [f for f in _source_files() if f.startswith("mabook/") and f.endswith(".py")]
    assert not [m for m in modules if m not in names], "Python modules missing from the wheel"
    assert not [n for n in names if any(d in n for d in NOT_PACKAGE_DATA)], "training states and earlier organisms are not package data"


def _dependencies_view(dest: Path) -> Path:
    """dest/: a link to every entry of this environment's site-packages except mabook's own."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("mabook", "__editable__", "_mabook")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def _fresh_venv(python, where: Path) -> tuple[Path, Path]:
    """(python, site-packages) of a new environment without pip (this pip installs into it)."""
    _run([python, "-m", "venv", "--without-pip", where])
    venv_python = where / "bin" / "python"
    site = Path(_run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    return venv_python, site


@pytest.fixture(scope="module")
def colab_env(tmp_path_factory, wheel):
    tmp = tmp_path_factory.mktemp("colab")
    venv_python, site = _fresh_venv(sys.executable, tmp / "venv")
    (site / "_mabook_test_dependencies.pth").write_text(str(_dependencies_view(tmp / "deps")) + "\n")
    # Dependencies are resolved (--no-index: from what the .pth shows), so a requirement the tested
    # environment does not satisfy fails here.
    _run([sys.executable, "-m", "pip", "--python", venv_python, "install", "--no-index", "-q", wheel], cwd=tmp)
    kernels = tmp / "venv" / "share" / "jupyter" / "kernels" / KERNEL
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(venv_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mabook from its wheel", "language": "python"}))
    return tmp, venv_python


def _chapter_cells() -> list[str]:
    nb = nbformat.read(CHAPTER, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    cells = []
    for start in CHAPTER_CELLS:
        found = [s for s in code if s.startswith(start)]
        assert len(found) == 1, f"chapter 0 has {len(found)} cells starting with {start!r}"
        cells.append(found[0])
    return cells


PROBE_CELLS = [
    # one image from the checkpoint inside the wheel, judged
    textwrap.dedent("""\
        caption = world.heldout_captions(1, 1, seed=SEED)[0]
        image = organism_evaluate.generate(pipe, [caption], 8, GUIDANCE_SCALE, seed=SEED)[0]
        verdict = judge.judge(image, caption)
        print("GENERATED", image.shape, caption, verdict.correct)"""),
    # where everything came from
    textwrap.dedent("""\
        import sys, json as _json
        from mabook.notebook import on_colab
        print("REPORT " + _json.dumps({"mabook": mabook.__file__, "checkpoint": str(organism.CHECKPOINT),
                                       "on_colab": env.on_colab and on_colab(), "sys_path": sys.path,
                                       "cwd": os.getcwd()}))"""),
]

DRIVER = """
import json, sys, nbformat
from nbclient import NotebookClient
sources, out, kernel = sys.argv[1:4]
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in json.load(open(sources))])
try:
    NotebookClient(nb, timeout=600, kernel_name=kernel).execute()
finally:
    nbformat.write(nb, out)
"""


def test_a_chapter_runs_from_the_installed_wheel_as_on_colab(colab_env):
    tmp, venv_python = colab_env
    run_dir = tmp / "run"  # the kernel's working directory: no repository anywhere near it
    run_dir.mkdir()
    (tmp / "cells.json").write_text(json.dumps(_chapter_cells() + PROBE_CELLS))
    (tmp / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "MABOOK_STATIC", "FULL", "MODEL", "VIRTUAL_ENV", "JUPYTER_PATH")}
    env.update(MABOOK_COLAB="1", JUPYTER_PATH=str(tmp / "venv" / "share" / "jupyter"), JUPYTER_DATA_DIR=str(tmp / "jdata"),
               JUPYTER_CONFIG_DIR=str(tmp / "jconfig"), IPYTHONDIR=str(tmp / "ipython"), PYDEVD_DISABLE_FILE_VALIDATION="1")
    result = subprocess.run([str(venv_python), str(tmp / "driver.py"), str(tmp / "cells.json"), str(tmp / "out.ipynb"), KERNEL],
                            cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    text = ""
    if (tmp / "out.ipynb").is_file():
        for cell in nbformat.read(tmp / "out.ipynb", as_version=4).cells:
            for o in cell.get("outputs", []):
                text += o.get("text", "") + "".join(o.get("traceback", [])) + str(o.get("data", {}).get("text/plain", "")) + "\n"
    assert result.returncode == 0, f"the chapter's cells failed:\n{text[-4000:]}\n{result.stderr[-3000:]}"

    assert "| Colab |" in text, f"setup() did not report Colab:\n{text[:2000]}"
    assert "GENERATED (32, 32, 3)" in text
    report = json.loads(next(line for line in text.splitlines() if line.startswith("REPORT "))[len("REPORT "):])
    venv = (tmp / "venv").resolve()
    assert Path(report["mabook"]).resolve().is_relative_to(venv), f"mabook came from {report['mabook']}, not the fresh venv"
    assert Path(report["checkpoint"]).resolve().is_relative_to(venv), "the checkpoint was not read from the wheel"
    assert report["on_colab"] is True
    assert Path(report["cwd"]).resolve() == run_dir.resolve()
    seen = [p for p in report["sys_path"] if p and Path(p).resolve() in (ROOT, ROOT / "mabook")]
    assert not seen, f"the repository is on the kernel's sys.path: {seen}"


def _python312() -> str | None:
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    candidates += [c for c in (shutil.which("python3.12"),) if c]
    for c in candidates:
        try:
            out = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return c
    return None


def test_the_wheel_installs_and_imports_on_python_3_12(wheel, tmp_path):
    python = _python312()
    if python is None:
        pytest.skip("no Python 3.12 interpreter on this machine (looked in ~/.pyenv/versions and on PATH)")
    venv_python, site = _fresh_venv(python, tmp_path / "venv312")
    # --no-deps: torch & co. for 3.12 are not available offline; what is tested is that the wheel
    # installs on 3.12 and that the package imports, finds its data and compiles there.
    _run([sys.executable, "-m", "pip", "--python", venv_python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp_path)
    check = textwrap.dedent("""\
        import sys, importlib.metadata as md
        from importlib.resources import files
        import mabook
        assert sys.version_info[:2] == (3, 12), sys.version
        assert md.version("mabook") and "torch>=2.4" in " ".join(md.requires("mabook"))
        assert (files("mabook") / "organism" / "checkpoints" / "organism.safetensors").is_file()
        assert any(p.name.endswith(".json") for p in (files("mabook") / "results").iterdir())
        print("OK", mabook.__file__)""")
    out = _run([venv_python, "-c", check], cwd=tmp_path).stdout
    assert out.startswith("OK ") and Path(out.split()[1]).resolve().is_relative_to((tmp_path / "venv312").resolve())
    _run([venv_python, "-m", "compileall", "-q", site / "mabook"], cwd=tmp_path)
