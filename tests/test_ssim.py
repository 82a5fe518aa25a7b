"""SSIM (`metrics.ssim`) on the images' device, against an independent numpy implementation of
the same formula (Wang et al. 2004 as torchmetrics computes it: an 11 x 11 Gaussian window of sigma
1.5, K1 = 0.01, K2 = 0.03, data range 1, variances clamped at 0, averaged over every pixel and
channel, the image mirrored at its border where a window reaches outside) and against torchmetrics
in float64, which made the committed results. Float64 because float32 is not precise enough: on a
flat background E[x^2] - E[x]^2 cancels and SSIM is off by ~2e-5, as large as 1 - SSIM after a
small edit (measured on the organism's images)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mabook import metrics

TOLERANCE = 1e-12  # float64 against float64, summed in another order (seen: 2e-16)


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W, C) images in [0, 1], in float64 numpy, from the definition."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x = np.arange(11) - 5
    g = np.exp(-0.5 * (x / 1.5) ** 2)
    window = np.outer(g, g) / np.outer(g, g).sum()

    def local_mean(img):  # (H, W, C): the window's weighted mean at every pixel, mirrored at the border
        padded = np.pad(img, ((5, 5), (5, 5), (0, 0)), mode="reflect")
        patches = np.lib.stride_tricks.sliding_window_view(padded, (11, 11), axis=(0, 1))  # (H, W, C, 11, 11)
        return np.einsum("hwcij,ij->hwc", patches, window)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = np.maximum(local_mean(a * a) - mu_a ** 2, 0), np.maximum(local_mean(b * b) - mu_b ** 2, 0)
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


@pytest.fixture(scope="module")
def images():
    """Four (clean, changed) pairs of 32 x 48 images: noise of three sizes on random images, and a
    nearly flat background (0.9, noise 1e-3; a generated image's background) changed by noise of 1e-3."""
    rng = np.random.default_rng(0)
    clean = rng.random((4, 32, 48, 3)).astype(np.float32)
    clean[1] = 0.9 + rng.normal(0, 1e-3, clean[1].shape)
    changed = np.clip(clean + rng.normal(0, [[[[0.01]]], [[[1e-3]]], [[[0.2]]], [[[0.5]]]], clean.shape), 0, 1)
    return clean, changed.astype(np.float32)


def test_ssim_matches_a_numpy_reference_and_torchmetrics_in_float64(images):
    from torchmetrics.functional.image import structural_similarity_index_measure as measure

    clean, changed = images
    ours = metrics.ssim(changed, clean)
    expected = np.array([reference_ssim(c, r) for c, r in zip(changed, clean)])
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)
    assert ours[0] > ours[2] > ours[3] and 0 < 1 - ours[1] < 2e-3  # four different similarities, one small edit
    as_torch = lambda x, dtype: torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype)
    in_float64 = measure(as_torch(changed, torch.float64), as_torch(clean, torch.float64), data_range=1.0, reduction="none")
    np.testing.assert_allclose(ours, in_float64.numpy(), atol=TOLERANCE, rtol=0)  # what made the committed results
    in_float32 = measure(as_torch(changed, torch.float32), as_torch(clean, torch.float32), data_range=1.0, reduction="none")
    assert abs(float(in_float32[1]) - expected[1]) > 1e-6  # why not float32: seen 4.2e-6 here, 0.4 % of 1 - SSIM


def test_an_image_is_like_itself_and_each_unit_is_its_own(images):
    clean, changed = images
    np.testing.assert_allclose(metrics.ssim(clean, clean), 1.0, atol=TOLERANCE, rtol=0)
    assert np.array_equal(metrics.ssim(changed[2:3], clean[2:3]), metrics.ssim(changed, clean)[2:3])


@pytest.mark.parametrize("device, expected", [("cpu", "cpu"), ("mps", "cpu")])  # MPS has no float64: the CPU
def test_ssim_runs_in_float64_on_the_images_device(images, monkeypatch, device, expected):
    clean, changed = images
    seen = set()
    conv2d = torch.nn.functional.conv2d

    def spy(x, weight, *args, **kwargs):
        seen.add((x.dtype, x.device.type))
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    metrics.ssim(changed[:1], clean[:1], torch.device(device))
    assert seen == {(torch.float64, expected)}


def test_metrics_run_where_the_images_were_made(trained_organism):
    _, adapter = trained_organism
    assert metrics.device_of(adapter) == next(adapter.transformer.parameters()).device
    assert metrics.device_of(SimpleNamespace()) == torch.device("cpu")  # no model: the CPU
    with pytest.raises(ValueError, match=r"ssim needs two \(N, H, W, 3\) image arrays of one shape, got \(1, 8, 8, 3\)"):
        metrics.ssim(np.zeros((1, 8, 8, 3)), np.zeros((2, 8, 8, 3)))


@pytest.mark.gpu
def test_ssim_on_cuda_agrees_with_the_reference(images, monkeypatch):
    clean, changed = images
    seen = set()
    conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, *a, **k: seen.add(x.device.type) or conv2d(x, *a, **k))
    ours = metrics.ssim(changed, clean, "cuda")
    assert seen == {"cuda"}
    np.testing.assert_allclose(ours, [reference_ssim(c, r) for c, r in zip(changed, clean)], atol=1e-10, rtol=0)
