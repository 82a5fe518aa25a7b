"""mabook.inversion: references onto a trajectory, recorded, transported (and chapter 5's comparison, mabook.image_transport).

Checked against independent computations: the noising path and the fixed-point step against numpy,
the schedule against the one the pipeline itself sets, FLUX's 2x2 latent packing against a numpy
reshape, one Euler step of the pipeline against the velocity used for inversion; and on the
trained organism, inversion followed by regeneration gives the reference back. SANA (inverted on
Euler steps of its flow, also behind its real DPM-Solver) and PixArt-Sigma (DDPM noising: each
step at sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, against numpy) on tiny random-weight pipelines.
"""

import functools

import numpy as np
import pytest
import tokenizers as tk
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

import mabook
from mabook import image_transport, inversion, probe, sampling, text_transport, transport, world

torch.set_num_threads(1)
CAPTIONS = ["a large cyan square at the right on a white background",
            "a small yellow circle at the top left on a gray background",
            "a large red triangle at the bottom on a black background"]
TARGET = "a large blue circle at the center on a black background"
STEPS = 10


@pytest.fixture(scope="module")
def adapter(trained_organism):
    return trained_organism[1]


@pytest.fixture(scope="module")
def references():
    return np.stack([world.render(world.parse_caption(c)).image for c in CAPTIONS])  # (3, 32, 32, 3) uint8


@pytest.fixture(scope="module")
def inverted(adapter, references):
    return inversion.invert(adapter, references, num_inference_steps=STEPS)


def assert_no_hooks(adapter):
    for name, module in adapter.transformer.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            assert not getattr(module, attr), f"{name or 'transformer'}.{attr} not empty"


def transformer_inputs(adapter, run):
    """Each transformer call's hidden_states (a hook of the test's own, removed in finally)."""
    seen = []
    handle = adapter.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].detach().clone()), with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return seen, out


# ---------------------------------------------------------------------------------------------
# Reference images
# ---------------------------------------------------------------------------------------------


def test_references_pass_unchanged_in_every_accepted_form(adapter, references, tmp_path):
    expected = references.astype(np.float32) / 255
    path = tmp_path / "ref.png"
    Image.fromarray(references[0]).save(path)
    assert np.array_equal(inversion.check_references(adapter, references), expected)
    assert np.array_equal(inversion.check_references(adapter, list(references)), expected)
    assert np.array_equal(inversion.check_references(adapter, expected[1]), expected[1:2])
    assert np.array_equal(inversion.check_references(adapter, Image.fromarray(references[2])), expected[2:])
    assert np.array_equal(inversion.check_references(adapter, str(path)), expected[:1])


@pytest.mark.parametrize("image, message", [
    (np.zeros((48, 64, 3), np.uint8), r"reference image 0 is 64x48 \(width x height\); allowed: 32x32 .*resize=True"),
    (Image.new("RGBA", (32, 32)), r"reference image 0 has mode 'RGBA'; allowed: 'RGB' \(pass resize=True"),
    (Image.new("L", (32, 32)), r"has mode 'L'; allowed: 'RGB'"),
    (np.zeros((32, 32), np.uint8), r"has shape \(32, 32\); allowed: \(height, width, 3\) RGB"),
    (np.full((32, 32, 3), 2.0, np.float32), r"values in \[2, 2\]; float images must lie in \[0, 1\]"),
    (np.zeros((32, 32, 3), np.int64), r"dtype int64; allowed: uint8, or floats in \[0, 1\]"),
    ("no/such/file.png", r"no such file 'no/such/file.png'"),
    (3, r"must be a PIL image, a path or an \(H, W, 3\) array, got int"),
    ([], r"no reference images given"),
])
def test_bad_references_are_refused_naming_the_value_and_what_is_allowed(adapter, image, message):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        inversion.check_references(adapter, image)


def test_resize_converts_and_resizes_only_when_asked(adapter):
    big = Image.new("RGBA", (64, 48), (255, 0, 0, 255))
    out = inversion.check_references(adapter, big, resize=True)
    assert out.shape == (1, 32, 32, 3) and np.allclose(out[0], [1, 0, 0])
    gray = np.full((32, 32), 128, np.uint8)
    assert np.allclose(inversion.check_references(adapter, gray, resize=True), 128 / 255)


def test_the_organism_takes_its_own_size_only(adapter):
    with pytest.raises(ValueError, match="the organism generates 32x32 images only"):
        inversion.image_size(adapter, 64, 64)


# ---------------------------------------------------------------------------------------------
# Schedule, noising, the fixed-point step: against independent computations
# ---------------------------------------------------------------------------------------------


