"""Offload and quantized weights: the probe, edits and attention processors survive accelerate's hooks and
a GGUF-quantized transformer, and give the plain model's numbers (issue 23).

Offload (accelerate). `pipe.enable_model_cpu_offload(device="cpu")` is diffusers' model offload with
the CPU as execution device: every component's forward is wrapped in accelerate's hook (`_hf_hook`,
taken off and put back by `maybe_free_model_hooks` at the end of each pipeline call) though nothing
moves, so a CPU-only machine runs the real hook machinery. `accelerate.cpu_offload(transformer, cpu)`
is what `enable_sequential_cpu_offload` does to each component: the weights wait on the meta device
and each layer's are brought in while it runs. (The pipeline's own `enable_sequential_cpu_offload`
fails on CPU inside CLIP's text encoder -- transformers 5.23, accelerate 1.15 -- before any mabook
code runs, so here the transformer is offloaded alone.) The reference is the same tiny pipeline
without hooks, same seed: statistics, edited images, attention masses and intervened images agree
within rtol 1e-5 (bit-identical today: the same kernels on the same tensors).

Quantized weights (GGUF). diffusers' GGUF quantizer runs on CPU (its CUDA kernels are opt-in), reads
the format real quantized FLUX checkpoints are shared in (`from_single_file`), and needs only the
small `gguf` package. A tiny FLUX at width 32 (Q8_0 quantizes blocks of 32 along a weight row) is
written to a GGUF file -- every weight whose rows are a multiple of 32 long as Q8_0 (one int8 per
weight, one float16 scale d per block of 32), the rest (biases, norms, the 16-wide input layers) as
F32, under diffusers' parameter names -- and loaded with `mabook.load(directory, gguf=file)`. Three
models are compared:

* the quantized transformer: its `GGUFLinear` layers keep the uint8 blocks and dequantize at each call;
* the dequantized-weight float model: the same pipeline with every Q8_0 weight decoded by the gguf
  package's reference decoder (float32, d * q: exact) and rounded once to float16, since diffusers
  forms that product in float16 -- both are the correctly rounded product, so the weights are the
  same numbers (asserted), and statistics, edits and attention agree to float32 summation order:
  rtol 1e-5;
* the original float model. Q8_0 rounds each weight to a multiple of d = (the block's largest |w|) / 127,
  an error of at most d / 2; storing d in float16 moves d * q by at most 127 * 2^-11 * d, and the
  float16 product by as much again: |dw| <= d * (1/2 + 2 * 127 * 2^-11), asserted for every weight.
  A layer's output then moves by at most sum_i |x_i| |dw_ji| (asserted at one layer, on its real
  inputs). Through the whole network that bound is far from sharp, so there the test asks that the
  massive channels (three planted in the image stream) rank the same at every image tap.
"""

import functools

import accelerate
import gguf
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.quantizers.gguf.utils import GGUFLinear, dequantize_gguf_tensor
from test_models import TEXT_LEN, built, tiny_clip, tiny_t5, tiny_tokenizer, tiny_vae

import mabook
from mabook import attention, models, probe
from mabook.attention import KeyIntervention
from mabook.statistics import STATISTICS

torch.set_num_threads(1)
RTOL = 1e-5  # same computation, another float32 summation order at most
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q8_0_BOUND = 0.5 + 2 * 127 * 2.0**-11  # largest |w - dequantized w| in units of the block's d (module docstring)
MASSIVE = {5: 40.0, 17: 20.0, 26: 10.0}  # planted in the image stream of the GGUF model: channel -> bias


def generate(pipe, call):
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                **call).images


