"""`mabook transport`: copy the top-k channels of a source into a target's generation (chapters 4 and 5).

From a prompt (``--source``): the source is generated and recorded once, its channels moved into
the target's generation (same noise) at each ``--alpha``; ``--stream img|txt|both`` picks the image
stream, the text stream or both; ``--mask source|target|union`` restricts it to chapter 3's K-means
foreground, chosen by ``--mask-rule`` (``border``: truth-free, the cluster holding the image border
is background; ``oracle``: matched to a shapes-world caption's objects, an upper bound);
``--window early|mid|late`` to a third of the steps; ``--k 0`` moves every channel, and with it the
AdaLN conditioning unless ``--conditioning off`` (alpha = 1 is then the source exactly; on a model
other than the organism only with ``--max-record-gb``, the record being tens of GB per image); a
top-k set moves the conditioning only with ``--conditioning on``. ``--baselines`` adds pixel blend
and (organism) text-embedding blend rows.
From an image (``--reference IMG``): the image is inverted onto the pipeline's schedule (or noised,
``--trajectory noise``), regenerated along it once for the statistics that pick the top-k, and
those channels are recorded; the strip adds its reconstruction and the JSON the reconstruction error.

Writes into --out: strip.png (rows: source or reference, each alpha, target, the baselines;
columns: seeds) and transport.json (settings, provenance, the table; written last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np

from mabook import disruption, files, images, inversion, judge, probe, spatial
from mabook import transport as transport_mod
from mabook.config import Units, check_positive, option

ATTRIBUTES = ("color", "shape", "size", "position")


@dataclass
class Config(Units):
    NAME: ClassVar[str] = "transport"

    source: str | None = option(None, "the source prompt (or --reference)", type=str)
    reference: str | None = option(None, "instead of --source: an RGB image of the generation's size (organism: 32x32), "
                                   "inverted", type=str, metavar="IMG")
    trajectory: str = option("auto", "with --reference: flow-matching inversion, or noising to each step's level "
                             "(first --seeds); auto: invert where the family can (organism, FLUX, SD3, SANA), noise "
                             "on PixArt's DDPM path", choices=("auto", *inversion.METHODS))
    resize: bool = option(False, "with --reference: resize / convert it to the generation's RGB size", flag=True)
    target: str | None = option(None, "the target prompt (same seed: same noise)", type=str, required=True)
    alpha: list = option([0.0, 0.25, 0.5, 0.75, 1.0], "how much of the source: 0 is the target, 1 the source's channels")
    k: int = option(16, "top-k channels per tap by |mean| (0: all channels)")
    stream: str = option("img", "the stream transported", choices=("img", "txt", "both"))
    mask: str = option("none", "transport only inside the source's, the target's or both K-means foregrounds (chapter 3)",
                       choices=("none", *transport_mod.MASKS))
    mask_rule: str = option("border", "which K-means cluster is the foreground: border (truth-free: not the cluster holding "
                            "the image border) or oracle (matched to a shapes-world caption's objects: an upper bound)",
                            choices=transport_mod.MASK_RULES)
    mask_tap: str | None = option(None, "image tap the mask is clustered at (default: the middle one)", type=str)
    mask_step: int | None = option(None, "step the mask is clustered at (default: the middle one)", type=int)
    mask_channels: int = option(4, "the mask clusters the top-N channels")
    window: str = option("all", "the steps transported (equal thirds: the first, centred or last n // 3)",
                         choices=("all", *disruption.PARTS))
    conditioning: str = option("auto", "also transport the AdaLN conditioning (auto: on with every channel, --k 0, the "
                               "exactness check; off for a top-k set)", choices=("auto", "on", "off"))
    baselines: bool = option(False, "also pixel blend and (organism) text-embedding blend at each alpha", flag=True)
    max_record_gb: float | None = option(None, "--k 0 on a model other than the organism: the host memory (GB) the "
                                         "all-channel record may take (refused without it; the error states the need)",
                                         type=float)

    def check(self) -> None:
        super().check()
        for a in self.alpha:
            transport_mod.check_alpha(a)
        if self.k < 0:
            raise ValueError(f"--k must be >= 0 (0 = all channels), got {self.k}")
        if self.reference is not None:
            if self.source is not None:
                raise ValueError("--source and --reference exclude each other: a reference image needs no source prompt")
            if self.mask != "none":
                raise ValueError(f"--mask {self.mask} is not available with --reference; allowed: none")
        elif self.source is None:
            raise ValueError("give --source (a prompt) or --reference (an image to invert)")
        for name in ("source", "target"):
            value = getattr(self, name)
            if (value is None and name == "target") or (value is not None and not value.strip()):
                raise ValueError(f"--{name} is empty; allowed: a non-empty prompt")
        check_positive(self, "mask_channels")
        if self.mask != "none" and self.stream == "txt":
            raise ValueError(f"--mask {self.mask} selects image tokens; allowed with --stream img or both, not txt")
        if self.mask_rule != "border" and self.mask == "none":
            raise ValueError(f"--mask-rule {self.mask_rule} chooses a mask's foreground; allowed with --mask source, target or union")
        if self.mask_step is not None and not 0 <= self.mask_step < self.num_inference_steps:
            raise ValueError(f"--mask-step {self.mask_step} is out of range; allowed: 0 <= step < {self.num_inference_steps}")
        if self.max_record_gb is not None and not self.max_record_gb > 0:
            raise ValueError(f"--max-record-gb must be > 0, got {self.max_record_gb}")

    def check_adapter(self, adapter) -> None:
        if self.k > adapter.width:
            raise ValueError(f"--k {self.k} is out of range; allowed: 0 (all channels) or 1 <= k <= {adapter.width}")

    @property
    def streams(self) -> list[str]:
        return ["img", "txt"] if self.stream == "both" else [self.stream]

    @property
    def steps(self):
        """The transported steps (None: all)."""
        return None if self.window == "all" else disruption.window(["-"], self.num_inference_steps, "all", self.window)[1]

    @property
    def with_conditioning(self) -> bool:
        """Whether the conditioning is recorded and moved: auto is on for every channel (--k 0) only."""
        return {"auto": self.k == 0, "on": True, "off": False}[self.conditioning]

    @property
    def max_bytes(self) -> int | None:
        """`transport.record`'s memory cap, from --max-record-gb."""
        return None if self.max_record_gb is None else int(self.max_record_gb * 1e9)