def test_schedule_is_the_one_the_pipeline_sets(adapter):
    timesteps, sigmas = sampling.schedule(adapter, STEPS)
    pipe = adapter.pipe
    pipe("a", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    assert torch.equal(timesteps, pipe.scheduler.timesteps) and torch.equal(sigmas, pipe.scheduler.sigmas)
    assert sigmas[0] == 1 and sigmas[-1] == 0


def test_noising_is_the_rectified_flow_path(adapter, references):
    traj = inversion.noise(adapter, references, seeds=[4, 5, 6], num_inference_steps=STEPS)
    x0 = references.astype(np.float64) / 255 * 2 - 1  # the organism's pixel space, (B, 32, 32, 3)
    clean = x0.reshape(3, 8, 4, 8, 4, 3).transpose(0, 1, 3, 5, 2, 4).reshape(3, 64, 48)  # 4x4 patches, row-major
    np.testing.assert_allclose(traj.clean.numpy(), clean, atol=1e-6)
    eps = torch.randn((1, 64, 48), generator=torch.Generator().manual_seed(5)).numpy()[0]
    np.testing.assert_array_equal(traj.noise[1].numpy(), eps)
    for sigma in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(sampling.at_level(traj.clean, traj.noise, sigma).numpy(),
                                   (1 - sigma) * clean + sigma * traj.noise.numpy(), atol=1e-6)


def test_noising_scheduler_walks_the_path_and_ends_on_the_reference(adapter, references):
    traj = inversion.noise(adapter, references[:2], seeds=[1, 2], num_inference_steps=4)
    sigmas = traj.sigmas.numpy().astype(np.float64)

    def run():
        with sampling.noising_scheduler(adapter, traj.clean, traj.noise):
            return adapter.pipe(["", ""], num_inference_steps=4, latents=traj.noise, output_type="np").images

    seen, images = transformer_inputs(adapter, run)
    assert isinstance(adapter.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert not isinstance(adapter.pipe.scheduler, sampling.NoisingScheduler)  # restored
    clean, eps = traj.clean.numpy(), traj.noise.numpy()
    for i, x in enumerate(seen):  # each call is [uncond; cond] of the same x_i
        expected = (1 - sigmas[i]) * clean + sigmas[i] * eps
        np.testing.assert_allclose(x[:2].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(x[2:].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(images, references[:2] / 255, atol=1e-5)


def test_fixed_point_step_solves_the_implicit_euler_equation():
    """For a linear velocity v(x) = A x + b, x_i = x_{i+1} - dt v(x_i) has the solution
    (I + dt A)^-1 (x_{i+1} - dt b), computed here with numpy."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6)) * 0.5
    b = rng.normal(size=6)
    x_next = rng.normal(size=(2, 1, 6))
    dt = -0.2
    v = lambda x, t: torch.from_numpy(x.numpy() @ A.T + b)  # noqa: E731
    solved, residual, calls = inversion._invert_step(v, torch.from_numpy(x_next), None, dt, 60, 0.5, 1e-12)
    expected = np.linalg.solve(np.eye(6) + dt * A, (x_next[:, 0] - dt * b).T).T
    np.testing.assert_allclose(solved.numpy()[:, 0], expected, atol=1e-9)
    forward = solved.numpy() + dt * (solved.numpy() @ A.T + b)  # the Euler step lands back on x_{i+1}
    np.testing.assert_allclose(forward, x_next, atol=1e-9)
    plain, r, n = inversion._invert_step(v, torch.from_numpy(x_next), None, dt, 0, 0.5, 1e-3)
    np.testing.assert_allclose(plain.numpy(), x_next - dt * (x_next @ A.T + b))
    assert n == 1 and torch.isnan(r).all() and calls <= 61


def test_a_solved_sample_does_not_depend_on_its_batch_mates():
    """A sample whose residual is under the tolerance keeps its solution while a slower batch-mate
    iterates: inverted alone or beside it, bit for bit (a big run's first pairs, re-derived on their
    own, must get the pairs' numbers). Per-sample linear velocities, computed row by row in numpy."""
    rng = np.random.default_rng(1)
    A = [rng.normal(size=(6, 6)) * s for s in (0.2, 2.0)]  # sample 0 converges in a few iterations, sample 1 slowly
    b = rng.normal(size=6)
    x_next = rng.normal(size=(2, 1, 6))

    def v(x, t):
        return torch.from_numpy(np.stack([x.numpy()[i] @ A[i].T + b for i in range(len(x))]))

    alone, r_alone, calls_alone = inversion._invert_step(v, torch.from_numpy(x_next[:1]), None, -0.2, 60, 0.3, 1e-3)
    both, r_both, calls_both = inversion._invert_step(v, torch.from_numpy(x_next), None, -0.2, 60, 0.3, 1e-3)
    assert calls_both > calls_alone  # the batch-mate kept the batch iterating
    np.testing.assert_array_equal(both.numpy()[:1], alone.numpy())
    np.testing.assert_array_equal(r_both.numpy()[:1], r_alone.numpy())


# ---------------------------------------------------------------------------------------------
# Inversion on the trained organism
# ---------------------------------------------------------------------------------------------


def test_inversion_then_regeneration_reconstructs_the_reference(adapter, references, inverted):
    """Stated error: mean |difference| below 0.01 and every attribute judged right; the plain
    inversion (no fixed-point iterations) is worse."""
    from mabook import judge

    images = inversion.regenerate(inverted)
    err = inversion.pixel_error(images, references / 255)
    assert (err["mae"] < 0.01).all(), err["mae"]
    assert all(judge.judge(im, c).all_correct for im, c in zip(images, CAPTIONS))
    assert np.nanmax(inverted.residuals) < 0.1 and inverted.evaluations >= 2 * STEPS
    plain = inversion.invert(adapter, references, num_inference_steps=STEPS, fixed_point_iterations=0)
    assert plain.evaluations == STEPS and np.isnan(plain.residuals).all()
    assert inversion.pixel_error(inversion.regenerate(plain), references / 255)["mae"].mean() > err["mae"].mean()


def test_record_from_latents_gives_targets_the_same_noise(adapter, inverted):
    """alpha = 0 is the target generated from the inverted noise; alpha = 1 with every channel and
    the conditioning is the reconstruction, bitwise."""
    rec = inversion.record(inverted, taps=[str(t) for t in probe.taps(adapter, ["img"])], channels="all",
                           captions=CAPTIONS)
    assert rec.units == [(c, 0) for c in CAPTIONS] and rec.conditioning and rec.latents is inverted.noise
    np.testing.assert_array_equal(rec.images, inversion.regenerate(inverted))
    targets = [TARGET] * 3
    zero = transport.transport(rec, targets, 0.0)
    np.testing.assert_array_equal(zero.images, inversion.regenerate(inverted, prompt=TARGET))
    np.testing.assert_array_equal(zero.images, zero.target)
    one = transport.transport(rec, targets, 1.0, target_images=zero.target, conditioning=True)
    np.testing.assert_array_equal(one.images, rec.images)
    assert_no_hooks(adapter)


def test_noised_record_holds_the_reference_and_its_channels(adapter, references):
    traj = inversion.noise(adapter, references[:1], seeds=3, num_inference_steps=3)
    tap = str(probe.taps(adapter, ["img"])[2])
    rec = inversion.record(traj, taps=[tap], channels=[66, 5])
    np.testing.assert_allclose(rec.images, references[:1] / 255, atol=1e-5)
    assert rec.units == [("", 3)] and set(rec.channels) == {tap}
    # step 1 of the record is the transformer at x_1 = (1 - sigma_1) x_N + sigma_1 eps: call it there directly
    timesteps, _ = sampling.schedule(adapter, 3)
    x1 = sampling.at_level(traj.clean, traj.noise, traj.sigmas[1])
    seen = {}

    def keep(t, step, hidden_states):
        seen[step] = hidden_states[..., [66, 5]].clone()

    with probe.hooks(adapter, keep, taps=[tap], cfg="both"):
        sampling.velocity(adapter, "", 1, 4.0)(x1, timesteps[1])
    torch.testing.assert_close(rec.dense(tap, 1, "cond", 0, 1), seen[0], rtol=1e-4, atol=1e-5)


def test_compare_rows_cover_every_trajectory_method_and_alpha(adapter):
    pairs = {"one_attribute": text_transport.pairs("one_attribute", 2, seed=0)}
    top = {t: [66, 103] for t in [str(t) for t in probe.taps(adapter, ["img"])]}
    methods = [text_transport.Method("top-2", channels=top), text_transport.Method("pixel blend", kind="pixel")]
    cmp = image_transport.compare(adapter, pairs, methods, alphas=(0.5, 1.0), num_inference_steps=2, fixed_point_iterations=2)
    keys = {(r["trajectory"], r["method"], r["alpha"]) for r in cmp.rows}
    for trajectory in inversion.METHODS:
        for name in ("top-2", "pixel blend"):
            assert {(trajectory, name, 0.5), (trajectory, name, 1.0)} <= keys
        assert {(trajectory, n, None) for n in ("reference image", "reconstruction", "target image")} <= keys
    assert len(cmp.rows) == 2 * 2 * (2 * 2 + 3) and cmp.references.shape == (2, 32, 32, 3)
    ref_rows = [r for r in cmp.rows if r["method"] == "reference image"]
    assert all(r["took_source"] == 1.0 for r in ref_rows)  # the world's own render shows the reference's attributes
    blend = cmp.images[("noise", "pixel blend", None, 1.0)]
    np.testing.assert_allclose(blend, cmp.references, atol=1e-6)
    with pytest.raises(ValueError, match="a reference has no text to blend"):
        image_transport.compare(adapter, pairs, [text_transport.Method("text", kind="embedding")])
    with pytest.raises(ValueError, match=r"unknown trajectories \['sideways'\]"):
        image_transport.compare(adapter, pairs, methods, trajectories=("sideways",))


# ---------------------------------------------------------------------------------------------
# Bad input and hooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(fixed_point_iterations=-1), "fixed_point_iterations must be an int >= 0, got -1"),
    (dict(relaxation=0), r"relaxation must be a number in \(0, 1\], got 0"),
    (dict(tolerance=-1.0), "tolerance must be a number >= 0"),
    (dict(num_inference_steps=0), "num_inference_steps must be an int >= 1, got 0"),
    (dict(prompt=None), r"prompt must be a str \(''"),
    (dict(strength=0.5), r"unknown pipeline argument\(s\) \['strength'\]; allowed: \['height', 'width'"),
])
def test_bad_inversion_arguments_are_refused(adapter, references, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        inversion.invert(adapter, references[:1], **kwargs)


def test_bad_noising_seeds_and_captions_are_refused(adapter, references, inverted):
    with pytest.raises(ValueError, match=r"seeds must be one non-negative int per reference \(3\)"):
        inversion.noise(adapter, references, seeds=[1, 2])
    with pytest.raises(ValueError, match=r"captions must be a list of one str per reference \(3\)"):
        inversion.record(inverted, captions=CAPTIONS[:1])


def test_empty_mask_and_alpha_outside_0_1_are_clear_errors(adapter, inverted):
    rec = inversion.record(inverted, taps=[str(probe.taps(adapter, ["img"])[0])], channels=[66], steps=[0])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        transport.transport(rec, [TARGET] * 3, 1.5)
    with pytest.raises(ValueError, match=r"mask is empty for unit\(s\) \[1\]"):
        mask = torch.ones(3, 64, dtype=torch.bool)
        mask[1] = False
        transport.transport(rec, [TARGET] * 3, 0.5, mask=mask)
    with pytest.raises(ValueError, match=r"latents has 2 rows; expected one per unit \(3\)"):
        transport.record(adapter, [""] * 3, taps=[str(probe.taps(adapter, ["img"])[0])], channels=[66],
                         num_inference_steps=STEPS, latents=inverted.noise[:2])
    with pytest.raises(ValueError, match="every prompt must be a non-empty str"):  # "" only with latents
        transport.record(adapter, [""], num_inference_steps=1)


def test_no_hook_survives_an_exception_and_the_scheduler_is_restored(adapter, references):
    traj = inversion.noise(adapter, references[:2], seeds=[1, 2], num_inference_steps=2)
    with pytest.raises(ValueError, match="does not start at the noised references 0..1"):
        with sampling.noising_scheduler(adapter, traj.clean, traj.noise):  # latents not where the path starts
            transport.record(adapter, ["", ""], channels=[66], num_inference_steps=2, latents=traj.noise.flip(0))
    assert type(adapter.pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert_no_hooks(adapter)


# ---------------------------------------------------------------------------------------------
# Real-model path: a tiny random-weight FLUX pipeline (VAE, 2x2 packing, resolution shift)
# ---------------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[EOS]", "[BOS]", "a", "red", "circle"]


def tiny_flux() -> FluxPipeline:
    torch.manual_seed(0)
    t = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok = lambda: PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]",  # noqa: E731
                                          eos_token="[EOS]", bos_token="[BOS]", model_max_length=8)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, pad_token_id=0,
                                        bos_token_id=3, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0))
    # two VAE blocks: vae_scale_factor 2, so a 16x16 image is an 8x8 latent, packed into 4x4 tokens
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, shift_factor=0.1, scaling_factor=0.5)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip,
                        tokenizer=tok(), text_encoder_2=t5, tokenizer_2=tok(),
                        transformer=FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                           pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