def torch_hooks(transformer) -> int:
    """Forward (pre-)hooks registered with PyTorch on the transformer's modules (accelerate's are not:
    it replaces `forward` and keeps its hook in `_hf_hook`)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in transformer.modules())


def every_verb(pipe, call) -> dict:
    """Plain image, statistics (every tap), images under two channel edits, attention masses and the
    image under a sink intervention; checks that each context leaves no hook and the original processors."""
    adapter = mabook.adapter_for(pipe)
    processors = {p: m.processor for p, m in adapter.attention_modules().items()}
    hooks = torch_hooks(adapter.transformer)
    img = [str(t) for t in probe.taps(adapter, ["img"])]
    out = {}
    with probe.collect(adapter) as run:
        out["image"] = generate(pipe, call)
    out["stats"] = run.stats
    edits = [probe.Edit(img[-1], [1, 3], "zero"), probe.Edit(img[0], [2], "scale", value=4.0)]
    with probe.edit(adapter, edits):
        out["edited"] = generate(pipe, call)
    with attention.capture(adapter) as cap:
        generate(pipe, call)
    out["mass"] = {key: cap.mass(*key) for key in cap.captured}
    with attention.intervene(adapter, KeyIntervention("sink", k=1)):
        out["intervened"] = generate(pipe, call)
    assert torch_hooks(adapter.transformer) == hooks
    assert all(m.processor is processors[p] for p, m in adapter.attention_modules().items())
    return out


def assert_same(got: dict, want: dict, rtol=RTOL):
    for key in ("image", "edited", "intervened"):
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=rtol, msg=key)
    assert [str(t) for t in got["stats"].taps] == [str(t) for t in want["stats"].taps]
    for tap in want["stats"].taps:
        for step in want["stats"].steps:
            for name in STATISTICS:
                w = want["stats"].get(name, tap, step)
                torch.testing.assert_close(got["stats"].get(name, tap, step), w, rtol=rtol, atol=rtol * float(w.abs().max()),
                                           msg=f"{name} at {tap} step {step}")
    assert got["mass"].keys() == want["mass"].keys()
    for key, w in want["mass"].items():
        np.testing.assert_allclose(w.sum(-1).numpy(), 1, atol=1e-5)  # each head's mass over the keys
        torch.testing.assert_close(got["mass"][key], w, rtol=rtol, atol=1e-7, msg=str(key))


@functools.lru_cache(maxsize=None)
def plain(family):
    """every_verb on the tiny pipeline without any offload hook (built once per family)."""
    pipe, call = built(family)
    pipe.set_progress_bar_config(disable=True)
    out = every_verb(pipe, call)
    assert not torch.equal(out["edited"], out["image"]) and not torch.equal(out["intervened"], out["image"])
    return out


# -- offload -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])  # FLUX: no guidance batch; SD3: [uncond; cond] in one call
def test_model_cpu_offload_gives_the_plain_statistics_edits_and_attention(family):
    pipe, call = built(family)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook") and hasattr(pipe.text_encoder, "_hf_hook")
    assert_same(every_verb(pipe, call), plain(family))
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's hooks are left as they were


def test_transformer_offloaded_layer_by_layer_gives_the_plain_statistics_edits_and_attention():
    pipe, call = built("flux")
    pipe.set_progress_bar_config(disable=True)
    accelerate.cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.device.type == "meta"  # weights wait off the model
    assert_same(every_verb(pipe, call), plain("flux"))


def test_an_error_mid_generation_under_offload_takes_every_hook_and_processor_off():
    pipe, call = built("flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    adapter = mabook.adapter_for(pipe)
    processors = {p: m.processor for p, m in adapter.attention_modules().items()}

    def stop(tap, step, hidden_states):
        if step == 1:
            raise RuntimeError("stop at step 1")

    with pytest.raises(RuntimeError, match="stop at step 1"):
        with attention.capture(adapter), probe.collect(adapter), probe.hooks(adapter, stop):
            generate(pipe, call)
    assert torch_hooks(adapter.transformer) == 0
    assert all(m.processor is processors[p] for p, m in adapter.attention_modules().items())
    assert hasattr(pipe.transformer, "_hf_hook")
    torch.testing.assert_close(generate(pipe, call), plain("flux")["image"], rtol=RTOL, atol=RTOL)


# -- quantized weights: GGUF -------------------------------------------------------------------------------------------


def tiny_flux32():
    """The tiny FLUX pipeline of test_models at width 32 (2 heads of 16), so Q8_0's blocks of 32 fit its rows."""
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                                         axes_dims_rope=(4, 4, 8))
    with torch.no_grad():  # massive activations: a few image-stream channels far above the rest
        for channel, value in MASSIVE.items():
            transformer.x_embedder.bias[channel] = value
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
                        text_encoder=tiny_clip(False), tokenizer=tiny_tokenizer(), text_encoder_2=tiny_t5(),
                        tokenizer_2=tiny_tokenizer(), transformer=transformer)
    return pipe, dict(height=8, width=8, guidance_scale=1.0, max_sequence_length=TEXT_LEN)


def write_gguf(state_dict: dict, path):
    """Every weight with rows a multiple of 32 long as Q8_0 (gguf's quantizer, bit-exact with ggml's), the rest F32."""
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, tensor in state_dict.items():
        w = tensor.detach().float().numpy()
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(w, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def decoded(path) -> dict:
    """name -> (float32 weights as the gguf package decodes them: d * q, exact; quantization type)."""
    return {t.name: (torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)), t.tensor_type)
            for t in gguf.GGUFReader(str(path)).tensors}


