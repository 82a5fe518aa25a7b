import numpy as np
import pytest

from mabook import world


def test_sampling_is_deterministic_for_a_seed():
    a, b = world.sample(20, seed=7), world.sample(20, seed=7)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert [s.caption for s in world.sample(20, seed=8)] != [s.caption for s in a]


def test_every_caption_parses_back_to_its_scene():
    for s in world.sample(300, seed=1):
        assert world.parse_caption(s.caption) == s.scene


def test_masks_are_the_exact_object_pixels():
    for s in world.sample(100, seed=2):
        assert s.image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        bg = np.array(world.BACKGROUNDS[s.scene.background])
        assert (s.image[~s.foreground] == bg).all()
        for obj, mask in zip(s.scene.objects, s.masks):
            assert mask.sum() > 30
            assert (s.image[mask] == np.array(world.COLORS[obj.color])).all()
        assert not (s.masks.sum(0) > 1).any()  # objects never overlap


def test_mask_sits_at_its_named_position():
    for s in world.sample(100, seed=3, n_objects=1):
        ys, xs = np.nonzero(s.masks[0])
        cx, cy = world.POSITIONS[s.scene.objects[0].position]
        assert abs(xs.mean() + 0.5 - cx) < 1.5 and abs(ys.mean() + 0.5 - cy) < 2.5


def test_two_object_scenes_have_distinct_colours_and_no_overlap():
    for s in world.sample(100, seed=4, n_objects=2):
        a, b = s.scene.objects
        assert a.color != b.color and not world.overlaps(a, b)


def test_heldout_split_is_disjoint_from_train():
    train = {s.caption for s in world.sample(500, seed=5, split="train")}
    held = {s.caption for s in world.sample(200, seed=5, split="heldout")}
    assert train and held and not train & held
    assert all(world.is_heldout(c) for c in held)


def test_heldout_captions_are_distinct_and_enough_for_evaluation():
    caps = world.heldout_captions(256, 1, seed=0)
    assert len(set(caps)) == 256 and all(world.is_heldout(c) for c in caps)


@pytest.mark.parametrize("caption", ["a red circle", "a huge red circle at the top on a black background", ""])
def test_bad_caption_error_names_caption_and_vocabulary(caption):
    with pytest.raises(ValueError, match="cannot parse caption") as e:
        world.parse_caption(caption)
    assert "circle" in str(e.value)


def test_bad_attribute_error_lists_allowed_values():
    with pytest.raises(ValueError, match="unknown color 'purple'.*allowed"):
        world.ObjectSpec("purple", "circle", "small", "top")
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(np.random.default_rng(0), split="test")