FLUX_CALL = dict(height=16, width=16, max_sequence_length=8)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux")
    tiny_flux().save_pretrained(path)
    pipe, adapter = mabook.load(str(path))
    pipe.set_progress_bar_config(disable=True)
    return adapter


def test_flux_reference_goes_through_the_vae_and_2x2_packing(flux):
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 16, 3)).astype(np.float32)
    latents = sampling.encode(flux, images)
    vae = flux.pipe.vae
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode().numpy()
    z = (z - 0.1) * 0.5
    B, C, h, w = z.shape
    packed = z.reshape(B, C, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(B, h // 2 * w // 2, C * 4)
    assert (h, w) == (8, 8) and latents.shape == (2, 16, 16)
    np.testing.assert_allclose(latents.numpy(), packed, atol=1e-6)
    with pytest.raises(ValueError, match="is 8x8 .*allowed: 16x16"):
        inversion.check_references(flux, np.zeros((8, 8, 3), np.float32), height=16, width=16)
    with pytest.raises(ValueError, match="multiples of 4 pixels"):
        inversion.image_size(flux, 18, 16)


def test_flux_schedule_and_velocity_are_the_pipelines(flux):
    pipe = flux.pipe
    timesteps, sigmas = sampling.schedule(flux, 3, 16, 16)
    z = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0))
    stepped = pipe("a red circle", num_inference_steps=3, latents=z, output_type="latent", **FLUX_CALL).images
    assert torch.equal(sigmas, pipe.scheduler.sigmas) and sigmas[1] != 2 / 3  # the resolution shift is applied
    v = sampling.velocity(flux, "a red circle", 1, sampling.default_guidance_scale(flux), 16, 16, 8)
    x = z
    for i in range(3):  # the pipeline's Euler loop, rebuilt from the inversion's velocity
        x = x + (sigmas[i + 1] - sigmas[i]) * v(x, timesteps[i])
    torch.testing.assert_close(stepped, x, rtol=1e-5, atol=1e-5)


