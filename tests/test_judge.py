import numpy as np
import pytest

from mabook import judge, world


@pytest.fixture(scope="module")
def ground_truth():
    samples = world.sample(400, seed=11)
    return samples, [judge.judge(s.image, s.caption) for s in samples]


def test_judge_is_exact_on_ground_truth(ground_truth):
    _, js = ground_truth
    summary = judge.summarize(js)
    for group in summary.values():
        for attr in ("color", "shape", "size", "position"):
            assert group[attr] >= 0.99, (attr, group)
        assert group["cleanliness"] == 1.0 and group["mask_iou"] == 1.0


def test_judge_foreground_matches_ground_truth_masks(ground_truth):
    samples, js = ground_truth
    assert all(np.array_equal(j.foreground, s.foreground) for s, j in zip(samples, js))


def test_judge_flags_a_wrong_caption():
    s = world.render(world.parse_caption("a large red circle at the left on a black background"))
    j = judge.judge(s.image, "a small blue triangle at the right on a white background")
    assert j.correct == [{"color": False, "shape": False, "size": False, "position": False}]
    assert not j.background_correct and j.mask_iou < 0.1


def test_judge_reads_each_attribute_independently():
    s = world.render(world.parse_caption("a large red circle at the left on a black background"))
    j = judge.judge(s.image, "a large red square at the left on a black background")
    assert j.correct[0] == {"color": True, "shape": False, "size": True, "position": True}


def test_blank_and_noise_images_score_low():
    cap = "a large red circle at the center on a black background"
    blank = judge.judge(np.zeros((32, 32, 3), np.uint8), cap)
    assert not any(blank.correct[0].values()) and not blank.detected
    noise = judge.judge(np.random.default_rng(0).random((32, 32, 3)), cap)
    assert noise.cleanliness < 0.5


def test_judge_accepts_float_images_and_rejects_bad_shapes():
    s = world.sample(1, seed=0)[0]
    assert judge.judge(s.image / 255.0, s.caption).all_correct
    with pytest.raises(ValueError, match="must be"):
        judge.judge(np.zeros((16, 16, 3)), s.caption)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        judge.judge(np.full((32, 32, 3), 3.0), s.caption)


def test_the_judge_applies_to_the_organisms_world_captions_only():
    from types import SimpleNamespace

    from mabook import judge as judge_mod

    organism = SimpleNamespace(family=SimpleNamespace(name="organism"))
    flux = SimpleNamespace(family=SimpleNamespace(name="flux"))
    captions = world.heldout_captions(3, n_objects=1, seed=0)
    assert judge_mod.applies(organism, captions)
    assert not judge_mod.applies(flux, captions)  # a real model's image is not a 32x32 world rendering
    assert not judge_mod.applies(organism, captions + ["a photo of a cat"])
    assert not judge_mod.applies(None, captions)
