"""The perceptual metrics of real models (`mabook.metrics`: CLIP-T, LPIPS), checked offline.

No real weights can be fetched here, so each metric is checked on tiny random networks against an
independent computation: CLIP-T against 100 x cosine of the projected embeddings computed in numpy
from the model's towers; LPIPS against torchmetrics' copy of the lpips package's formula with the
same backbone, and for what a distance must be (0 on identical images, symmetric, positive). The
real weights' loading paths are checked as far as they go offline: a torchvision-format file in
torch's hub cache is used without the network, and a missing one is one line naming the weights.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import mabook
from mabook import cli, config, disruption, metrics
from mabook.experiments import disrupt, sinks

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
IMAGES = RNG.random((3, 40, 40, 3))  # floats in [0, 1], as the pipelines return them
PROMPTS = ["a red circle", "blue square on top", "green"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from test_disruption import tiny_clip_dir  # a random-weight CLIP with a character-level tokenizer

    return tiny_clip_dir(tmp_path_factory.mktemp("clip"))


def tiny_lpips(net: str = "alex", seed: int = 0) -> metrics.LPIPS:
    """A random backbone with the real lpips v0.1 linear layers (non-negative: a distance >= 0)."""
    torch.manual_seed(seed)
    model = metrics.LPIPS(net)
    model.lins.load_state_dict(metrics.lpips_linear(net))
    return model


# ---------------------------------------------------------------------------------------------
# CLIP-T
# ---------------------------------------------------------------------------------------------


def numpy_clip_t(clip: metrics.Clip, images, prompts) -> np.ndarray:
    """100 x cosine of the projected embeddings, clipped at 0: the towers' pooled outputs times the
    projection matrices, in float64 numpy (not `get_*_features`)."""
    out = []
    for image, prompt in zip(metrics._uint8(images, "test"), prompts):
        inputs = clip.processor(text=[prompt], images=[image], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            pooled_image = clip.model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output.double().numpy()
            pooled_text = clip.model.text_model(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"]).pooler_output.double().numpy()
        u = pooled_image[0] @ clip.model.visual_projection.weight.detach().double().numpy().T
        v = pooled_text[0] @ clip.model.text_projection.weight.detach().double().numpy().T
        out.append(max(100 * float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)), 0.0))
    return np.array(out)


def test_clip_t_is_100_times_the_cosine_clipped_at_0(clip_dir):
    clip = metrics.load_clip(str(clip_dir))
    assert clip.id == str(clip_dir)
    got = metrics.clip_t(IMAGES, PROMPTS, clip)
    np.testing.assert_allclose(got, numpy_clip_t(clip, IMAGES, PROMPTS), atol=1e-4)
    # the text projection negated negates every cosine: each image is clipped at 0 in one of the two
    with torch.no_grad():
        clip.model.text_projection.weight.neg_()
    try:
        flipped = metrics.clip_t(IMAGES, PROMPTS, clip)
        np.testing.assert_allclose(flipped, numpy_clip_t(clip, IMAGES, PROMPTS), atol=1e-4)
    finally:
        with torch.no_grad():
            clip.model.text_projection.weight.neg_()
    assert np.all(np.minimum(got, flipped) == 0) and np.all(np.maximum(got, flipped) > 0)
    # one image at a time: a unit's score depends on no other unit; uint8 images score as their floats do
    np.testing.assert_allclose(metrics.clip_t(IMAGES[1:2], PROMPTS[1:2], clip), got[1:2], atol=0)
    np.testing.assert_allclose(metrics.clip_t(metrics._uint8(IMAGES, "test"), PROMPTS, clip), got, atol=0)
    # a loaded (model, processor) pair is taken as is
    pair = metrics.load_clip((clip.model, clip.processor))
    np.testing.assert_allclose(metrics.clip_t(IMAGES, PROMPTS, pair), got, atol=0)


def test_clip_t_refuses_a_prompt_count_that_does_not_match(clip_dir):
    with pytest.raises(ValueError, match="one prompt .* per image: 3 image"):
        metrics.clip_t(IMAGES, PROMPTS[:2], metrics.load_clip(str(clip_dir)))


def test_clip_that_cannot_be_loaded_is_one_line_naming_the_model(monkeypatch):
    from transformers import CLIPModel

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the\n"
                      "cached files.\nCheck your internet connection or see how to run the library in offline mode.")

    monkeypatch.setattr(CLIPModel, "from_pretrained", offline)
    with pytest.raises(metrics.MissingWeights) as error:
        metrics.load_clip(metrics.CLIP_MODEL)
    text = str(error.value)
    assert "\n" not in text and "openai/clip-vit-base-patch32" in text and "hf download" in text and "offline mode" in text


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


def test_lpips_is_a_distance_on_a_random_backbone():
    model = tiny_lpips()
    other = np.clip(IMAGES + RNG.normal(0, 0.05, IMAGES.shape), 0, 1)
    far = np.clip(IMAGES + RNG.normal(0, 0.3, IMAGES.shape), 0, 1)
    assert np.all(metrics.lpips(IMAGES, IMAGES, model) == 0)
    near, back = metrics.lpips(IMAGES, other, model), metrics.lpips(other, IMAGES, model)
    assert np.all(near > 0)
    np.testing.assert_allclose(near, back, rtol=1e-6)
    assert np.all(metrics.lpips(IMAGES, far, model) > near)  # more noise, farther
    np.testing.assert_allclose(metrics.lpips(IMAGES[2:], other[2:], model), near[2:], rtol=0)  # per image


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torchmetrics_copy_of_the_lpips_package(monkeypatch, net):
    """torchmetrics' _LPIPS (the lpips package's code and linear layers) on the same backbone."""
    import torchmetrics.functional.image.lpips as reference

    model = tiny_lpips(net)
    monkeypatch.setattr(reference, "_get_tv_model_features", lambda name, pretrained=False: model.features)
    theirs = reference._LPIPS(pretrained=True, net=net)  # linear layers from torchmetrics' files
    other = np.clip(IMAGES + RNG.normal(0, 0.1, IMAGES.shape), 0, 1)
    x, y = (torch.from_numpy(metrics._uint8(a, "test")).permute(0, 3, 1, 2).float() / 127.5 - 1 for a in (IMAGES, other))
    with torch.no_grad():
        expected = theirs(x, y).flatten().double().numpy()
    np.testing.assert_allclose(metrics.lpips(IMAGES, other, model), expected, rtol=1e-4)


def test_lpips_refuses_images_smaller_than_its_backbone():
    with pytest.raises(ValueError, match=r"at least 31x31 pixels .* got 16x16"):
        metrics.lpips(IMAGES[:, :16, :16], IMAGES[:, :16, :16], tiny_lpips())


def torchvision_file(model: metrics.LPIPS, path):
    """The backbone saved as torchvision's alexnet state dict (features.* and a classifier)."""
    state = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save({**state, "classifier.1.weight": torch.zeros(4096, 9216)[:2]}, path)
    return path