def run(config: Config, adapter) -> SimpleNamespace:
    """The transport at every alpha (the unedited target generated once), and the baselines."""
    config.check_adapter(adapter)
    return _from_reference(config, adapter) if config.reference is not None else _from_prompt(config, adapter)


def _top(config: Config, stats) -> dict:
    channels = {}
    for stream in config.streams:
        channels |= disruption.channel_set(stats, config.k, "top", stream=stream)
    return channels


def _mask(config: Config, adapter, stats):
    """Chapter 3's K-means foreground (top --mask-channels at one image tap and step) of the source, target or both."""
    tap = spatial.image_tap(adapter, config.mask_tap)
    step = config.num_inference_steps // 2 if config.mask_step is None else config.mask_step
    channels = {tap: disruption.channel_set(stats, config.mask_channels, "top")[tap]}
    if config.mask_rule == "oracle" and not judge.applies(adapter, [config.source, config.target]):
        raise ValueError("--mask-rule oracle matches clusters to the truth, which only shapes-world captions on the organism "
                         "have; allowed here: --mask-rule border")
    masks = {}
    for side in ("source", "target"):
        rec = transport_mod.record(adapter, [getattr(config, side)], config.seeds, taps=[tap], steps=[step],
                                   channels=channels, num_inference_steps=config.num_inference_steps,
                                   batch_size=config.batch_size)
        masks[side] = transport_mod.kmeans_mask(rec, tap, step, rule=config.mask_rule)
    return masks["source"] | masks["target"] if config.mask == "union" else masks[config.mask]


def _alphas(config: Config, rec, targets, **kwargs) -> tuple[list[dict], dict, np.ndarray]:
    """(table rows, strip rows by alpha, the target images) of the transport at every alpha."""
    rows, strip, target_images = [], {}, None
    for a in config.alpha:
        result = transport_mod.transport(rec, targets, a, stream=config.stream, steps=config.steps,
                                         batch_size=config.batch_size, target_images=target_images,
                                         conditioning=config.with_conditioning, **kwargs)
        target_images = result.target
        rows += [{**r, "method": "transport", "window": config.window} for r in result.table]
        strip[f"alpha={a:g}"] = result.images
    return rows, strip, target_images


def _from_prompt(config: Config, adapter) -> SimpleNamespace:
    n, taps = config.num_inference_steps, [str(t) for t in probe.taps(adapter, config.streams)]
    # 1. the channel set: top-k by |mean| over the source and target generations (both guidance halves)
    stats = None
    if config.k > 0 or config.mask != "none":
        with probe.collect(adapter, cfg="both") as collected:
            adapter.generate([(config.source, s) for s in config.seeds] + [(config.target, s) for s in config.seeds],
                             n, config.batch_size)
        stats = collected.stats
    # 2. the source recorded once (with the AdaLN conditioning: by default with all channels only); 3. the mask
    rec = transport_mod.record(adapter, [config.source], config.seeds, taps=taps, channels=_top(config, stats) if config.k
                               else "all", conditioning=config.with_conditioning, num_inference_steps=n,
                               batch_size=config.batch_size, max_bytes=config.max_bytes)
    mask = _mask(config, adapter, stats) if config.mask != "none" else None
    # 4. transport at every alpha, and the baselines at the same alphas
    targets = [config.target] * len(rec.units)
    rows, strip, target_images = _alphas(config, rec, targets, mask=mask)
    rows = [{**r, "mask": config.mask, "mask_rule": config.mask_rule if config.mask != "none" else None} for r in rows]
    baselines = {}
    if config.baselines:
        baselines = {f"pixel blend alpha={a:g}": transport_mod.pixel_blend(rec.images, target_images, a) for a in config.alpha}
        if adapter.family.name == "organism":
            for a in config.alpha:
                baselines[f"text embedding blend alpha={a:g}"] = transport_mod.embedding_blend(
                    adapter, [config.source] * len(rec.units), targets, a, [s for _, s in rec.units], n, config.batch_size)
        base = SimpleNamespace(adapter=adapter, images=target_images, units=rec.units, clip=None)  # what unit_metrics reads
        for name, pictures in baselines.items():
            method, a = name.rsplit(" alpha=", 1)
            rows += [{**r, "method": method, "alpha": float(a), "source_prompt": config.source}
                     for r in disruption.unit_metrics(base, pictures)]
    strip = {"source": rec.images, **strip, "target": target_images, **baselines}
    return SimpleNamespace(rec=rec, rows=rows, strip=strip, extra={})


