"""mabook.scorecard: one row per claim, computed from the committed results JSONs.

The committed files are read twice: once by the module (`scorecard.load`) and once here with plain
`json`, so that a number in the table is checked against the file, not against itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

from mabook import checks, scorecard

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "mabook" / "results"
PAGE = ROOT / "book" / "scorecard.ipynb"

# Every claim the scorecard must cover: id -> the results file its row reads.
REQUIRED = {
    "ma-critical-random": "disruption_full.json",  # massive activations are critical: top-k zeroed vs random-k
    "ma-critical-bottom": "disruption_full.json",  # ... vs the paper's bottom-k
    "ma-spatial": "spatial_full.json",  # spatially organised: K-means IoU, top vs random
    "ma-transport-text": "text_transport_full.json",  # transferable, text-conditioned
    "ma-transport-image": "image_transport_full.json",  # transferable, image-conditioned
    "sinks-text-alignment": "attention_full.json",  # k = 1 keeps text alignment (CLIP-T; proxy)
    "sinks-perceptual-shift": "attention_full.json",  # ~6x perceptual shift vs random (LPIPS; proxy)
    "sinks-hps": "attention_full.json",  # HPS drops only at k >= 10 (proxy)
    "sinks-where": "attention_full.json",  # where sinks sit (mass by kind)
    "sun-zero-vs-mean": "disruption_full.json",  # Sun et al.: zeroing vs mean-replacement
    "dg-timestep-split": "disruption_full.json",  # Detail Guidance: timestep-driven (prompt vs step split)
    "dg-timestep-swap": "origins.json",  # ... (the timestep swap)
    "dg-detail-not-semantics": "disruption_full.json",  # Detail Guidance: detail, not semantics
}


def raw(name: str) -> dict:
    """A committed results file, read here independently of the module."""
    return json.loads((RESULTS / name).read_text())


@pytest.fixture(scope="module")
def committed() -> dict[str, dict]:
    return scorecard.load()


def by_id(table: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in table}


def table_line(md: str, claim_id: str) -> str:
    (line,) = [line for line in md.splitlines() if f"(`{claim_id}`)" in line]
    return line


def fmt(x: float) -> str:
    return f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# Coverage and vocabulary
# ---------------------------------------------------------------------------------------------


def test_every_required_claim_has_a_row_reading_the_right_file(committed):
    rows = by_id(scorecard.rows(committed))
    assert sorted(set(REQUIRED) - set(rows)) == []
    for claim_id, file in REQUIRED.items():
        assert rows[claim_id]["file"] == file


def test_every_claim_has_a_check_and_a_unique_id():
    ids = [c.id for c in scorecard.CLAIMS]
    assert len(ids) == len(set(ids))
    assert sorted(set(ids) - set(scorecard.CHECKS)) == [], "claims without a check"
    assert sorted(set(scorecard.CHECKS) - set(ids)) == [], "checks without a claim"


def test_every_verdict_is_an_allowed_word(committed):
    for r in scorecard.rows(committed):
        assert r["verdict"] in scorecard.VERDICTS, r
        assert r["proxy_verdict"] is None or r["proxy_verdict"] in scorecard.PROXY_VERDICTS, r


def test_committed_results_are_current_and_give_every_row_a_verdict(committed):
    for r in scorecard.rows(committed):
        assert r["verdict"] not in (scorecard.NO_RESULT, scorecard.NO_TEST), r
        assert r["result"] and r["reading"], r


def test_not_testable_rows_report_a_named_proxy_with_its_own_verdict(committed):
    for r in scorecard.rows(committed):
        if r["verdict"] == scorecard.NOT_TESTABLE:
            assert r["proxy"] and r["result"].startswith("proxy:"), r
            assert r["proxy_verdict"] in scorecard.PROXY_VERDICTS, r
        else:
            assert r["proxy_verdict"] is None, r
    rows = by_id(scorecard.rows(committed))
    for claim_id in ("sinks-text-alignment", "sinks-perceptual-shift", "sinks-hps"):  # CLIP-T, LPIPS, HPS: no weights here
        assert rows[claim_id]["verdict"] == scorecard.NOT_TESTABLE
    assert "not LPIPS" in rows["sinks-perceptual-shift"]["test"]


# ---------------------------------------------------------------------------------------------
# Verdicts follow the numbers
# ---------------------------------------------------------------------------------------------


def test_verdict_rules_at_their_lines():
    assert checks.ratio_verdict([1.2, 3.0]) == scorecard.HOLDS
    assert checks.ratio_verdict([0.2, 0.9]) == scorecard.FAILS
    assert checks.ratio_verdict([0.9, 1.2]) == scorecard.UNCLEAR
    assert checks.ratio_verdict([float("nan"), float("nan")]) == scorecard.UNCLEAR
    assert checks.difference_verdict([0.01, 0.2]) == scorecard.HOLDS
    assert checks.difference_verdict([-0.2, -0.01]) == scorecard.FAILS
    assert checks.difference_verdict([-0.01, 0.2]) == scorecard.UNCLEAR
    assert checks.keep_verdict(0.0, scorecard.KEEP_MARGIN) == scorecard.HOLDS
    assert checks.keep_verdict(scorecard.KEEP_MARGIN + 0.01, 0.3) == scorecard.FAILS
    assert checks.keep_verdict(0.0, 0.3) == scorecard.UNCLEAR  # a wide CI through 0 is not "unchanged"


def test_changing_one_ci_changes_that_rows_verdict_and_number(committed):
    results = copy.deepcopy(committed)
    (ratio,) = [r for r in results["disruption_full.json"]["paired_ratios"]
                if r["control"] == "random" and r["k"] == scorecard.K_DISRUPTION and r["metric"] == "pixel_mse"]
    before = by_id(scorecard.rows(committed))
    assert before["ma-critical-random"]["verdict"] == scorecard.HOLDS
    ratio["ratio"], ratio["ci"] = 1.07, [0.81, 1.33]  # the CI's lower bound below 1
    after = by_id(scorecard.rows(results))
    assert after["ma-critical-random"]["verdict"] == scorecard.UNCLEAR
    assert after["ma-critical-random"]["value"] == 1.07 and after["ma-critical-random"]["ci"] == (0.81, 1.33)
    assert "1.07x [0.81, 1.33]" in table_line(scorecard.markdown(list(after.values())), "ma-critical-random")
    ratio["ratio"], ratio["ci"] = 0.5, [0.4, 0.6]  # the effect the other way
    assert by_id(scorecard.rows(results))["ma-critical-random"]["verdict"] == scorecard.FAILS
    unchanged = {k: v for k, v in after.items() if k != "ma-critical-random"}
    assert unchanged == {k: v for k, v in before.items() if k != "ma-critical-random"}


def test_a_difference_row_follows_its_ci(committed):
    results = copy.deepcopy(committed)
    data = results["image_transport_full.json"]
    (d,) = [d for d in data["differences"]
            if d["trajectory"] == "invert" and d["alpha"] == scorecard.ALPHA and d["other"] == f"random-{data['k']}"]
    d["difference"], d["ci"] = 0.2, [0.1, 0.3]
    row = by_id(scorecard.rows(results))["ma-transport-image"]
    assert row["verdict"] == scorecard.HOLDS and row["value"] == 0.2


def test_the_timestep_swap_row_fails_when_the_channel_follows_the_input(committed):
    results = copy.deepcopy(committed)
    for r in results["origins.json"]["organisms"]["control"]["timestep_swap"]:
        r["embedding"], r["input"] = 0.1, 0.85
    assert by_id(scorecard.rows(results))["dg-timestep-swap"]["verdict"] == scorecard.FAILS


def test_the_perceptual_row_prefers_a_paired_ratio_on_a_linear_metric_when_stored(committed):
    results = copy.deepcopy(committed)
    data = results["attention_full.json"]
    window = f"{data['layer']}, all steps"
    data["paired_ratios_linear"] = {"pixel_mae": [{"k": scorecard.K_SINK, "control": control, "metric": "pixel_mae", "ratio": 7.5,
                                                   "ci": [5.25, 9.75], "op": "score eta=0", "window": window, "n_units": 64}
                                                  for control in ("random", "random-mass")]}  # whichever the row reads
    row = by_id(scorecard.rows(results))["sinks-perceptual-shift"]
    assert row["value"] == 7.5 and row["ci"] == (5.25, 9.75)
    assert re.search(r"mean \|difference\| sink / (mass-matched )?random 7\.5x \[5\.25, 9\.75\]", row["result"])
    assert row["verdict"] == scorecard.NOT_TESTABLE and row["proxy_verdict"] == scorecard.HOLDS


# ---------------------------------------------------------------------------------------------
# Missing, stale and incomplete files
# ---------------------------------------------------------------------------------------------


def test_a_row_whose_file_is_missing_says_so(committed):
    results = {k: v for k, v in committed.items() if k != "attention_full.json"}
    rows = scorecard.rows(results)
    for r in rows:
        if r["file"] == "attention_full.json":
            assert r["verdict"] == scorecard.NO_RESULT and "attention_full.json is missing" in r["reading"]
            assert r["result"] == "" and r["proxy_verdict"] is None
        else:
            assert r["verdict"] != scorecard.NO_RESULT
    assert "attention_full.json is missing" in scorecard.markdown(rows)


def test_a_file_made_on_another_checkpoint_gives_no_current_result(committed):
    results = copy.deepcopy(committed)
    results["origins.json"]["checkpoint_sha256"] = "0" * 64
    for r in scorecard.rows(results):
        if r["file"] == "origins.json":
            assert r["verdict"] == scorecard.NO_RESULT
            assert "000000000000" in r["reading"] and results["origins.json"]["command"] in r["reading"]


def test_a_file_without_a_field_the_row_reads_gives_no_current_result(committed):
    results = copy.deepcopy(committed)
    del results["disruption_full.json"]["decomposition_top"]
    row = by_id(scorecard.rows(results))["dg-timestep-split"]
    assert row["verdict"] == scorecard.NO_RESULT and "decomposition_top" in row["reading"]


def test_a_claim_without_a_check_says_no_test_yet(committed, monkeypatch):
    monkeypatch.delitem(scorecard.CHECKS, "dg-detail-not-semantics")
    row = by_id(scorecard.rows(committed))["dg-detail-not-semantics"]
    assert row["verdict"] == scorecard.NO_TEST and row["result"] == ""


def test_load_reads_every_json_and_an_empty_directory_gives_nothing(tmp_path):
    assert sorted(scorecard.load()) == sorted(p.name for p in RESULTS.glob("*.json"))
    assert scorecard.load(tmp_path) == {}
    (tmp_path / "disruption_full.json").write_text((RESULTS / "disruption_full.json").read_text())
    rows = by_id(scorecard.rows(scorecard.load(tmp_path)))
    assert rows["ma-critical-random"]["verdict"] == scorecard.HOLDS
    assert rows["ma-spatial"]["verdict"] == scorecard.NO_RESULT


# ---------------------------------------------------------------------------------------------
# The numbers in the table are the files'
# ---------------------------------------------------------------------------------------------


def test_numbers_in_the_markdown_equal_the_jsons(committed):
    md = scorecard.markdown(scorecard.rows(committed))
    k = scorecard.K_DISRUPTION

    disruption = raw("disruption_full.json")
    for claim_id, control in (("ma-critical-random", "random"), ("ma-critical-bottom", "bottom_abs_mean")):
        (r,) = [r for r in disruption["paired_ratios"] if r["control"] == control and r["k"] == k and r["metric"] == "pixel_mse"]
        assert f"{fmt(r['ratio'])}x [{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]" in table_line(md, claim_id)
    zero, mean = ([r for r in disruption["summary"] if r["kind"] == "top" and r["k"] == k and r["op"] == op][0] for op in ("zero", "mean"))
    line = table_line(md, "sun-zero-vs-mean")
    for r in (zero, mean):
        assert f"{fmt(r['pixel_mse'])} [{fmt(r['pixel_mse_ci'][0])}, {fmt(r['pixel_mse_ci'][1])}]" in line

    spatial = raw("spatial_full.json")
    (d,) = [d for d in spatial["differences"] if d["where"] == "all layers x steps" and d["control"] == f"random-{spatial['k_channels']}"]
    assert f"{fmt(d['difference'])} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]" in table_line(md, "ma-spatial")

    text = raw("text_transport_full.json")
    (d,) = [d for d in text["differences"]
            if d["alpha"] == 1.0 and d["other"] == f"random-{text['k_main']}" and d["metric"] == "took_source"]
    assert f"{fmt(d['difference'])} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]" in table_line(md, "ma-transport-text")

    image = raw("image_transport_full.json")
    (d,) = [d for d in image["differences"] if d["trajectory"] == "invert" and d["alpha"] == 1.0 and d["other"] == f"random-{image['k']}"]
    assert f"{fmt(d['difference'])} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]" in table_line(md, "ma-transport-image")

    attention = raw("attention_full.json")
    window = f"{attention['layer']}, all steps"
    control = "random-mass" if any(r["control"] == "random-mass" for r in attention["paired_ratios"]) else "random"
    at = lambda rows: [r for r in rows if r["control"] == control and r["k"] == 1 and r["window"] == window and r["op"] == "score eta=0"]
    for r in at(attention["paired_ratios"]) + at(attention.get("paired_ratios_linear", {}).get("pixel_mae", [])):
        assert f"{fmt(r['ratio'])}x [{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]" in table_line(md, "sinks-perceptual-shift")

    origins = raw("origins.json")["organisms"]
    shares = [layer["norm_share"] for layer in origins["no-timestep"]["layers"]]
    assert f"{fmt(max(shares))} vs the 'present' line" in table_line(md, "dg-no-timestep")
    embedding = [r["embedding"] for r in origins["control"]["timestep_swap"]]
    assert f"embedding share {fmt(min(embedding))}-{fmt(max(embedding))}" in table_line(md, "dg-timestep-swap")


def test_every_row_links_its_chapter_section(committed):
    md = scorecard.markdown(scorecard.rows(committed))
    for claim in scorecard.CLAIMS:
        assert f"]({claim.section})" in table_line(md, claim.id)
        assert claim.section.startswith("../notebooks/") and (ROOT / "book" / claim.section.split("#")[0]).is_file()


# ---------------------------------------------------------------------------------------------
# Links, thresholds, provenance
# ---------------------------------------------------------------------------------------------


def _headings(notebook: Path) -> dict[str, int]:
    """{heading text: level} of a notebook's markdown cells."""
    out = {}
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    hashes = len(line) - len(line.lstrip("#"))
                    out[line[hashes:].strip()] = hashes
    return out