def test_flux_inversion_reconstructs_its_latents_and_noising_its_image(flux):
    images = np.random.default_rng(1).random((1, 16, 16, 3)).astype(np.float32)
    traj = inversion.invert(flux, images, prompt="a red circle", num_inference_steps=4, fixed_point_iterations=50,
                            relaxation=1.0, tolerance=1e-7, **FLUX_CALL)
    assert np.nanmax(traj.residuals) < 1e-6
    back = flux.pipe("a red circle", num_inference_steps=4, latents=traj.noise, output_type="latent", **FLUX_CALL).images
    torch.testing.assert_close(back, traj.clean, rtol=1e-4, atol=1e-4)
    noised = inversion.noise(flux, images, seeds=0, num_inference_steps=4, **FLUX_CALL)
    rec = inversion.record(noised, taps=[str(probe.taps(flux, ["img"])[0])], channels=[0, 3])
    with torch.no_grad():
        decoded = flux.pipe.vae.decode(flux.pipe._unpack_latents(noised.clean, 16, 16, 2) / 0.5 + 0.1).sample
    expected = flux.pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(rec.images, expected, atol=1e-5)
    out = transport.transport(rec, ["a red circle"], 1.0, **FLUX_CALL)
    assert out.images.shape == (1, 16, 16, 3)
    assert_no_hooks(flux)


