"""mabook.reproduce: the tolerance mabook promises across machines, checked on hand-made cases."""

from __future__ import annotations

import numpy as np

from mabook import reproduce


def test_floats_within_the_relative_tolerance_agree_and_beyond_it_do_not():
    committed = {"timestep_var": 1.1997817, "massive": 3071.5, "zero": 0.0}
    # the difference seen between two machines (issue 19) and a real-model magnitude, moved by half the tolerance
    mine = {"timestep_var": 1.1997818, "massive": 3071.5 * (1 + 0.5e-5), "zero": 5e-7}
    assert reproduce.differences(mine, committed) == []
    worse = {"timestep_var": 1.1997817 * (1 + 3e-5), "massive": 3071.5 + 1.0, "zero": 1e-5}
    found = reproduce.differences(worse, committed)
    assert [d.split(":")[0] for d in found] == [".timestep_var", ".massive", ".zero"]


def test_ints_strings_and_structure_must_be_identical():
    committed = {"top": [66, 12, 3], "verdict": "holds", "n_units": 64, "ci": [0.1, float("nan")]}
    assert reproduce.differences({"top": [66, 12, 3], "verdict": "holds", "n_units": 64, "ci": [0.1, float("nan")]},
                                 committed) == []
    assert reproduce.differences({**committed, "top": [66, 3, 12]}, committed) == [".top[1]: 3 vs 12", ".top[2]: 12 vs 3"]
    assert reproduce.differences({**committed, "verdict": "fails"}, committed) == [".verdict: 'fails' vs 'holds'"]
    assert reproduce.differences({**committed, "n_units": 63}, committed) == [".n_units: 63 vs 64"]
    assert reproduce.differences({k: v for k, v in committed.items() if k != "ci"}, committed) == [".ci: missing"]
    assert reproduce.differences({**committed, "top": [66]}, committed) == [".top: 1 items vs 3"]
    assert reproduce.differences({**committed, "n_units": True}, {**committed, "n_units": 1}) != []


def test_images_within_one_level_on_few_values_agree():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b.flat[[10, 2000]] = np.clip(b.flat[[10, 2000]].astype(int) + 1, 0, 255)  # 2 of 12288 values: 0.016 %
    assert reproduce.images_agree(b, a)[0]
    c = a.copy()
    c.flat[10] = (int(a.flat[10]) + 2) % 256  # two levels
    assert not reproduce.images_agree(c, a)[0]
    d = a.copy()
    idx = rng.choice(a.size, size=a.size // 500, replace=False)  # 0.2 % of values, one level each
    d.flat[idx] = np.where(a.flat[idx] < 255, a.flat[idx] + 1, a.flat[idx] - 1)
    ok, how = reproduce.images_agree(d, a)
    assert not ok and "0.19" in how
    floats = a / 255.0  # float images in [0, 1] are rounded to uint8 first
    assert reproduce.images_agree(floats + 1e-4, a)[0]
    assert not reproduce.images_agree(a[:2], a)[0]


def test_assert_agrees_names_what_failed():
    try:
        reproduce.assert_agrees({"x": 2.0}, {"x": 1.0}, "spatial_full.json")
    except AssertionError as e:
        assert "spatial_full.json" in str(e) and ".x: 2.0 vs 1.0" in str(e)
    else:
        raise AssertionError("no error")
