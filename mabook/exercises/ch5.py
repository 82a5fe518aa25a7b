"""Chapter 5's exercises (image-conditioned transport): noising a reference, the reconstruction error."""

from __future__ import annotations

import numpy as np

from mabook.exercises.answers import array_answer, as_array, close, matches, number_answer
from mabook.exercises.registry import Verdict, chapter, right, wrong

exercise = chapter("notebooks/05_image_transport.ipynb")


@exercise("5.1", "Noise a reference by hand")
def check_noised_latents(traj, step: int, answer) -> Verdict:
    """The noising trajectory at `step`: (1 - sigma_step) * clean + sigma_step * eps, with the
    trajectory's clean latents (``traj.clean``), its eps (``traj.noise``) and schedule (``traj.sigmas``)."""
    clean, eps, sigmas = as_array(traj.clean), as_array(traj.noise), as_array(traj.sigmas)
    sigma = float(sigmas[step])
    expected = (1 - sigma) * clean + sigma * eps
    hint = (f"sigma = traj.sigmas[{step}] (step 0 is pure noise, sigma = 1); x = (1 - sigma) * traj.clean + "
            "sigma * traj.noise, for every reference at once.")
    x = array_answer(answer, expected.shape, "a tensor or array of latents",
                     "noise every reference: traj.clean and traj.noise, whole.", hint)
    if isinstance(x, Verdict):
        return x
    if matches(x, expected):
        return right(f"At step {step} (sigma = {sigma:.3f}) the latents are {1 - sigma:.0%} reference and "
                     f"{sigma:.0%} noise.")
    if matches(x, sigma * clean + (1 - sigma) * eps):
        return wrong("clean latents and noise are swapped.", "sigma weighs the noise: sigma = 1 is pure noise.")
    for off in (step - 1, step + 1):
        if 0 <= off < len(sigmas) and matches(x, (1 - sigmas[off]) * clean + sigmas[off] * eps):
            return wrong(f"that is step {off}'s noise level.", f"use traj.sigmas[{step}].")
    return wrong("these are not the noised latents.", hint)


@exercise("5.2", "The reconstruction error by hand")
def check_reconstruction_error(images, references, answer) -> Verdict:
    """Mean |image - reference| over pixels, colour channels and references (images in [0, 1])."""
    imgs, refs = as_array(images), as_array(references)
    d = imgs - refs
    expected = float(np.abs(d).mean())
    hint = "np.abs(images - references).mean(): the absolute difference, averaged over everything."
    x = number_answer(answer, "the answer should be one number (a mean over all references).", hint)
    if isinstance(x, Verdict):
        return x
    if close(x, expected, abs_=1e-9):
        return right(f"Mean |error| {expected:.4f} over {len(imgs)} references, "
                     f"{expected * 255:.1f} of 255 grey levels per pixel and channel.")
    if close(x, float(d.mean()), abs_=1e-12):
        return wrong("that is the signed mean: errors of opposite sign cancel.", "take the absolute value first.")
    if close(x, float((d ** 2).mean()), abs_=1e-12):
        return wrong("that is the mean squared error.", "the absolute difference, not its square.")
    if close(x, float(np.abs(d).max())):
        return wrong("that is the largest error.", "average, not maximum.")
    if close(x, 255 * expected):
        return wrong("that is in grey levels (0-255).", "the images are in [0, 1]: do not scale.")
    return wrong(f"{x:.4g} is not the mean |error|.", hint)