def test_a_family_that_cannot_invert_is_named_with_what_works(flux):
    from mabook.models import FAMILIES, Adapter

    pixart = Adapter(FAMILIES["pixart"], flux.transformer, flux.pipe)
    with pytest.raises(ValueError, match=r"^pixart cannot be inverted: .*--trajectory noise.*invertible families: "
                                         r"\['organism', 'flux', 'sd3', 'sana'\]$"):
        inversion.invert(pixart, np.zeros((16, 16, 3), np.float32))
    assert inversion.default_method(pixart) == "noise" and inversion.default_method(flux) == "invert"


def test_noising_path_is_one_the_model_would_not_follow(adapter, references, inverted):
    noised = inversion.noise(adapter, references, seeds=[1, 2, 3], num_inference_steps=STEPS)
    off = inversion.path_residuals(noised)
    assert off.shape == (STEPS, 3) and (off > 0).all()
    assert inversion.path_residuals(inverted) is inverted.residuals
    assert np.median(off) > 3 * np.nanmedian(inverted.residuals)


# ---------------------------------------------------------------------------------------------
# SD3: unpacked latents, the transformer takes the scheduler's timestep as is
# ---------------------------------------------------------------------------------------------


def test_sd3_encode_schedule_and_velocity_are_the_pipelines(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    t = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    t.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    tok = lambda: PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]",  # noqa: E731
                                          eos_token="[EOS]", bos_token="[BOS]", model_max_length=8)
    clip = lambda: CLIPTextModelWithProjection(CLIPTextConfig(  # noqa: E731
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, pad_token_id=0, bos_token_id=3, eos_token_id=2, projection_dim=16))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, shift_factor=0.2, scaling_factor=1.5)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip(), tokenizer=tok(),
        text_encoder_2=clip(), tokenizer_2=tok(),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, decoder_start_token_id=0)), tokenizer_3=tok(),
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                          pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    adapter = mabook.adapter_for(pipe)
    call = dict(height=8, width=8, max_sequence_length=8)
    images = np.random.default_rng(2).random((1, 8, 8, 3)).astype(np.float32)
    latents = sampling.encode(adapter, images)
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(latents, (z - 0.2) * 1.5)  # unpacked: (1, 4, 8, 8)
    timesteps, sigmas = sampling.schedule(adapter, 3, 8, 8)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe("a red circle", num_inference_steps=3, latents=x0, output_type="latent", **call).images
    assert torch.equal(sigmas, pipe.scheduler.sigmas)
    v = sampling.velocity(adapter, "a red circle", 1, sampling.default_guidance_scale(adapter), 8, 8, 8)
    x = x0
    for i in range(3):  # classifier-free guidance batch included, as the pipeline makes it
        x = x + (sigmas[i + 1] - sigmas[i]) * v(x, timesteps[i])
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SANA (flow matching, sampled by DPM-Solver: the trajectory runs on Euler steps of its flow) and
# PixArt-Sigma (DDPM: noising only), on tiny random-weight pipelines (tests/test_models.py)
# ---------------------------------------------------------------------------------------------