def _from_reference(config: Config, adapter) -> SimpleNamespace:
    references = inversion.check_references(adapter, [config.reference], resize=config.resize)
    n = config.num_inference_steps
    # 1. the reference on its trajectory: inverted (unconditionally), or noised with the first seed
    method = inversion.default_method(adapter) if config.trajectory == "auto" else config.trajectory
    traj = (inversion.invert(adapter, references, num_inference_steps=n) if method == "invert"
            else inversion.noise(adapter, references, config.seeds[0], num_inference_steps=n))
    # 2. the top-k by the statistics of a regeneration along it (a one-channel record), then those
    #    channels recorded (--k 0: every channel); 3. transport at every alpha
    taps = [str(t) for t in probe.taps(adapter, config.streams)]
    conditioning = config.with_conditioning
    channels = "all"
    if config.k:
        with probe.collect(adapter, taps=taps, cfg="both") as collected:
            inversion.record(traj, taps=taps, channels=[0], batch_size=config.batch_size, conditioning=False)
        channels = _top(config, collected.stats)
    rec = inversion.record(traj, taps=taps, channels=channels, batch_size=config.batch_size, conditioning=conditioning,
                           max_bytes=config.max_bytes)
    rows, strip, target_images = _alphas(config, rec, [config.target])
    baselines = {f"pixel blend alpha={a:g}": transport_mod.pixel_blend(references, target_images, a)
                 for a in config.alpha} if config.baselines else {}
    error = {k: float(v[0]) for k, v in inversion.pixel_error(rec.images, references).items()}
    residual = (float(np.nanmax(traj.residuals)) if traj.residuals is not None and not np.isnan(traj.residuals).all()
                else None)
    strip = {"reference": references, "reconstruction": rec.images, **strip, "target": target_images, **baselines}
    extra = {"reconstruction_error": error, "trajectory": {"method": traj.method, "sampler": traj.sampler,
                                                           "asked": config.trajectory},
             "inversion": {"evaluations": traj.evaluations, "max_residual": residual}}
    return SimpleNamespace(rec=rec, rows=rows, strip=strip, extra=extra)


def write(config: Config, result: SimpleNamespace, out: Path, record: dict) -> list[str]:
    mosaic, _ = disruption.grid(disruption.Result([], result.strip, []))
    images.save(mosaic, out / "strip.png")
    record["settings"] |= {"recorded_bytes": result.rec.nbytes, "conditioning": result.rec.conditioning}
    files.write_json(out / "transport.json", {**record, **result.extra, "strip_rows": list(result.strip),
                                              "table": result.rows}, default=str)
    if config.reference is not None:
        made = result.extra["trajectory"]
        done = {"invert": "inverted", "noise": "noised"}[made["method"]]
        return [f"reference {config.reference} {done} ({made['sampler']}); the record regenerates it with mean |error| "
                f"{result.extra['reconstruction_error']['mae']:.4f}; k={config.k or 'all'} ({config.stream})"] + [
            f"alpha={r['alpha']:<5g} pixel MSE vs target {r['pixel_mse']:.4f}" for r in result.rows]
    lines = [f"{len(config.seeds)} seeds x {len(config.alpha)} alphas, k={config.k or 'all'} ({config.stream}); "
             f"recorded {result.rec.nbytes / 2**10:.1f} KiB"]
    for a in config.alpha:
        r = [x for x in result.rows if x["alpha"] == a and x["method"] == "transport"]
        took, null = ([np.mean([x[f"{what}_{k}"] for k in ATTRIBUTES if x.get(f"differs_{k}")] or [np.nan])
                       for x in r if "took_source_color" in x] for what in ("took_source", "no_transport_took_source"))
        line = f"alpha={a:<5g} pixel MSE vs target {np.mean([x['pixel_mse'] for x in r]):.4f}"
        lines.append(line + (f"; took the source's differing attributes {np.nanmean(took):.2f} (no transport, the unedited "
                             f"target: {np.nanmean(null):.2f})" if took else ""))
    return lines
