import json

import numpy as np
import pytest
import torch

from mabook import images, organism
from mabook import train as trainer

PROMPTS = ["a large red circle at the top left on a black background",
           "a small blue square at the left and a large yellow triangle at the right on a gray background"]


@pytest.fixture(scope="module")
def committed():
    return organism.load()


def test_committed_checkpoint_loads_with_verified_hash(committed):
    card = committed.card
    assert card["sha256"] == organism.sha256(organism.CHECKPOINT)
    assert committed.transformer.__class__.__name__ == "FluxTransformer2DModel"
    assert len(committed.transformer.transformer_blocks) == card["organism_config"]["num_layers"]


def test_generation_is_deterministic_for_a_seed(committed):
    run = lambda seed: committed(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="np").images
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 32, 32, 3) and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_output_types_agree(committed):
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pil = committed(PROMPTS[0], output_type="pil", **kw).images
    arr = committed(PROMPTS[0], output_type="np", **{**kw, "generator": torch.Generator().manual_seed(0)}).images
    assert np.array_equal(images.to_uint8(pil), images.to_uint8(arr))
    assert organism.to_uint8 is images.to_uint8  # the name the chapters use


def test_bad_arguments_give_clear_errors(committed):
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        committed(PROMPTS[0], num_inference_steps=0)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str"):
        committed(3)
    with pytest.raises(ValueError, match="output_type"):
        committed(PROMPTS[0], num_inference_steps=1, output_type="jpg")


def test_prompt_embeddings_give_the_prompts_image(committed):
    kw = lambda: dict(num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np")
    with torch.no_grad():
        embeds, pooled = committed.encode_prompt(PROMPTS)
    by_prompt = committed(PROMPTS, **kw()).images
    assert np.array_equal(committed(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **kw()).images, by_prompt)
    other = committed(prompt_embeds=embeds, pooled_prompt_embeds=pooled.flip(0), **kw()).images
    assert not np.array_equal(other, by_prompt)  # the pooled vector is read (the AdaLN conditioning)


def test_bad_prompt_embeddings_give_clear_errors(committed):
    embeds, pooled = torch.zeros(2, 32, 128), torch.zeros(2, 128)
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(2, 16, 128\); expected \(batch_size, 32, 128\)"):
        committed(prompt_embeds=embeds[:, :16], pooled_prompt_embeds=pooled, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds has shape \(1, 128\); expected \(batch_size, 128\) with "
                                         r"the batch_size of prompt_embeds \(2\)"):
        committed(prompt_embeds=embeds, pooled_prompt_embeds=pooled[:1], num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt_embeds and pooled_prompt_embeds must both be tensors, got Tensor and NoneType"):
        committed(prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds/pooled_prompt_embeds, not both"):
        committed(PROMPTS, prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=1)
    with pytest.raises(ValueError, match="pass prompt, or prompt_embeds with pooled_prompt_embeds"):
        committed(num_inference_steps=1)


def test_tokenizer_is_word_level_and_pads_to_fixed_length():
    tok = organism.build_tokenizer()
    ids = tok(PROMPTS[0], padding="max_length", max_length=32).input_ids
    words = PROMPTS[0].split()
    assert len(ids) == 32 and ids[len(words)] == tok.eos_token_id and ids[-1] == tok.pad_token_id
    assert tok.unk_token_id not in ids[: len(words)]


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 32, 32)
    tokens = organism.patchify(x, 4)
    assert tokens.shape == (2, 64, 48)
    assert torch.equal(organism.unpatchify(tokens, 4, 8), x)
    # token (row 1, col 2) holds pixels [4:8, 8:12]
    assert torch.equal(tokens[0, 1 * 8 + 2].reshape(3, 4, 4), x[0, :, 4:8, 8:12])


def test_a_few_training_steps_lower_the_loss(tmp_path):
    cfg = trainer.TrainConfig(steps=40, batch_size=16, lr=1e-3, warmup=5, log_every=10, save_at=())
    _, history = trainer.train(cfg, tmp_path / "o.safetensors", verbose=False)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert json.loads((tmp_path / "o.json").read_text())["step"] == 40


def test_checkpoint_roundtrip_and_corruption_is_rejected(tmp_path):
    pipe = organism.build_pipeline()
    path = tmp_path / "x.safetensors"
    organism.save(pipe, path)
    loaded = organism.load(path)
    ref = {k: v.half().float() for k, v in pipe.transformer.state_dict().items()}
    assert all(torch.equal(ref[k], v) for k, v in loaded.transformer.state_dict().items())
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(organism.ChecksumError, match="SHA-256"):
        organism.load(path)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="mabook.train"):
        organism.load(tmp_path / "nope.safetensors")


def test_committed_evaluation_was_made_with_this_checkpoint_and_meets_the_bar(committed):
    result = json.loads((organism.CHECKPOINT_DIR / "evaluation.json").read_text())
    assert result["checkpoint_sha256"] == committed.card["sha256"]
    one = result["1_object"]
    assert one["n_images"] >= 256
    assert one["color"] >= 0.95 and one["position"] >= 0.95 and one["shape"] >= 0.85 and one["size"] >= 0.85


def test_trained_organism_draws_heldout_captions(committed):
    from mabook.evaluate import evaluate

    result = evaluate(committed, n_single=24, n_double=8, seed=123)
    one = result["1_object"]
    # a small live sample (not the committed one): loose bars, but far above chance (1/7, 1/3, 1/2, 1/9)
    assert one["color"] >= 0.9 and one["position"] >= 0.9 and one["shape"] >= 0.7 and one["size"] >= 0.8, one


def test_training_is_deterministic_for_a_seed(tmp_path):
    cfg = trainer.TrainConfig(steps=3, batch_size=4, warmup=1, log_every=1, save_at=())
    a, _ = trainer.train(cfg, tmp_path / "a.safetensors", verbose=False)
    b, _ = trainer.train(cfg, tmp_path / "b.safetensors", verbose=False)
    assert organism.sha256(tmp_path / "a.safetensors") == organism.sha256(tmp_path / "b.safetensors")


def tiny_config(**kwargs):
    return trainer.TrainConfig(**{"steps": 6, "batch_size": 4, "warmup": 2, "log_every": 2, "probe_every": 2,
                                  "state_every": 2, "save_at": (2, 4), **kwargs})


def test_training_resumes_bit_identically(tmp_path):
    cfg = tiny_config()
    trainer.train(cfg, tmp_path / "straight.safetensors", verbose=False)
    trainer.train(cfg, tmp_path / "resumed.safetensors", verbose=False, state_dir=tmp_path / "state", stop_after=3)
    assert not (tmp_path / "resumed.safetensors").exists()  # stopped: state only
    assert json.loads((tmp_path / "state" / "state.json").read_text())["step"] == 3
    trainer.train(cfg, tmp_path / "resumed.safetensors", verbose=False, state_dir=tmp_path / "state")
    assert organism.sha256(tmp_path / "straight.safetensors") == organism.sha256(tmp_path / "resumed.safetensors")
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("straight", "resumed"))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["emergence"] == b["emergence"]
    with pytest.raises(ValueError, match=r"another config .*'lr': \(0.0006, 0.001\)"):
        trainer.train(tiny_config(lr=1e-3), tmp_path / "other.safetensors", verbose=False, state_dir=tmp_path / "state")