SANA_CALL = dict(height=32, width=32, max_sequence_length=8)  # SANA needs multiples of 32 px: 16x16 latent pixels
PIXART_CALL = dict(max_sequence_length=8)  # 8x8 px, one VAE block: 4x4 tokens of 2x2 latent pixels


@pytest.fixture(scope="module")
def tiny():
    """family -> adapter: "sana" (FlowMatchEulerDiscreteScheduler, as tests/test_models builds it),
    "sana-dpm" (the same modules behind SANA's real scheduler: DPM-Solver++ 2M on flow sigmas,
    flow_shift 3) and "pixart" (DPMSolverMultistepScheduler, epsilon). Their resolution binning
    knows real sizes only: off."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, SanaPipeline
    from test_models import built

    with pytest.MonkeyPatch.context() as mp:
        for cls in (PixArtSigmaPipeline, SanaPipeline):
            mp.setattr(cls, "__call__", functools.partialmethod(cls.__call__, use_resolution_binning=False))
        sana, _ = built("sana")
        dpm = SanaPipeline(**{**sana.components, "scheduler": DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)})
        pixart, _ = built("pixart")
        out = {}
        for name, pipe in (("sana", sana), ("sana-dpm", dpm), ("pixart", pixart)):
            pipe.set_progress_bar_config(disable=True)
            out[name] = mabook.adapter_for(pipe)
        yield out


def pixart_inputs(adapter, run):
    """Each transformer call's (hidden_states, timestep) -- PixArt's pipeline passes hidden_states positionally."""
    seen = []

    def keep(m, args, kwargs):
        seen.append(((args[0] if args else kwargs["hidden_states"]).detach().clone(), kwargs["timestep"].detach().clone()))

    handle = adapter.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        out = run()
    finally:
        handle.remove()
    return seen, out


def decoded(adapter, latents):
    """The pipeline's own decode of (unpacked, scaled) latents: what a generation ending on them shows."""
    vae = adapter.pipe.vae
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample
    return adapter.pipe.image_processor.postprocess(images, output_type="np")


@pytest.mark.parametrize("name", ["sana", "sana-dpm"])
def test_sana_velocity_is_the_pipelines_euler_step(tiny, name):
    """The pipeline's loop (guidance 4.5 and the complex human instruction, SANA's defaults: a
    guidance batch even for "") rebuilt from the inversion's velocity, on the trajectory's scheduler."""
    adapter = tiny[name]
    sampler, which = sampling.sampler(adapter)
    timesteps, sigmas = sampling.schedule(adapter, 3, 32, 32)
    if name == "sana-dpm":  # Euler on SANA's flow: FlowMatchEulerDiscreteScheduler(shift=3), sigma_0 = 1
        assert sampler is not adapter and sampler.transformer is adapter.transformer and sampler.pipe.vae is adapter.pipe.vae
        assert which == "FlowMatchEulerDiscreteScheduler(shift=3) in place of the pipeline's DPMSolverMultistepScheduler"
        u = np.linspace(1.0, 3 * 1e-3 / (1 + 2 * 1e-3), 3)  # the Euler scheduler's shifted sigma_min, shifted again
        np.testing.assert_allclose(sigmas.numpy(), np.append(3 * u / (1 + 2 * u), 0.0), rtol=1e-6)
    else:
        assert sampler is adapter and which == "FlowMatchEulerDiscreteScheduler"
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for prompt in ("", "a red circle"):
        out = sampler.pipe(prompt, num_inference_steps=3, latents=z, output_type="latent", **SANA_CALL).images
        v = sampling.velocity(sampler, prompt, 1, sampling.default_guidance_scale(sampler), 32, 32, 8)
        x = z
        for i in range(3):
            x = x + (sigmas[i + 1] - sigmas[i]) * v(x, timesteps[i])
        torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sana", "sana-dpm"])
