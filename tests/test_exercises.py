"""The workshop exercises: every check accepts a right answer, rejects wrong ones with a hint, and says
"not answered yet" to the committed ``answer = None``; every chapter lays its exercises out as
`mabook.exercises` describes (task, TODO cell, collapsed solution). Small inputs, no model except one
tiny generation (exercise 2.1), so the whole file runs in seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from mabook import exercises, world
from mabook.exercises import registry
from mabook.probe import Tap
from mabook.statistics import Statistics

ROOT = Path(__file__).resolve().parents[1]
# Chapters written while the exercises were added in other branches of work: they get theirs by
# the same pattern (remove a name here when its exercises are in).
PENDING: set[str] = set()
CAPTION = "a large red circle at the top left on a black background"


# ---------------------------------------------------------------------------------------------
# Small inputs
# ---------------------------------------------------------------------------------------------


def _stats(seed: int = 0, width: int = 12) -> Statistics:
    """Two image taps x two steps of random hidden states with channels of very different sizes."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 3.0, width)[torch.randperm(width, generator=g)]
    stats = Statistics()
    for step in (0, 1):
        for block in ("transformer_blocks.0", "transformer_blocks.1"):
            x = torch.randn(2, 16, width, generator=g) * scale + scale * torch.randn(width, generator=g)
            stats.update(Tap(block), step, x)
    return stats


TAP = "transformer_blocks.1.img"


def _abs_mean(stats, tap=TAP):
    return stats.get("abs_mean", tap).numpy()