@pytest.mark.parametrize("claim", scorecard.CLAIMS, ids=lambda c: c.id)
def test_section_anchor_is_a_heading_of_the_chapter_and_myst_resolves_it(claim):
    from myst_parser.mdit_to_docutils.base import default_slugify

    headings = _headings(ROOT / "notebooks" / claim.chapter)
    assert claim.heading in headings, f"{claim.chapter} has no heading {claim.heading!r}"
    assert scorecard.anchor(claim.heading) == default_slugify(claim.heading)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["sphinx"]["config"]["myst_heading_anchors"] >= headings[claim.heading]


def test_thresholds_are_stated_with_a_reason():
    stated = scorecard.thresholds()
    assert list(stated) == list(scorecard.THRESHOLDS)
    for name, (value, why) in stated.items():
        assert value == getattr(scorecard, name) and len(why) > 20, name
        assert f"`{name} = {value:g}`: {why}." in scorecard.thresholds_markdown()


def test_the_committed_card_is_the_organisms_and_matches_the_weights():
    from mabook import organism  # imports torch: the check that scorecard.CARD is the card organism.load reads

    assert scorecard.CARD == organism.card_path(organism.CHECKPOINT)
    weights = hashlib.sha256(organism.CHECKPOINT.read_bytes()).hexdigest()
    assert scorecard.committed_checkpoint() == weights == json.loads(scorecard.CARD.read_text())["sha256"]