def test_sana_inversion_then_regeneration_reconstructs_the_reference(tiny, name):
    """FLUX's tolerances: forward residuals below 1e-6, the regenerated latents within 1e-4 of the
    reference's, its image the reference through the DC-AE. Guidance 1: the random-weight model's
    guided velocity (4.5) is not a contraction at high noise, so the fixed point stalls near 1e-2
    there (the residuals say so)."""
    adapter = tiny[name]
    scheduler = adapter.pipe.scheduler
    images = np.random.default_rng(1).random((2, 32, 32, 3)).astype(np.float32)
    traj = inversion.invert(adapter, images, prompt="a red circle", num_inference_steps=4, fixed_point_iterations=50,
                            relaxation=1.0, tolerance=1e-7, guidance_scale=1.0, **SANA_CALL)
    assert traj.noise.shape == traj.clean.shape == (2, 4, 16, 16) and np.nanmax(traj.residuals) < 1e-6
    back = traj.adapter.pipe(["a red circle"] * 2, num_inference_steps=4, latents=traj.noise, output_type="latent",
                             guidance_scale=1.0, **SANA_CALL).images
    torch.testing.assert_close(back, traj.clean, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inversion.regenerate(traj), decoded(adapter, traj.clean), atol=1e-4)
    assert adapter.pipe.scheduler is scheduler  # the loaded pipeline is left as it was
    with torch.no_grad():  # the DC-AE's latents, scaled: no posterior, no shift
        z = adapter.pipe.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1).latent
    torch.testing.assert_close(traj.clean, z * 0.41)