def test_lpips_loads_a_torchvision_file_from_the_hub_cache_without_the_network(tmp_path, monkeypatch):
    model = tiny_lpips(seed=3)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir(): TORCH_HOME/hub
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torchvision_file(model, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("went to the network"))
    loaded = metrics.load_lpips("alex")
    assert loaded.id == "lpips-v0.1-alex (alexnet-owt-7be5be79.pth)"
    other = np.clip(IMAGES + 0.1, 0, 1)
    np.testing.assert_allclose(metrics.lpips(IMAGES, other, loaded), metrics.lpips(IMAGES, other, model), rtol=0)
    # a local copy, passed as the net: the backbone is told by its first convolution
    local = metrics.load_lpips(str(torchvision_file(model, tmp_path / "copy.pth")))
    assert local.net == "alex" and str(tmp_path / "copy.pth") in local.id
    np.testing.assert_allclose(metrics.lpips(IMAGES, other, str(tmp_path / "copy.pth")), metrics.lpips(IMAGES, other, model),
                               rtol=0)


def test_lpips_offline_without_the_weights_is_one_line_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(metrics.MissingWeights) as error:
        metrics.lpips(IMAGES, IMAGES, "alex")
    text = str(error.value)
    assert "\n" not in text and "LPIPS (alex)" in text and "alexnet-owt-7be5be79.pth" in text
    assert str(tmp_path / "hub" / "checkpoints") in text and "run once online" in text and "name resolution" in text
    with pytest.raises(ValueError, match="unknown LPIPS net 'squeeze'; allowed: \\['alex', 'vgg'\\]"):
        metrics.load_lpips("squeeze")


def test_lpips_without_the_linear_layers_says_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(metrics.MissingWeights, match=r"lpips v0.1 linear layers.*pip install 'torchmetrics>=1.4'"):
        metrics.lpips_linear("alex")


# ---------------------------------------------------------------------------------------------
# --metrics: the configs and the table
# ---------------------------------------------------------------------------------------------


