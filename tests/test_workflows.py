"""Every GitHub workflow is safe by construction and valid (issue 14, part 5).

The GPU runner holds an ``HF_TOKEN`` secret, so each workflow must pass zizmor's offline audits
with no finding (actions pinned to full commit SHAs, no persisted checkout credentials,
least-privilege ``permissions:``, no template injection, ...) and validate against the GitHub
workflow schema that check-jsonschema ships (``vendor.github-workflows``, no network). Both tools
are in the ``test`` extra. The workflows are globbed: a new one is checked without editing this.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.fail(f"{name} is not installed in {BIN}; install the test extra: pip install -e '.[test]' -c constraints.txt")
    return str(path)


def test_there_are_workflows():
    assert WORKFLOWS, "no workflow under .github/workflows"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_zizmor_offline_reports_no_finding(workflow):
    out = subprocess.run([tool("zizmor"), "--offline", "--no-progress", str(workflow)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    report = out.stdout + out.stderr
    assert out.returncode == 0 and "No findings to report" in report, report


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_githubs_schema(workflow):
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit_with_its_tag_in_a_comment(workflow):
    """zizmor checks the pin; the `# vX` comment is for the humans who update it."""
    for line in workflow.read_text().splitlines():
        m = re.match(r"^\s*(?:-\s*)?uses:\s*(\S+)(.*)$", line)
        if m and not m.group(1).startswith("./"):
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", m.group(1)), line
            assert re.search(r"#\s*v\d", m.group(2)), f"no '# vX' tag comment: {line}"