class _FakeAttention:
    """What check_top1_sinks reads from an attention capture: mass(layer, step) -> (heads, keys)."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self._mass = torch.softmax(torch.randn(3, 10, generator=g, dtype=torch.float64) * 2, -1)

    def mass(self, layer, step):
        return self._mass


def _sink_table():
    rows = []
    for prompt, sink, rand, bottom in (("p0", 4.0, 1.0, 0.5), ("p1", 2.0, 2.0, 0.25), ("p2", 6.0, 1.5, 1.0)):
        for kind, value, seeds in (("sink", sink, [0]), ("random", rand, [0, 1]), ("bottom", bottom, [0])):
            for s in seeds:  # the random sets: rand - 0.5 and rand + 0.5, averaging to rand
                v = value + (s - 0.5) if kind == "random" else value
                rows.append({"prompt": prompt, "seed": 0, "kind": kind, "k": 1, "op": "score eta=0",
                             "window": "all layers, all steps", "pixel_mse": v, "seed_keys": s})
    return rows


def _card():
    def row(step, ema, raw):
        return {"step": step, "ema": [{"ratio": r} for r in ema], "raw": [{"ratio": r} for r in raw]}

    return {"emergence": [row(0, [1, 1], [1, 1]), row(100, [3, 5], [2, 2]), row(200, [8, 10], [9, 9]),
                          row(300, [10, 10], [11, 11]), row(400, [11, 11], [10, 10])]}


def _origins():
    """A small origins.json "organisms": a 32-wide control and two counterfactuals, emergence logs on one grid
    (the control's without the share, as the committed file's)."""
    def organism(shares, ratios, emergence_ratios, emergence_shares):
        return {"organism_config": {"attention_head_dim": 8, "num_attention_heads": 4},
                "layers": [{"norm_share": s, "norm_share_top_k": s + 0.1, "ratio": r, "max_abs": 2 * r}
                           for s, r in zip(shares, ratios)],
                "emergence": [{"step": step, "ratio": r, "norm_share": sh, "max_abs": r}
                              for step, r, sh in zip((0, 250, 500, 750, 1000), emergence_ratios, emergence_shares)]}

    return {"control": organism([0.4, 0.2, 0.3], [20, 10, 15], [1, 3, 6, 9, 10], [None] * 5),
            "big": organism([0.5, 0.39, 0.3], [30, 12, 15], [1, 6, 9, 10.5, 12], [0.1, 0.2, 0.3, 0.4, 0.5]),
            "small": organism([0.2, 0.1, 0.15], [5, 4, 3], [1, 2, 10, 11, 12], [0.1, 0.1, 0.1, 0.1, 0.1])}


def _spatial_capture():
    from mabook import spatial

    g = np.random.default_rng(0)
    x = g.normal(size=(1, 16, 3)) * 0.1
    x[0, [5, 6, 9, 10], 0] += 5.0  # a 2x2 blob in channel 0
    return spatial.Capture(units=[(CAPTION, 0)], images=np.zeros((1, 16, 16, 3)), hidden={("blocks.0.img", 3): x},
                           stats=Statistics(), grid=(4, 4), num_inference_steps=4)


@pytest.fixture(scope="module")
def tiny_baseline(trained_organism):
    from mabook import disruption

    _, adapter = trained_organism
    return disruption.baseline(adapter, [CAPTION], [0], 2)


# ---------------------------------------------------------------------------------------------
# One case per check: (arguments before the answer, a right answer, wrong answers)
# ---------------------------------------------------------------------------------------------


def _case_0_1(_):
    frac = float(world.render(world.parse_caption(CAPTION)).masks.any(0).mean())
    return (CAPTION,), frac, [1 - frac, frac * 1024, 0.5, "a lot", 2.0]


def _case_0_2(_):
    image = world.render(world.parse_caption(CAPTION)).image
    other = "a large blue circle at the center on a black background"
    return (image, other), {"color", "position"}, [{"color"}, {"color", "position", "shape"}, {"colour"}, ["hue"], 3]


def _case_0_3(_):
    captions = [CAPTION, "a small blue square at the center on a white background"]
    images = [world.render(world.parse_caption(c)).image for c in captions]
    images[1] = world.render(world.parse_caption("a small green square at the center on a white background")).image
    return (images, captions, "color"), 0.5, [1.0, 50, "half"]


def _case_1_1(_):
    stats = _stats()
    values = _abs_mean(stats)
    top = np.argsort(-values)[:3]
    return (stats, TAP, 3), list(top[::-1]), [list(np.argsort(values)[:3]), list(top[:2]), [top[0], top[1], 99], "top"]


def _case_1_2(_):
    stats = _stats()
    v = _abs_mean(stats)
    ratio = v.max() / np.median(v)
    return (stats, TAP), ratio, [v.max() / v.mean(), 1 / ratio, v.max(), ratio * 1.1]


def _case_1_3(_):
    a, b = _stats(0), _stats(1)
    sa, sb = set(np.argsort(-_abs_mean(a))[:4].tolist()), set(np.argsort(-_abs_mean(b))[:4].tolist())
    j = len(sa & sb) / len(sa | sb)
    wrong = [x for x in (float(len(sa & sb)), len(sa & sb) / 4, j + 0.2) if not np.isclose(x, j)]
    return (a, b, TAP, 4), j, wrong


def _case_2_1(request):
    base = request.getfixturevalue("tiny_baseline")
    import torch as _torch

    from mabook import disruption, probe

    edits = [probe.Edit(t, disruption.channel_set(base.stats, 1, "top")[t], "zero") for t in base.layers]
    with probe.edit(base.adapter, edits):
        image = base.adapter.pipe([base.units[0][0]], num_inference_steps=2, generator=_torch.Generator("cpu").manual_seed(0),
                                  output_type="np").images
    image = image.numpy() if isinstance(image, _torch.Tensor) else np.asarray(image)
    mse = float(((image[0] - base.images[0]) ** 2).mean())
    return (base,), mse, [0.0, mse * 2, -1.0]


def _case_2_2(_):
    stats = _stats()
    rms = np.sqrt(stats.get("mean", TAP).numpy() ** 2 + stats.get("std", TAP).numpy() ** 2)
    right = list(np.argsort(rms)[:3])
    wrong = [list(np.argsort(-rms)[:3]), right[:2], [right[0], right[1], int(np.argsort(rms)[5])]]
    bottom_abs = list(np.argsort(_abs_mean(stats))[:3])
    if set(bottom_abs) != set(right):
        wrong.append(bottom_abs)
    return (stats, TAP, 3), right, wrong


def _case_2_3(_):
    return (), (lambda s: s.mean(1, keepdim=True).expand_as(s)), [
        lambda s: s.mean(2, keepdim=True).expand_as(s), lambda s: s.mean(1), lambda s: s, lambda s: 1 / 0,
        lambda s: s.numpy()]


def _case_2b_1(_):
    # ema medians 1, 4, 9, 10, 11: half of 11 is 5.5, first reached at step 200 (index 2)
    return (_card(),), 200, [2, 100, 300, "200 steps"]


def _case_2b_2(_):
    card = _card()  # window 0.5: cut at step 200; raw medians 9 -> 10: +1/9
    right = 10 / 9 - 1
    return (card, "raw", 0.5), right, [11 / 9 - 1, 100 * right, 1.0, 0.5]


def _case_2c_1(_):
    control = _origins()["control"]  # share 0.4 at width 32: r**2 = 0.4 * 31 / 0.6
    r2 = 0.4 * 31 / 0.6
    right = r2 / (r2 + 3071)
    mean_r2 = 0.3 * 31 / 0.7  # from the mean share
    return (control, 3072), right, [0.4, 100 * right, r2 ** 0.5, r2 ** 0.5 / (r2 ** 0.5 + 3071), mean_r2 / (mean_r2 + 3071),
                                    400 / (400 + 3071), "a lot", 0.5]


def _case_2c_2(_):
    # big vs control: max 0.5 / 0.4 = 1.25; mean 0.3967 / 0.3 = 1.322; median 0.39 / 0.3 = 1.3
    mx, mn = 1.25, (1.19 / 3) / 0.3
    return (_origins(), "big", "control", 0.2), (mx, mn), [
        (mn, mx), (1 / mx, 1 / mn), (mx - 1, mn - 1), (100 * mx, 100 * mn), (mx, 1.3), mx, (0.5, 0.5), (mx, mn, 1.0)]


def _case_2c_3(_):
    # the control's final ratio is 10 (step 1000); big reaches it at step 750 (row 3), small at 500
    return (_origins(), "big", "control", "ratio"), 750, [3, 250, 500, 1000, "750 steps", 1.5]


def _case_3_1(_):
    cap = _spatial_capture()
    blob = np.zeros((4, 4), bool)
    blob[1:3, 1:3] = True
    return (cap, "blocks.0.img", 3, [0, 1, 2], 0), blob, [~blob, blob.ravel(), np.zeros((4, 4), bool),
                                                           np.eye(4, dtype=bool)]


def _case_3_2(_):
    fg = world.render(world.parse_caption(CAPTION)).foreground
    truth = fg.reshape(8, 4, 8, 4).mean((1, 3)) >= 0.5
    mask = truth.copy()
    mask[7, 7] = True  # one extra token
    iou = truth.sum() / (truth.sum() + 1)
    return (CAPTION, (8, 8), mask), iou, [1.0, 0.0, float(((~mask) & truth).sum())]


def _blend_images():
    g = np.random.default_rng(2)
    return g.random((3, 8, 8, 3)), g.random((3, 8, 8, 3))  # sources, targets


def _case_4_1(_):
    src, tgt = _blend_images()
    right = 0.75 * tgt + 0.25 * src
    return (src, tgt, 0.25), right, [0.25 * tgt + 0.75 * src, tgt + 0.25 * src, right[0], right.mean(), "blend",
                                     torch.from_numpy(right[:, ::-1].copy())]


def _took_rows():
    rows = []
    # (kind, pair, method, alpha, took_color): pair 2 does not differ in colour (NaN)
    for kind, pair, took in (("one_attribute", 0, 1.0), ("one_attribute", 1, 0.0), ("one_attribute", 2, np.nan),
                             ("two_attributes", 0, 1.0)):
        rows.append({"kind": kind, "pair": pair, "method": "top-16", "alpha": 1.0, "took_color": took})
        rows.append({"kind": kind, "pair": pair, "method": "top-16", "alpha": 0.5, "took_color": 0.0 if took == took else took})
        for seed, t in ((0, 1.0), (1, 0.0)):
            rows.append({"kind": kind, "pair": pair, "method": "random-16", "alpha": 1.0, "took_color": t if took == took else took})
    return rows


def _case_4_2(_):
    # top-16 at alpha 1: 1, 0, 1 where colour differs -> 2/3; counting the NaN pair as 0 gives 1/2
    return (_took_rows(), "top-16", 1.0, "color"), 2 / 3, [0.5, 200 / 3, 1 / 3, "most", 1.5]


def _case_5_1(_):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    traj = SimpleNamespace(clean=torch.randn(2, 16, 4, generator=g), noise=torch.randn(2, 16, 4, generator=g),
                           sigmas=torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0]))
    s = traj.sigmas

    def at(i):
        return (1 - s[i]) * traj.clean + s[i] * traj.noise

    return (traj, 2), at(2), [s[2] * traj.clean + (1 - s[2]) * traj.noise, at(1), at(3), at(2)[0], traj.clean, "noise"]


def _case_5_2(_):
    g = np.random.default_rng(4)
    refs = g.random((3, 8, 8, 3))
    images = np.clip(refs + g.normal(scale=0.05, size=refs.shape), 0, 1)
    d = images - refs
    return (images, refs), np.abs(d).mean(), [d.mean(), (d ** 2).mean(), np.abs(d).max(), 255 * np.abs(d).mean(),
                                               np.abs(d).mean(axis=(1, 2, 3)), "small"]


def _case_6_1(_):
    cap = _FakeAttention()
    right = cap.mass("l", 0).argmax(-1).tolist()
    return (cap, "l", 0), right, [cap.mass("l", 0).argmin(-1).tolist(), right[:2], int(right[0]), [right[0]] * 2 + [-1]]


def _case_6_2(_):
    # sink means 4, 2, 6 (mean 4); random means 1, 2, 1.5 (mean 1.5): ratio 8/3
    return (_sink_table(), 1, "all layers, all steps"), 8 / 3, [3 / 8, np.mean([4, 1, 4]), 4 / np.mean([0.5, 0.25, 1.0]), 2.0]


def _case_6_3(_):
    def right(p, keys, eta):  # the paper's dose: the keys keep eta * p, the others absorb the rest in proportion
        q = p.copy()
        others = np.ones(p.shape[-1], bool)
        others[keys] = False
        removed = (1 - eta) * p[..., keys].sum(-1, keepdims=True)
        q[..., others] *= 1 + removed / p[..., others].sum(-1, keepdims=True)
        q[..., keys] *= eta
        return q

    def renormalise(p, keys, eta):  # the old rule: multiply by eta, renormalise the row
        w = np.ones(p.shape[-1])
        w[keys] = eta
        q = p * w
        return q / q.sum(-1, keepdims=True)

    def no_renorm(p, keys, eta):
        q = p.copy()
        q[..., keys] *= eta
        return q

    def scale_others(p, keys, eta):
        w = np.full(p.shape[-1], eta)
        w[keys] = 1
        q = p * w + 1e-30
        return q / q.sum(-1, keepdims=True)

    def uniform_others(p, keys, eta):  # the removed mass shared equally, not in proportion
        q = p.copy()
        others = np.ones(p.shape[-1], bool)
        others[keys] = False
        q[..., others] += (1 - eta) * p[..., keys].sum(-1, keepdims=True) / others.sum()
        q[..., keys] *= eta
        return q

    return (), right, [renormalise, no_renorm, scale_others, uniform_others, lambda p, keys, eta: p,
                       lambda p, keys, eta: p[..., :2]]


CASES = {
    "0.1": _case_0_1, "0.2": _case_0_2, "0.3": _case_0_3,
    "1.1": _case_1_1, "1.2": _case_1_2, "1.3": _case_1_3,
    "2.1": _case_2_1, "2.2": _case_2_2, "2.3": _case_2_3,
    "2b.1": _case_2b_1, "2b.2": _case_2b_2,
    "2c.1": _case_2c_1, "2c.2": _case_2c_2, "2c.3": _case_2c_3,
    "3.1": _case_3_1, "3.2": _case_3_2,
    "4.1": _case_4_1, "4.2": _case_4_2,
    "5.1": _case_5_1, "5.2": _case_5_2,
    "6.1": _case_6_1, "6.2": _case_6_2, "6.3": _case_6_3,
}


def test_every_check_has_a_case():
    assert sorted(exercises.CHECKS) == sorted(CASES), "add a case here for every @exercise check"


@pytest.mark.parametrize("number", sorted(CASES))
def test_check_accepts_the_right_answer_and_rejects_wrong_ones(number, request, capsys):
    check = exercises.CHECKS[number]
    args, right, wrongs = CASES[number](request)

    assert check(*args, None) is False
    out = capsys.readouterr().out
    assert "not answered yet" in out and "Hint:" in out, out

    assert check(*args, right) is True
    assert "correct" in capsys.readouterr().out

    for wrong in wrongs:
        assert check(*args, wrong) is False, f"exercise {number} accepted the wrong answer {wrong!r}"
        out = capsys.readouterr().out
        assert out.startswith(("❌", "✏️")) and "Hint:" in out, out


def test_hints_name_the_likely_mistake(capsys):
    stats = _stats()
    exercises.check_top_channels(stats, TAP, 3, list(np.argsort(_abs_mean(stats))[:3]))
    assert "smallest" in capsys.readouterr().out
    exercises.check_ratio_to_median(stats, TAP, _abs_mean(stats).max() / _abs_mean(stats).mean())
    assert "mean channel" in capsys.readouterr().out
    exercises.check_token_mean_op(lambda s: s.mean(2, keepdim=True).expand_as(s))
    assert "channels" in capsys.readouterr().out
    renormalise = CASES["6.3"](None)[2][0]  # the old dose: multiply by eta, then renormalise
    assert exercises.check_eta_scaling(renormalise) is False
    assert "old rule" in capsys.readouterr().out


def test_origins_hints_name_the_likely_mistake(capsys):
    orgs = _origins()
    r2 = 0.4 * 31 / 0.6
    exercises.check_share_at_width(orgs["control"], 3072, r2 ** 0.5 / (r2 ** 0.5 + 3071))
    assert "r**2" in capsys.readouterr().out
    exercises.check_share_at_width(orgs["control"], 3072, 0.4)
    assert "own width" in capsys.readouterr().out
    exercises.check_share_versus(orgs, "big", "control", 0.2, (1.25, 1.3))
    assert "medians" in capsys.readouterr().out
    exercises.check_share_versus(orgs, "big", "control", 0.2, (1 / 1.25, 0.3 / (1.19 / 3)))
    assert "control over big" in capsys.readouterr().out
    assert exercises.check_share_versus(orgs, "big", "control", 0.2, (1.25, (1.19 / 3) / 0.3)) is True
    assert "above" in capsys.readouterr().out  # both beyond +20 %: section 2.5's word
    exercises.check_catch_up_step(orgs, "big", "control", "ratio", 3)
    assert "index" in capsys.readouterr().out
    exercises.check_catch_up_step(orgs, "big", "control", "ratio", 250)
    assert "how many steps sooner" in capsys.readouterr().out
    # the control's log holds no share: the check says so rather than judging
    assert exercises.check_catch_up_step(orgs, "big", "control", "norm_share", 750) is False
    assert "holds no 'norm_share'" in capsys.readouterr().out


def test_a_check_without_ground_truth_says_so(capsys):
    assert exercises.check_token_iou("a photo of a cat", (8, 8), np.zeros((8, 8), bool), 0.5) is False
    assert "organism" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The registry: a number and a notebook are written once
# ---------------------------------------------------------------------------------------------


def test_the_registry_refuses_a_number_twice_or_from_another_chapter():
    exercise = registry.chapter("notebooks/02b_emergence.ipynb")
    with pytest.raises(ValueError, match="not in chapter 2b"):
        exercise("2.9", "a chapter 2 number in the interlude")
    with pytest.raises(ValueError, match="registered twice"):
        exercise("2b.1", "again")(lambda answer: registry.right())
    with pytest.raises(ValueError, match="not a chapter"):
        registry.chapter("book/workshop.md")
    assert [registry.chapter_number(f"notebooks/{n}") for n in ("00_a.ipynb", "02b_b.ipynb", "06_c.ipynb")] == ["0", "2b", "6"]


def test_one_module_per_chapter_holds_its_checks():
    modules = {}
    for number, check in exercises.CHECKS.items():
        assert check.exercise == number and getattr(exercises, check.__name__) is check, f"{number} is not re-exported"
        modules.setdefault(check.__module__, set()).add(exercises.WHERE[number][0])
    assert all(m.startswith("mabook.exercises.ch") for m in modules), sorted(modules)
    assert all(len(notebooks) == 1 for notebooks in modules.values()), modules


# ---------------------------------------------------------------------------------------------
# The chapters' cells
# ---------------------------------------------------------------------------------------------

CHAPTERS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name not in PENDING)
EXERCISE_HEADING = re.compile(r"^### Exercise (\S+) — ", re.M)


def _exercises_in(path: Path) -> list[tuple[str, nbformat.NotebookNode, nbformat.NotebookNode]]:
    nb = nbformat.read(path, as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        m = EXERCISE_HEADING.search(cell.source) if cell.cell_type == "markdown" else None
        if m:
            assert i + 2 < len(nb.cells), f"{path.name}: exercise {m.group(1)} has no TODO and solution cells"
            found.append((m.group(1), nb.cells[i + 1], nb.cells[i + 2]))
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_has_exercises_with_todo_and_collapsed_solution(path):
    found = _exercises_in(path)
    assert 2 <= len(found) <= 3, f"{path.name}: {len(found)} exercises; every chapter has 2 or 3"
    for number, todo, solution in found:
        assert number in exercises.CHECKS, f"{path.name}: exercise {number} has no check in mabook.exercises"
        check = exercises.CHECKS[number].__name__
        assert exercises.WHERE[number][0] == f"notebooks/{path.name}", f"exercise {number} is registered elsewhere"
        assert todo.cell_type == "code" and "# TODO" in todo.source and f"exercises.{check}(" in todo.source, (
            f"{path.name}: exercise {number}'s first code cell must hold a '# TODO' and call exercises.{check}")
        assert "hide-cell" not in todo.metadata.get("tags", [])
        assert solution.cell_type == "code" and f"exercises.{check}(" in solution.source
        assert "# TODO" not in solution.source
        assert "hide-cell" in solution.metadata.get("tags", []), f"{path.name}: exercise {number}'s solution is not collapsed"
        assert solution.metadata.get("mystnb", {}).get("code_prompt_show") == "Show solution"


def test_every_check_is_used_in_its_chapter():
    for number, (notebook, _) in exercises.WHERE.items():
        numbers = [n for n, _, _ in _exercises_in(ROOT / notebook)]
        assert number in numbers, f"exercise {number} ({notebook}) is not in its chapter"


def test_the_workshop_plan_lists_every_exercise():
    plan = (ROOT / "book" / "workshop.md").read_text()
    missing = [n for n in exercises.CHECKS if not re.search(rf"(?<![\w.]){re.escape(n)} ", plan)]
    assert not missing, f"book/workshop.md does not list exercises {missing}"


def test_on_a_real_model_an_organism_only_input_is_a_line_saying_so_not_an_error(capsys):
    """A chapter on a real model passes `exercises.OrganismOnly` for what only the organism's run
    computes; the exercise's cells run as written (attributes, items, arithmetic, numpy and
    iteration on it give it back or nothing) and the check prints that it cannot check, naming the
    input, and returns False."""
    missing = exercises.OrganismOnly("the shapes world's rows")
    sigma = missing.sigmas[3]
    assert (1 - sigma) * missing.clean + sigma * missing.noise is missing
    assert np.abs(missing - missing).mean() is missing and list(missing) == [] and len(missing) == 0
    assert "organism" in repr(missing)
    assert exercises.check_took_attribute(missing, "top-16", 1.0, "color", None) is False
    assert exercises.check_reconstruction_error(missing, missing, missing) is False
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ℹ️ Exercise 4.2: cannot be checked on this model") and "(rows)" in out[0]
    assert out[1].startswith("ℹ️ Exercise 5.2:") and "(images, references)" in out[1] and "MODEL" in out[1]
    images = np.zeros((1, 4, 4, 3))  # a real input still gets its check
    assert exercises.check_pixel_blend(images, images, 0.5, images) is True
