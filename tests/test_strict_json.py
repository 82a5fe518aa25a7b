"""mabook's JSON is strict JSON: NaN and infinities are written as null (a one-unit CI used to be a
bare NaN, which no strict reader accepts), and every reader of a number takes null as NaN -- the
scorecard gives the committed results the same verdicts whether their NaNs are bare or null."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mabook import checks, disruption, files, scorecard


def strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as JavaScript's JSON.parse and jq do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_and_infinities_are_written_as_null_and_read_back_as_nan(tmp_path):
    nan, inf = float("nan"), float("inf")
    payload = {"ci": [nan, nan], "ratio": inf, "low": -inf, "n": None, "ok": 0.25, "flag": True,
               "numpy": {"scalar": np.float32(nan), "int": np.int64(3), "array": np.array([1.5, np.nan, np.inf]),
                         "bool": np.bool_(False)},
               "nested": [{"ci": (0.1, nan)}]}
    path = files.write_json(tmp_path / "summary.json", payload)
    back = strict(path.read_text())  # raised on the bare NaN written before
    assert back == {"ci": [None, None], "ratio": None, "low": None, "n": None, "ok": 0.25, "flag": True,
                    "numpy": {"scalar": None, "int": 3, "array": [1.5, None, None], "bool": False},
                    "nested": [{"ci": [0.1, None]}]}
    assert all(math.isnan(files.number(c)) for c in back["ci"]) and files.number(back["ok"]) == 0.25
    assert path.read_text() == json.dumps(back, indent=1) + "\n"  # still indent 1, trailing newline


def test_a_one_unit_summary_is_strict_json(tmp_path):
    table = [{"prompt": "a", "seed": 0, "condition": "baseline", "kind": "baseline", "k": 0, "op": "none", "window": "none",
              "pixel_mse": 0.0, "ssim": 1.0}]
    (row,) = disruption.summary(table)
    assert all(math.isnan(c) for c in row["pixel_mse_ci"])  # one unit: no CI
    back = strict(files.write_json(tmp_path / "s.json", {"summary": [row]}).read_text())
    assert back["summary"][0]["pixel_mse_ci"] == [None, None]


def test_default_still_converts_other_objects_and_unserialisable_payloads_still_raise(tmp_path):
    back = strict(files.write_json(tmp_path / "a.json", {"path": tmp_path, "x": float("nan")}, default=str).read_text())
    assert back == {"path": str(tmp_path), "x": None}
    with pytest.raises(TypeError):
        files.write_json(tmp_path / "b.json", {"x": object()})
    assert not (tmp_path / "b.json").exists()


def test_scorecard_reads_null_where_it_reads_a_number():
    """A CI of nulls gives "unclear", as a CI of NaNs does; the row is read, not "no current result"."""
    baseline = {"all_correct": 1.0, "all_correct_ci": [None, None]}
    row = {"all_correct": 0.5, "all_correct_ci": [0.4, 0.6]}
    drop, low, high = checks.drop_interval(baseline, row, "all_correct")
    assert drop == 0.5 and math.isnan(low) and math.isnan(high)
    assert checks.keep_verdict(low, high) == scorecard.UNCLEAR
    assert checks.ratio_verdict([None, None]) == scorecard.UNCLEAR == checks.difference_verdict([None, 0.2])


def test_committed_results_read_the_same_with_null_for_every_nan():
    """Every committed results file with its NaNs as mabook now writes them (null): every claim's
    verdict and words are unchanged. Where no committed file holds a bare NaN any more (each big run
    rewritten since), the NaN a one-prompt CI gives is planted in the CIs the sink claims read."""
    results = scorecard.load()
    if not any("NaN" in (scorecard.RESULTS_DIR / name).read_text() for name in results):
        for row in results["attention_full.json"]["summary"]:
            if row["kind"] == "baseline":
                row.update({key: [math.nan, math.nan] for key in row if key.endswith("_ci")})
    assert any(isinstance(x, float) and math.isnan(x) for r in results["attention_full.json"]["summary"]
               for v in r.values() if isinstance(v, list) for x in v) or \
        any("NaN" in (scorecard.RESULTS_DIR / name).read_text() for name in results)  # the case this covers
    rewritten = {name: strict(json.dumps(files.finite(data))) for name, data in results.items()}
    before, after = scorecard.rows(results), scorecard.rows(rewritten)
    for a, b in zip(before, after):
        assert (a["verdict"], a["proxy_verdict"], a["result"], a["reading"]) == \
               (b["verdict"], b["proxy_verdict"], b["result"], b["reading"]), a["id"]


def test_a_null_ci_in_a_committed_result_is_unclear_not_missing():
    """The baseline's CI of attention_full.json as a one-prompt run writes it (null): the sink claim
    that subtracts CIs is read -- its proxy is "unclear" -- rather than dropped as a file that lacks a field."""
    results = scorecard.load()
    data = json.loads(json.dumps(results["attention_full.json"]))
    (base,) = [r for r in data["summary"] if r["kind"] == "baseline"]
    base["all_correct_ci"] = [None, None]
    (row,) = [r for r in scorecard.rows({**results, "attention_full.json": data}) if r["id"] == "sinks-text-alignment"]
    assert row["verdict"] == scorecard.NOT_TESTABLE and row["proxy_verdict"] == scorecard.UNCLEAR, row["reading"]
    assert "[nan, nan]" in row["result"]