class GGUFModel:
    """The directory of the tiny pipeline, its transformer's GGUF file and its original float weights."""

    def __init__(self, root):
        torch.manual_seed(0)
        pipe, self.call = tiny_flux32()
        self.dir, self.file = root / "pipe", root / "transformer-Q8_0.gguf"
        pipe.save_pretrained(self.dir)
        self.original = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
        write_gguf(self.original, self.file)

    def load(self, **kwargs):
        pipe, adapter = mabook.load(self.dir, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe, adapter


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return GGUFModel(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def quantized(model):
    return model.load(gguf=model.file)


@pytest.fixture(scope="module")
def dequantized(model):
    """The float pipeline with the GGUF file's weights decoded independently (module docstring)."""
    pipe, adapter = model.load()
    weights = {name: w.half().float() if kind == Q8_0 else w for name, (w, kind) in decoded(model.file).items()}
    pipe.transformer.load_state_dict(weights, strict=True)
    return pipe, adapter


def test_gguf_transformer_keeps_q8_0_weights_within_the_quantization_bound(model, quantized):
    pipe, adapter = quantized
    assert isinstance(adapter.transformer, FluxTransformer2DModel) and adapter.family.name == "flux"
    files = decoded(model.file)
    q8 = {name for name, (_, kind) in files.items() if kind == Q8_0}
    layers = {f"{name}.weight": m for name, m in adapter.transformer.named_modules() if isinstance(m, GGUFLinear)}
    assert len(q8) >= 20 and set(layers) == q8  # every Q8_0 tensor is a quantized linear layer, and only those
    for name in sorted(q8):
        weight = layers[name].weight
        assert weight.dtype == torch.uint8 and weight.quant_type == Q8_0  # kept quantized: 34 bytes per 32 weights
        assert weight.numel() == files[name][0].numel() * 34 // 32
        reference = files[name][0]
        assert torch.equal(dequantize_gguf_tensor(weight).float(), reference.half().float()), name  # the float16 product
        w = model.original[name].float()
        d = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127  # the block's scale
        error = (w.reshape(-1, 32) - reference.half().float().reshape(-1, 32)).abs()
        assert (error <= d * Q8_0_BOUND * (1 + 1e-4)).all(), name
        assert error.max() > 0, name  # really quantized


def test_quantized_layer_output_is_within_the_q8_0_bound_of_the_float_layer(model, quantized):
    pipe, adapter = quantized
    layer = adapter.transformer.single_transformer_blocks[0].proj_mlp  # 32 -> 128, inside the model's forward
    seen = []

    def keep(module, args, output):  # the first call's input and output
        seen.append((args[0].detach().double(), output.detach().double()))

    handle = layer.register_forward_hook(keep)
    try:
        generate(pipe, model.call)
    finally:
        handle.remove()
    x, y = seen[0]
    w, b = (model.original[f"single_transformer_blocks.0.proj_mlp.{p}"].double() for p in ("weight", "bias"))
    exact = x @ w.T + b  # the float layer on the same inputs
    d = (w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127).expand(-1, 32).reshape(w.shape)
    bound = x.abs() @ (d * Q8_0_BOUND).T + 1e-5 * (x.abs() @ w.abs().T)  # + float32 rounding of the layer itself
    assert ((y - exact).abs() <= bound).all()
    assert (y - exact).abs().max() > 1e-4  # the quantization shows


def test_quantized_model_gives_the_dequantized_float_models_statistics_edits_and_attention(model, quantized, dequantized):
    got, want = every_verb(quantized[0], model.call), every_verb(dequantized[0], model.call)
    assert_same(got, want)
    assert not torch.equal(got["edited"], got["image"]) and not torch.equal(got["intervened"], got["image"])


def test_quantized_model_ranks_the_massive_channels_as_the_original_float_model(model, quantized):
    original, _ = model.load()
    runs = []
    for pipe, adapter in (quantized, (original, mabook.adapter_for(original))):
        with probe.collect(adapter, probe.taps(adapter, ["img"])) as run:
            generate(pipe, model.call)
        runs.append(run.stats)
    for tap in runs[0].taps:
        for name in ("abs_mean", "max_abs"):
            top = [torch.argsort(stats.get(name, tap), descending=True)[:3].tolist() for stats in runs]
            assert top[0] == top[1] == list(MASSIVE), (name, str(tap), top)


def test_quantized_transformer_under_model_offload_gives_the_same_numbers(model, quantized):
    pipe, _ = model.load(gguf=model.file)
    pipe.enable_model_cpu_offload(device="cpu")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, GGUFLinear)
    assert_same(every_verb(pipe, model.call), every_verb(quantized[0], model.call))


def test_gguf_transformer_alone_loads_from_a_transformer_directory(model):
    loaded, adapter = mabook.load(model.dir / "transformer", gguf=model.file)
    assert loaded is None and isinstance(adapter.transformer.single_transformer_blocks[1].proj_out, GGUFLinear)
    assert [b.path for b in adapter.blocks] == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]


BAD = {  # id -> (load kwargs, with "{dir}" / "{file}" filled in, error, message fragment)
    "organism": (dict(name_or_path="organism", gguf="{file}"), ValueError, "gguf= is for a real model's transformer"),
    "not-a-path": (dict(gguf=42), TypeError, "gguf must be the path of a .gguf file"),
    "not-gguf": (dict(gguf="{dir}/model_index.json"), ValueError, "is not a .gguf file"),
    "missing": (dict(gguf="{dir}/none.gguf"), FileNotFoundError, "none.gguf'"),
    "and-transformer": (dict(gguf="{file}", transformer=None), ValueError, "either gguf= or transformer="),
    "offload-transformer-only": (dict(name_or_path="{dir}/transformer", device="cuda", cpu_offload=True), ValueError,
                                 "holds a transformer only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_load_refuses_a_bad_gguf_or_offload_request_in_one_line(model, case):
    kwargs, error, fragment = BAD[case]
    kwargs = {k: v.format(dir=model.dir, file=model.file) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs.setdefault("name_or_path", model.dir)
    with pytest.raises(error) as info:
        models.load(**kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)