def test_emergence_log_is_written_and_read_back(tmp_path):
    pipe, _ = trainer.train(tiny_config(), tmp_path / "o.safetensors", verbose=False)
    card = organism.load(tmp_path / "o.safetensors").card
    log = card["emergence"]
    assert [row["step"] for row in log] == [1, 2, 4, 6]
    taps = [f"transformer_blocks.{i}.img" for i in range(4)] + [f"single_transformer_blocks.{i}.img" for i in range(4)]
    for which in ("raw", "ema"):
        assert [layer["tap"] for layer in log[-1][which]] == taps
        assert log[0][which][0]["jaccard_prev"] is None and 0 <= log[-1][which][0]["jaccard_prev"] <= 1
    # the logged numbers are what the probe measures on the saved EMA weights (fp16-rounded: close, not equal)
    batch = trainer.ProbeBatch.make(pipe.organism_config)
    again = trainer.measure_emergence(organism.load(tmp_path / "o.safetensors"), batch, 4)
    for logged, measured in zip(log[-1]["ema"], again):
        assert logged["max_abs"] == pytest.approx(measured["max_abs"], rel=2e-2)
    # snapshots at the log-spaced steps, each with the log up to its step
    snaps = organism.snapshots(tmp_path / "o.safetensors")
    assert list(snaps) == [2, 4, 6]
    assert [r["step"] for r in organism.load(snaps[4]).card["emergence"]] == [1, 2, 4]
    # measured after the fact (a run trained before the log existed): the same per-layer rows, from the files
    after = trainer.measure_run(tmp_path / "o.safetensors")
    assert [r["step"] for r in after["emergence"]] == [2, 4, 6]
    assert [r["top"] for r in after["emergence"][-1]["ema"]] == [r["top"] for r in again]


def test_corrupt_snapshot_is_refused(tmp_path):
    trainer.train(tiny_config(steps=3, save_at=(2,)), tmp_path / "o.safetensors", verbose=False)
    snap = organism.snapshots(tmp_path / "o.safetensors")[2]
    data = bytearray(snap.read_bytes())
    data[-3] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(organism.ChecksumError, match=r"o-step2.safetensors has SHA-256 .* corrupt"):
        organism.load(snap)


def test_log_spaced_snapshot_steps():
    assert trainer.log_spaced(250, 4000) == (250, 500, 1000, 2000, 4000)
