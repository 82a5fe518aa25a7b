"""The two dependency lists (pyproject.toml for pip, environment.yml for conda) must agree."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += extra
    return {r.replace(" ", "") for r in reqs}


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_items = [m.group(1) for line in lines if (m := re.match(r"^\s{6}- (\S.*)$", line))]
    return {r.replace(" ", "") for r in pip_items if not r.startswith("-e")}


def test_environment_yml_lists_the_same_requirements_as_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_jupyter_book_is_pinned_to_1x():
    assert "jupyter-book==1.0.4.post1" in _pyproject_requirements()