def test_config_defaults_are_the_metrics_modules():
    fields = {f.name: f.default for f in config.Scored.__dataclass_fields__.values()}
    assert fields["clip_model"] == metrics.CLIP_MODEL and fields["lpips_net"] == metrics.LPIPS_NET
    assert config.Scored().metrics == list(metrics.PIXEL)


@pytest.mark.parametrize("verb", [disrupt, sinks])
def test_metrics_option_names_and_errors(verb):
    cfg = verb.Config(model="some/model", metrics=["mse,LPIPS", "clip_t", "lpips"])
    assert cfg.metric_list == ["mse", "lpips", "clip-t"]
    assert cfg.perceptual() == {"lpips_net": "alex", "clip_model": metrics.CLIP_MODEL}
    assert verb.Config(model="some/model").perceptual() == {}
    with pytest.raises(ValueError, match=r"^unknown metric 'fid'; allowed: \['mse', 'mae', 'ssim', 'lpips', 'clip-t'\]"):
        verb.Config(model="some/model", metrics=["mse", "fid"])
    with pytest.raises(ValueError, match="--metrics lpips is for real models .* judge, SSIM and MAE"):
        verb.Config(metrics=["lpips"])  # the organism


def test_cli_unknown_metric_is_one_line(tmp_path, capsys):
    code = cli.main(["disrupt", "--model", "some/model", "--metrics", "mse,hps", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and err.count("\n") == 1 and "unknown metric 'hps'" in err


def test_disrupt_on_a_real_family_adds_lpips_and_clip_t_columns(tmp_path, clip_dir):
    from test_models import built  # a tiny random FLUX pipeline, loaded as a real model is

    pipe, call = built("flux")
    pipe.save_pretrained(tmp_path / "flux")
    loaded, adapter = mabook.load(tmp_path / "flux")
    loaded.set_progress_bar_config(disable=True)
    lpips_file = torchvision_file(tiny_lpips(seed=1), tmp_path / "alexnet.pth")
    cfg = disrupt.Config(model=str(tmp_path / "flux"), prompts=["a red circle", "blue"], num_inference_steps=2, k=[2],
                         kinds=["top", "random"], n_random=1, selection_prompts=["same"], metrics=["lpips,clip-t"],
                         lpips_net=str(lpips_file), clip_model=str(clip_dir))
    kwargs = {"height": 32, "width": 32, "guidance_scale": 1.0, "max_sequence_length": call["max_sequence_length"]}
    result = disrupt.run(cfg, adapter, pipe_kwargs=kwargs)
    rows = result.table
    assert {"pixel_mae", "ssim", "lpips", "clip_t"} <= set(rows[0]) and "cleanliness" not in rows[0]
    assert all(r["lpips"] == 0 for r in rows if r["condition"] == "baseline")
    assert all(r["lpips"] > 0 for r in rows if r["condition"] != "baseline")
    # the columns are the metrics module's, on the run's images
    base = result.base
    np.testing.assert_allclose([r["clip_t"] for r in rows[:2]], metrics.clip_t(base.images, ["a red circle", "blue"],
                                                                               str(clip_dir)), atol=1e-6)
    assert disruption.damage(rows, "lpips", kind="top")  # a distance: its own damage
    record = {"settings": cfg.to_dict()}
    (tmp_path / "out").mkdir()
    lines = disrupt.write(cfg, result, tmp_path / "out", record)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metric_models"] == {"clip_t": str(clip_dir), "lpips": f"lpips-v0.1-alex ({lpips_file})"}
    assert summary["settings"]["metrics"] == ["lpips,clip-t"] and summary["settings"]["clip_model"] == str(clip_dir)
    assert [r["metric"] for r in summary["paired_ratios_perceptual"]["lpips"]] == ["lpips"]
    assert "lpips" in summary["summary"][0] and "clip_t" in summary["summary"][0]
    assert any("LPIPS" in line for line in lines)


@pytest.mark.gpu
def test_perceptual_metrics_on_cuda_agree_with_the_cpu(clip_dir):
    model, clip = tiny_lpips(), metrics.load_clip(str(clip_dir))
    other = np.clip(IMAGES + 0.1, 0, 1)
    cpu = metrics.lpips(IMAGES, other, model), metrics.clip_t(IMAGES, PROMPTS, clip)
    gpu = metrics.lpips(IMAGES, other, model, "cuda"), metrics.clip_t(IMAGES, PROMPTS, clip, "cuda")
    assert next(model.parameters()).is_cuda and next(clip.model.parameters()).is_cuda  # computed there
    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-3)
    np.testing.assert_allclose(gpu[1], cpu[1], atol=1e-2)