@pytest.mark.parametrize("name", ["sana-dpm", "pixart"])
def test_noising_puts_step_i_at_the_schedulers_level_of_its_timestep(tiny, name):
    """Each transformer call's input, against numpy: SANA's flow (1 - s) x_0 + s eps with
    s = t / 1000 for the timestep t it is given; PixArt's DDPM sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
    abar from the scheduler's linear betas. The generation ends on the reference's latents."""
    adapter = tiny[name]
    call = SANA_CALL if name.startswith("sana") else PIXART_CALL
    size = 32 if name.startswith("sana") else 8
    images = np.random.default_rng(2).random((2, size, size, 3)).astype(np.float32)
    traj = inversion.noise(adapter, images, seeds=[4, 5], num_inference_steps=4, **call)
    clean, eps = traj.clean.numpy().astype(np.float64), traj.eps.numpy().astype(np.float64)
    np.testing.assert_array_equal(traj.eps[1:].numpy(), torch.randn((1, *clean.shape[1:]),
                                                                    generator=torch.Generator().manual_seed(5)).numpy())
    tap = str(probe.taps(adapter, ["img"])[0])
    seen, rec = pixart_inputs(traj.adapter, lambda: inversion.record(traj, taps=[tap], channels=[0, 1]))
    assert len(seen) == 4
    config = adapter.pipe.scheduler.config
    if name == "pixart":
        assert config.beta_schedule == "linear" and config.prediction_type == "epsilon"
        abar = np.cumprod(1 - np.linspace(config.beta_start, config.beta_end, config.num_train_timesteps))
    for i, (x, t) in enumerate(seen):  # each call is [uncond; cond] of the same x_i
        t = float(t.flatten()[0])
        if name == "pixart":
            assert t == int(traj.timesteps[i])
            a, b = np.sqrt(abar[int(t)]), np.sqrt(1 - abar[int(t)])
        else:
            b = t / 1000
            a = 1 - b
        expected = a * clean + b * eps
        np.testing.assert_allclose(x[:2].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(x[2:].numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(traj.point(i).numpy(), expected, atol=1e-5)
    if name == "pixart":  # the generation starts at x_0, not at eps (abar_999 > 0)
        assert traj.sampler == "DPMSolverMultistepScheduler" and float(traj.sigmas[0]) < 1
        torch.testing.assert_close(traj.noise, traj.point(0))
        assert not torch.equal(traj.noise, traj.eps)
    else:
        assert torch.equal(traj.noise, traj.eps)
    np.testing.assert_allclose(rec.images, decoded(adapter, traj.clean), atol=1e-5)
    assert_no_hooks(adapter)
    assert not isinstance(traj.adapter.pipe.scheduler, sampling.Noising)  # restored


@pytest.mark.parametrize("name, method", [("sana-dpm", "invert"), ("sana-dpm", "noise"), ("pixart", "noise")])
def test_transport_from_a_reference_at_alpha_0_is_the_target_bitwise(tiny, name, method):
    """alpha = 0 is the target generated from the trajectory's noise with the trajectory's scheduler
    (SANA: the Euler twin, through the record's adapter); on SANA's inversion, alpha = 1 with every
    channel of every block is the reconstruction (the model output is the source's at every step, and
    the same Euler steps follow; noising's record walks the path instead, whatever the model says)."""
    adapter = tiny[name]
    call = SANA_CALL if name.startswith("sana") else PIXART_CALL
    size = 32 if name.startswith("sana") else 8
    images = np.random.default_rng(3).random((2, size, size, 3)).astype(np.float32)
    traj = (inversion.invert(adapter, images, num_inference_steps=3, fixed_point_iterations=5, **call) if method == "invert"
            else inversion.noise(adapter, images, seeds=[1, 2], num_inference_steps=3, **call))
    taps = [str(t) for t in probe.taps(adapter, ["img"])]
    with probe.collect(adapter, taps=taps[:1], cfg="both") as seen:  # the loaded adapter's probe sees the twin's steps
        rec = inversion.record(traj, taps=taps, channels="all", conditioning=False, max_bytes=10**9)
    assert rec.adapter is traj.adapter and seen.stats.steps == [0, 1, 2]
    assert all(seen.stats.counts(taps[0], s)["samples"] == 4 for s in range(3))  # 2 references x [uncond; cond]
    target = ["a red circle"] * 2
    zero = transport.transport(rec, target, 0.0)
    np.testing.assert_array_equal(zero.images, zero.target)
    np.testing.assert_array_equal(zero.target, inversion.regenerate(traj, prompt="a red circle"))
    if method == "invert":
        one = transport.transport(rec, target, 1.0, target_images=zero.target)
        np.testing.assert_allclose(one.images, rec.images, atol=1e-6)
    assert_no_hooks(adapter)


def test_sana_and_pixart_bad_values_are_refused_in_one_line(tiny, flux):
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    images = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match=r"^height and width must be multiples of 32 pixels \(one token, and "
                                         r"SanaPipeline needs multiples of 32\), got 48x32$"):
        inversion.image_size(tiny["sana"], 48, 32)
    eps_sana = mabook.adapter_for(SanaPipeline(**{**tiny["sana"].pipe.components,
                                                  "scheduler": DPMSolverMultistepScheduler()}))
    with pytest.raises(ValueError, match=r"^a sana trajectory needs the flow-matching Euler scheduler; this pipeline has "
                                         r"DPMSolverMultistepScheduler; allowed: .*use_flow_sigmas"):
        inversion.invert(eps_sana, images, **SANA_CALL)
    noised = inversion.noise(tiny["pixart"], np.zeros((1, 8, 8, 3), np.float32), seeds=0, num_inference_steps=2, **PIXART_CALL)
    with pytest.raises(ValueError, match=r"^path_residuals measures the flow-matching Euler step; pixart predicts DDPM"):
        inversion.path_residuals(noised)
    with pytest.raises(ValueError, match=r"step must be an int in 0\.\.2, got 3"):
        noised.point(3)
    with pytest.raises(ValueError, match=r"^pixart cannot be inverted: .*--trajectory noise"):
        inversion.invert(tiny["pixart"], np.zeros((1, 8, 8, 3), np.float32))
    assert inversion.default_method(tiny["sana-dpm"]) == "invert"
    with pytest.raises(ValueError, match=r"unknown path 'sideways'; allowed: 'flow', 'ddpm'"):
        sampling.level(noised.clean, noised.eps, 0.5, "sideways")


def test_a_bfloat16_pixart_walks_a_float32_noised_trajectory_at_the_size_asked():
    """A Colab PixArt-Sigma runs in bfloat16; the noised trajectory is float32 (the references'
    latents). Its record and regeneration used to hand PixArt's pipeline the float32 latents uncast
    ("Input type (float) and bias type (BFloat16)"). And PixArt snaps a size to its training
    resolutions unless told not to (a tiny model has none): every mabook call asks for the size given
    (`Family.call_defaults`), without the caller naming `use_resolution_binning`."""
    from test_models import built

    pipe, _ = built("pixart")
    pipe.set_progress_bar_config(disable=True)
    adapter = mabook.adapter_for(pipe.to(torch.bfloat16))
    images = adapter.generate([("a red circle", 0)], 2, height=8, width=8, max_sequence_length=8)
    assert images.shape == (1, 8, 8, 3) and np.isfinite(images).all()
    traj = inversion.noise(adapter, images, seeds=0, num_inference_steps=2, height=8, width=8)
    assert traj.clean.dtype == torch.float32
    rec = inversion.record(traj, taps=[str(probe.taps(adapter, ["img"])[0])], channels=[0, 1])
    again = inversion.regenerate(traj, prompt="a red circle")
    assert rec.images.shape == again.shape == (1, 8, 8, 3) and np.isfinite(again).all()
    assert adapter.call_kwargs({"height": 8})["use_resolution_binning"] is False
    assert adapter.call_kwargs({"use_resolution_binning": True})["use_resolution_binning"] is True  # the caller's wins
    flux_pipe, _ = built("flux")
    assert "use_resolution_binning" not in mabook.adapter_for(flux_pipe).call_kwargs({})
