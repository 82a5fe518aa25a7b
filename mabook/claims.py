"""The claims the book tests, as data: who claims what, our test, the file and fields that hold the
result, the chapter section that runs it -- and the verdict words and thresholds, fixed before any
number is read. `mabook.scorecard` computes each row from the committed results JSONs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOLDS, FAILS, UNCLEAR = "holds", "fails", "unclear"
NOT_TESTABLE, NO_RESULT, NO_TEST = "not testable here", "no current result", "no test yet"
VERDICTS = (HOLDS, FAILS, UNCLEAR, NOT_TESTABLE, NO_RESULT, NO_TEST)
PROXY_VERDICTS = (HOLDS, FAILS, UNCLEAR)

# ---------------------------------------------------------------------------------------------
# Thresholds, fixed before reading the numbers. Every CI in the results files is a bootstrap 95 %
# interval over the independent unit (the prompt, or the pair); the verdicts read them as stored.
# ---------------------------------------------------------------------------------------------

RATIO_LINE = 1.0  # a paired damage ratio (claimed set / control) holds when its CI's lower bound is above 1 (more
#   damage than the control beyond the CI), fails when its upper bound is below 1 (the effect goes the other way)
DIFFERENCE_LINE = 0.0  # a paired difference (claimed set minus control) likewise: lower bound > 0 holds, upper < 0 fails
KEEP_MARGIN = 0.05  # "unchanged" (an accuracy drop): holds when the drop's CI upper bound is <= 0.05 (about 3 of 64
#   units), fails when its lower bound is above 0.05; a wide CI that merely includes 0 is unclear, not "unchanged"
BREAK_DROP = 0.1  # chapter 2's line: a kind of damage "breaks" at the smallest k where its drop from the baseline
#   reaches 0.1 (judge cleanliness for detail; any attribute's accuracy for semantics)
STEP_DRIVEN = 0.5  # prompt vs step split: "timestep-driven" where the prompt explains less than half the variance
#   (the step explains the majority); chapter 2c's STEP_DRIVEN
EMBEDDING_DRIVEN = 0.5  # timestep swap: the channel "follows the embedding" (or "the input") in a layer where that
#   factor explains at least half of the table's variance, a majority; chapter 2c's EMBEDDING_DRIVEN
PRESENT_FACTOR = 10  # a massive channel is "present" when its LayerNorm share (max over layers) is >= 10x the
#   uniform share 1 / width: an order of magnitude above "share near the uniform"; chapter 2c's PRESENT_FACTOR
SHARE_MARGIN = 0.20  # a share "shrinks" when its max AND mean over layers are more than 20 % below the control's
#   (one checkpoint's share moves up to ~12 % between two caption batches); chapter 2c's SHARE_MARGIN
K_DISRUPTION = 4  # chapter 2's K_FOCUS: the k of its ops (zero, mean) and of its prompt-vs-step split
K_SINK = 1  # the sinks paper's headline k (one key per head)
HPS_K = 10  # the sinks paper: HPS-v2 drops only from k = 10 on
ALPHA = 1.0  # transport strength at which chapters 4-5 state their verdicts (full replacement of the channels)


# ---------------------------------------------------------------------------------------------
# The claims, as data
# ---------------------------------------------------------------------------------------------

MA = "Turri et al. 2026 (massive activations)"
SINKS = "Attention sinks, arXiv 2605.09313"
SUN = "Sun et al. 2024 (rival reading)"
DG = "Detail Guidance, arXiv 2510.11538 (rival reading)"

CHAPTERS = {  # notebook -> how the table names it
    "02_disruption.ipynb": "Ch. 2",
    "02c_origins.ipynb": "Interlude 2c",
    "03_spatial_organization.ipynb": "Ch. 3",
    "04_text_transport.ipynb": "Ch. 4",
    "05_image_transport.ipynb": "Ch. 5",
    "06_attention_sinks.ipynb": "Ch. 6",
}


@dataclass(frozen=True)
class Claim:
    """One row's fixed part. `heading` is the text of the chapter section that runs the test
    (without the leading #s; "" links to the chapter); `proxy` names what we report instead when
    the paper's measure is not available here ("" when we measure the claim itself)."""

    id: str
    paper: str
    claim: str
    test: str
    file: str
    fields: tuple[str, ...]
    chapter: str
    heading: str = ""
    proxy: str = ""

    @property
    def section(self) -> str:
        """Relative link from a page under book/ to the section, e.g. ``../notebooks/02_disruption.ipynb#anchor``."""
        return f"../notebooks/{self.chapter}" + (f"#{anchor(self.heading)}" if self.heading else "")


def anchor(heading: str) -> str:
    """The heading's anchor as MyST writes it (``myst_heading_anchors`` in ``_config.yml``; GitHub's
    notebook view uses the same): lower case, spaces to hyphens, other punctuation dropped --
    ``"2. Zeroing the top-k"`` gives ``"2-zeroing-the-top-k"``."""
    return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", heading.lower().replace(" ", "-"))


CLAIMS: tuple[Claim, ...] = (
    Claim("ma-critical-random", MA,
          "Zeroing the few massive channels collapses generation; an equal number of other channels does not.",
          f"Zero the top-{K_DISRUPTION} channels by |mean| at every image layer and step vs {K_DISRUPTION} random ones "
          "(five sets); paired ratio of pixel MSE to each unit's baseline.",
          "disruption_full.json", (f"paired_ratios[metric=pixel_mse, control=random, k={K_DISRUPTION}].ratio, ci", "units"),
          "02_disruption.ipynb", "2. Zeroing the top-k against three controls"),
    Claim("ma-critical-bottom", MA,
          "Zeroing the massive channels collapses generation; zeroing the bottom-k (lowest |mean|) is marginal.",
          f"As above, against the paper's control: the bottom-{K_DISRUPTION} channels by |mean|.",
          "disruption_full.json", (f"paired_ratios[metric=pixel_mse, control=bottom_abs_mean, k={K_DISRUPTION}]"
                                   ".ratio, ci, top_damage, control_damage",),
          "02_disruption.ipynb", "4. Is the paper's control a fair null?"),
    Claim("ma-spatial", MA,
          "K-means (K = 2) on the image tokens restricted to the massive channels separates the subject from the background.",
          "Token IoU of the K-means mask with the rendered object mask, top-k channels minus random-k (paired over "
          "generations), all layers x steps.",
          "spatial_full.json", ("differences[where=all layers x steps, control=random-k].difference, ci",
                                "summary[source=rendered, set=top-k | random-k | all].token_iou, token_iou_ci", "k_channels"),
          "03_spatial_organization.ipynb", "3. Measured alignment: massive vs all vs bottom vs random"),
    Claim("ma-transport-text", MA,
          "Copying the massive channels from a source prompt's trajectory into a target's moves the output toward the "
          "source's semantics (text-conditioned transport).",
          f"Share of the source's differing attributes the output takes, top-k minus random-k channels at alpha = {ALPHA:g}, "
          "every image layer and step, pairs differing in one or two attributes.",
          "text_transport_full.json", (f"differences[alpha={ALPHA:g}, other=random-k_main, metric=took_source].difference, ci",
                                       "k_sweep_summary[set, k_set].took_source, took_source_ci", "k_main"),
          "04_text_transport.ipynb", "5. The table: what each method takes and keeps"),
    Claim("ma-transport-image", MA,
          "A reference image's massive channels, brought onto a trajectory by inversion, carry its subject into a new "
          "prompt's generation (image-conditioned transport).",
          f"Share of pairs whose output takes the reference's differing attribute, top-k minus random-k channels, "
          f"fixed-point inversion, alpha = {ALPHA:g}.",
          "image_transport_full.json", (f"differences[trajectory=invert, alpha={ALPHA:g}, other=random-k].difference, ci",
                                        f"summary[trajectory=invert, alpha={ALPHA:g}, method=top-k | random-k].took_source",
                                        "reconstruction[start=fixed-point inversion].mae", "k"),
          "05_image_transport.ipynb", "5. The table: what the output takes from the reference"),
    Claim("sinks-text-alignment", SINKS,
          "Suppressing the top-1 attention sink per head leaves text alignment unchanged (CLIP-T, at every k).",
          f"Suppress the top-{K_SINK} key per head (-1e4 logit bias) at one block, all steps; the judge's "
          "all-attributes-correct accuracy, drop from the baseline.",
          "attention_full.json", (f"summary[kind=sink, k={K_SINK}, op=score eta=0, window=<layer>, all steps].all_correct, "
                                  "all_correct_ci", "summary[kind=baseline].all_correct, all_correct_ci", "layer"),
          "06_attention_sinks.ipynb", "6. Content or appearance?",
          proxy="CLIP-T needs CLIP weights; proxy: the shapes judge's all-attributes-correct accuracy (exact on the "
                "shapes world, not CLIP-T)"),
    Claim("sinks-perceptual-shift", SINKS,
          "Suppressing the sinks shifts the image far more than suppressing equal-budget random keys (LPIPS 0.347 vs "
          "0.053 at k = 1, about 6.5x, SD3 layer 12).",
          f"Sink / control paired ratio of the shift to the baseline at k = {K_SINK}, one block, all steps, on pixel "
          "metrics (not LPIPS); the control is random keys holding the sinks' attention mass (mass-matched) where the big "
          "run has it, else random keys of the same number.",
          "attention_full.json", (f"paired_ratios[control=random-mass (else random), k={K_SINK}, op=score eta=0, "
                                  "window=<layer>, all steps].ratio, ci", "paired_ratios_linear[pixel_mae] (when stored)",
                                  "summary[kind=sink | random, same k and window].pixel_mae"),
          "06_attention_sinks.ipynb", "3. Suppressing the sinks: score path vs equal-budget controls",
          proxy="LPIPS needs ImageNet backbone weights; proxy: pixel-space shift (mean |difference| or MSE, which squares "
                "the change), whose ratios are not on LPIPS's scale: only the direction compares with the paper's"),
    Claim("sinks-hps", SINKS,
          "Human preference (HPS-v2) drops only when k >= 10 sinks per head are suppressed.",
          "Judge cleanliness (the share of clean pixels, the book's image-quality reading) of sink-suppressed images at one "
          "block, per k, against the baseline's; a drop is one the two CIs resolve.",
          "attention_full.json", ("summary[kind=sink, op=score eta=0, window=<layer>, all steps, k=each].cleanliness, "
                                  "cleanliness_ci", "summary[kind=baseline].cleanliness, cleanliness_ci", "ks"),
          "06_attention_sinks.ipynb", "6. Content or appearance?",
          proxy="HPS-v2 needs its reward-model weights; proxy: judge cleanliness (image quality on the shapes world, "
                "not human preference)"),
    Claim("sinks-where", SINKS,
          "Where sinks sit depends on the model: in FLUX.1 on text padding tokens (PixArt-alpha: corner image tokens; "
          "Qwen-Image: text tokens).",
          "Attention mass each kind of key (prompt text, padding, image) receives over its share of the keys, per layer, in "
          "the organism: FLUX's architecture with padded text.",
          "attention_full.json", ("mass_by_kind[layer].text, pad, image", "mass_by_kind[(share of keys)]",
                                  "movement[layer].most common top-1 kind"),
          "06_attention_sinks.ipynb", "2. Where attention goes",
          proxy="the claim is about named real models; proxy: does a miniature FLUX put its sinks where FLUX.1 does "
                "(padding)?"),
    Claim("sinks-differ", SINKS,
          "Where sinks sit depends on the model.",
          "The top-1 sink's most common kind of key at one block, in three organisms of one architecture that differ in one "
          "training factor (control, no timestep embedding, LayerNorm affine).",
          "origins.json", ("organisms[*].sinks.top1_kind, mass, layer",),
          "02c_origins.ipynb", "2.4 Prompt vs step, and where the attention sinks sit"),
    Claim("sun-zero-vs-mean", SUN,
          "Zeroing the massive activations destroys the model; replacing them by their mean leaves it intact (they act "
          "as constants).",
          f"Top-{K_DISRUPTION} channels zeroed vs replaced by their per-step dataset mean, every image layer and step: "
          "pixel MSE to the baseline (CIs compared) and the judge's all-attributes-correct accuracy after mean-replacement.",
          "disruption_full.json", (f"summary[kind=top, k={K_DISRUPTION}, op=zero | mean | token_mean].pixel_mse, pixel_mse_ci, "
                                   "all_correct, all_correct_ci", "summary[kind=baseline].all_correct"),
          "02_disruption.ipynb", "5. Four ways to remove a channel"),
    Claim("sun-explicit-constants", SUN,
          "Massive activations act as implicit parameters: a network given explicit learnable constants needs them less "
          "(Sun et al. 2024 with attention biases; Sun, Canziani, LeCun & Zhu 2026).",
          "The norm-affine organism (every LayerNorm gets a learnable scale and bias) vs the control: the top channel's "
          "LayerNorm share, max and mean over image layers.",
          "origins.json", ("organisms[control | norm-affine].layers[*].norm_share", "organism_config"),
          "02c_origins.ipynb", "2.5 Verdicts"),
    Claim("dg-timestep-split", DG,
          "The massive channels are driven by the timestep, not by the prompt.",
          f"Split the variance of the top-{K_DISRUPTION} channels' per-image mean during sampling into prompt (at a fixed "
          "step) and step (for a fixed image), per image layer; random channels for reference.",
          "disruption_full.json", ("decomposition_top[layer].prompt_share", "decomposition_random[layer].prompt_share"),
          "02_disruption.ipynb", "7. Semantics or detail?"),
    Claim("dg-timestep-swap", DG,
          "The massive channels follow the timestep embedding.",
          "Timestep swap on the committed organism: scenes noised to level t_input while the AdaLN sees t_embed; share of "
          "the top channel's variance that follows the embedding vs the input, per image layer.",
          "origins.json", ("organisms[control].timestep_swap[tap].embedding, input, interaction",),
          "02c_origins.ipynb", "2.3 The timestep swap: does the channel follow the embedding or the input?"),
    Claim("dg-no-timestep", DG,
          "The timestep embedding creates the massive channel: without it there is none (share near the uniform 1/width).",
          "The no-timestep organism (its AdaLN always sees one constant t, same recipe otherwise): the top channel's "
          "LayerNorm share, max over image layers, against the 'present' line PRESENT_FACTOR / width.",
          "origins.json", ("organisms[no-timestep].layers[*].norm_share", "organisms[no-timestep].organism_config",
                           "organisms[no-timestep].quality"),
          "02c_origins.ipynb", "2.1 The channel, its LayerNorm share, and whether the organism draws well"),
    Claim("dg-detail-not-semantics", DG,
          "The massive channels carry local detail, not semantics: removing them dirties the image while its content "
          "survives.",
          "Zero the top-k at every image layer and step for k = 1 ... 16: the smallest k where judge cleanliness drops by "
          f"{BREAK_DROP:g} (detail) vs where any attribute's accuracy does (semantics).",
          "disruption_full.json", ("summary[kind=top | random, op=zero, k=each].cleanliness, color, shape, size, position "
                                   "(with _ci)", "summary[kind=baseline]"),
          "02_disruption.ipynb", "7. Semantics or detail?"),
)