def test_provenance_lists_every_file_with_its_hash_version_and_command(committed):
    listed = {p["file"]: p for p in scorecard.provenance(committed)}
    assert sorted(listed) == sorted(p.name for p in RESULTS.glob("*.json"))
    md = scorecard.provenance_markdown(committed)
    for name, p in listed.items():
        data = raw(name)
        assert p["checkpoint_sha256"] == data["checkpoint_sha256"] and p["command"] == data["command"]
        assert p["current"] == (data["checkpoint_sha256"] == scorecard.committed_checkpoint())
        assert f"`{name}`" in md and data["checkpoint_sha256"][:12] in md


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def test_page_is_in_the_toc_linked_from_the_intro_and_committed_without_outputs():
    from mabook import book, notebook

    assert "book/scorecard.ipynb" in book.toc_files(ROOT)
    assert "](scorecard.ipynb)" in (ROOT / "book" / "intro.md").read_text()
    nb = nbformat.read(PAGE, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"cells {dirty} have outputs or execution counts"
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for call in ("scorecard.load()", "scorecard.thresholds_markdown()", "scorecard.markdown(scorecard.rows(",
                 "scorecard.provenance_markdown("):
        assert call in source
    assert f'%pip install -q "{notebook.PIP_SPEC}"' in source
    # executed even in a build with execution off (`mabook.book test` re-stages book/ without outputs), and its
    # Markdown outputs (tables, cross-page links) rendered as MyST
    assert nb.metadata["mystnb"] == {"execution_mode": "force", "render_markdown_format": "myst"}


@pytest.mark.parametrize("chapter", sorted(set(c.chapter for c in scorecard.CLAIMS)))
def test_a_chapters_findings_are_its_scorecard_rows(committed, chapter):
    """Each chapter opens with `findings(chapter)`: every claim it tests, with the verdict and number the
    scorecard row has; a changed CI changes the chapter's text as it changes the page."""
    text = scorecard.findings(chapter, committed)
    brief = scorecard.findings(chapter, committed, brief=True)
    mine = [c for c in scorecard.CLAIMS if c.chapter == chapter]
    assert mine and len(brief.splitlines()) == len(mine)
    for r in scorecard.rows(committed):
        claim = next(c for c in scorecard.CLAIMS if c.id == r["id"])
        inside = r["claim"] in text
        assert inside == (claim.chapter == chapter)
        if inside:
            assert f"**{r['verdict']}**" in text and r["result"] in text and r["result"] in brief
    for name in {c.file for c in mine}:
        assert f"`{name}`" in text and committed[name]["command"] in text


def test_findings_follow_the_json(committed):
    changed = copy.deepcopy(committed)
    row = next(r for r in changed["disruption_full.json"]["paired_ratios"]
               if r["metric"] == "pixel_mse" and r["control"] == "random" and r["k"] == scorecard.K_DISRUPTION)
    row["ci"] = [0.5, 0.9]
    assert "fails" not in scorecard.findings("02_disruption.ipynb", committed, brief=True).splitlines()[0]
    assert "**fails**" in scorecard.findings("02_disruption.ipynb", changed, brief=True).splitlines()[0]
    with pytest.raises(ValueError, match="01_channel_discovery.ipynb"):
        scorecard.findings("01_channel_discovery.ipynb", committed)


def test_findings_link_to_the_scorecard_resolves_in_jupyter_and_on_the_static_site(monkeypatch):
    """A Markdown output's link is not rewritten by the book build: in Jupyter it must name the
    notebook next to the chapters, on the static site the page the build writes for it."""
    import re

    def target() -> str:
        text = scorecard.findings("03_spatial_organization.ipynb")
        return re.search(r"\[the scorecard\]\(([^)]+)\)", text).group(1)

    monkeypatch.delenv("MABOOK_STATIC", raising=False)
    assert (ROOT / "notebooks" / target()).resolve() == PAGE.resolve()
    monkeypatch.setenv("MABOOK_STATIC", "1")
    assert target() == "../book/" + PAGE.with_suffix(".html").name
