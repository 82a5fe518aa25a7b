"""An experiment's settings as typed data: a dataclass that checks itself once, and its command line.

As diffusers' `LayerSkipConfig`: every experiment the `mabook` command runs has a config dataclass
(`mabook.experiments.<verb>.Config`) whose fields are made with `option(default, help, ...)`. The
config checks its values once, in `__post_init__` (`check`), with one-line errors that name the
value and what is allowed; checks that need the loaded model (a k against the model's width, a
layer name) are `check_adapter(adapter)`, called once at the top of the experiment's `run`. From the
same fields come the verb's argparse arguments (`add_arguments`: `--num-inference-steps` for the
field `num_inference_steps`), the summary JSON's "settings" (`to_dict`) and a sweep's shard specs;
`from_dict` reads a saved one back.

    cfg = Config(prompts=["8"], k=[1, 4])         # checked here, once
    Config.from_dict(cfg.to_dict()) == cfg        # True
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def option(default: Any = None, help: str = "", *, type: Any = None, choices=None, flag: bool = False,
           metavar: str | None = None, required: bool = False):
    """A config field and its command-line option: lists become `nargs="+"`; `type` is the element
    type (default: the default's); `flag` makes a bool a `store_true` switch; `required` makes the
    option required on the command line (the config's `check` refuses the None default)."""
    meta = {"help": help, "type": type, "choices": choices, "flag": flag, "metavar": metavar, "required": required or None}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta | {"nargs": "+"})
    return field(default=default, metadata=meta)


def dashed(name: str) -> str:
    """A field's option name: num_inference_steps -> --num-inference-steps."""
    return "--" + name.replace("_", "-")


def check_positive(config, *names: str) -> None:
    """Ints (or lists of ints) >= 1."""
    for name in names:
        value = getattr(config, name)
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{dashed(name)} must be >= 1, got {v}")


def check_choice(config, name: str, allowed) -> None:
    values = getattr(config, name)
    for v in values if isinstance(values, list) else [values]:
        if v not in allowed:
            raise ValueError(f"unknown {dashed(name)} {v!r}; allowed: {list(allowed)}")


def read_prompts(values: list[str], skip: int = 0) -> list[str]:
    """File path -> its non-empty lines; a single integer N -> N held-out world captions (the N after
    the first `skip` of the seeded order: disjoint from a set read with N = skip); else the values."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"--prompts must be a non-empty list of strings, got {values!r}")
    if len(values) == 1 and Path(values[0]).is_file():
        prompts = [line.strip() for line in Path(values[0]).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {values[0]} has no non-empty lines")
        return prompts
    if len(values) == 1 and values[0].strip().lstrip("-").isdigit():
        from mabook import world  # deferred: the world imports PIL, and building the CLI parser imports this module

        n = int(values[0])
        if n < 1:
            raise ValueError(f"--prompts N must be >= 1, got {n}")
        return world.heldout_captions(skip + n, n_objects=1, seed=0)[skip:]
    if len(values) == 1 and values[0].endswith((".txt", ".csv", ".tsv")) and " " not in values[0]:
        raise FileNotFoundError(f"--prompts: prompt file {values[0]!r} not found; pass an existing file (one prompt per "
                                "line), an integer N, or the prompts themselves")
    for i, v in enumerate(values):
        if not v.strip():
            raise ValueError(f"--prompts: prompt {i + 1} of {len(values)} is empty ({v!r}); allowed: non-empty prompts, a "
                             "file of prompts, or an integer N (held-out captions)")
    return list(values)


@dataclass
class Config:
    """The base: `check` once after construction; `to_dict` / `from_dict`; the argparse arguments."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every check that needs no model (subclasses extend it)."""

    def check_adapter(self, adapter) -> None:
        """Every check that needs the loaded model (subclasses extend it)."""

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict):
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for {cls.__module__}.{cls.__name__}; allowed: {names}")
        return cls(**values)

    def replace(self, **changes):
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def add_arguments(cls, parser, **defaults) -> None:
        """One option per field (`defaults` overrides a field's default on this parser only)."""
        for f in fields(cls):
            meta = dict(f.metadata)
            default = defaults.get(f.name, f.default_factory() if f.default is MISSING else f.default)
            if meta.get("flag"):
                parser.add_argument(dashed(f.name), action="store_true", default=default, help=meta["help"])
                continue
            kind = meta.get("type") or type(default[0] if isinstance(default, list) and default else default)
            kwargs = {"default": default, "help": meta["help"], "nargs": meta.get("nargs"), "choices": meta.get("choices"),
                      "metavar": meta.get("metavar"), "required": meta.get("required")}
            if kind is not type(None):
                kwargs["type"] = kind
            parser.add_argument(dashed(f.name), **{k: v for k, v in kwargs.items() if v is not None or k == "default"})

    @classmethod
    def from_args(cls, namespace):
        """The config of a parsed command line (the fields only)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


@dataclass
class Generation(Config):
    """What every verb that loads a model and generates has: the model, the prompts, the sampler."""

    model: str = option("organism", "'organism', a hub id or a local pipeline directory")
    checkpoint: str | None = option(None, "organism only: a checkpoint other than the committed one", type=str)
    prompts: list = option(["8"], "a file, an integer N (held-out captions), or the prompts themselves")
    num_inference_steps: int = option(20, "denoising steps")
    batch_size: int = option(16, "images per pipeline call")
    device: str = option("cpu", "cpu, cuda, cuda:N or mps")
    dtype: str = option("float32", "the transformer's dtype", choices=DTYPES)

    def check(self) -> None:
        read_prompts(self.prompts)
        check_positive(self, "num_inference_steps", "batch_size")
        check_choice(self, "dtype", DTYPES)
        if self.checkpoint and self.model != "organism":
            raise ValueError(f"--checkpoint is for --model organism only, got --model {self.model!r}; pass the model's "
                             "directory as --model instead")

    @property
    def prompt_list(self) -> list[str]:
        """The prompts the run generates (`read_prompts`)."""
        return read_prompts(self.prompts)


@dataclass
class Units(Generation):
    """A verb that generates every (prompt, seed) unit."""

    seeds: list = option([0], "seeds per prompt (the initial noise)")

    def check(self) -> None:
        super().check()
        bad = [s for s in self.seeds if not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"--seeds must be non-negative ints, got {bad[0]}")


@dataclass
class Scored(Units):
    """A verb whose table scores each unit against its baseline (disrupt, sinks): which metrics.

    mse, mae and ssim are always computed, and the judge on the organism; on a real model
    `--metrics lpips clip-t` adds the papers' perceptual metrics (`mabook.metrics`: LPIPS to the
    baseline, CLIP-T to the prompt), with the networks `--lpips-net` and `--clip-model` -- loaded
    before anything is generated, a one-line error when their weights cannot be. The defaults are
    `mabook.metrics.LPIPS_NET` and `CLIP_MODEL` (tests/test_perceptual.py checks they agree)."""

    metrics: list = option(["mse", "mae", "ssim"], "the table's metrics: mse, mae and ssim (always), lpips and clip-t "
                           "(real models: the papers' perceptual metrics; names or comma-separated lists)", type=str)
    lpips_net: str = option("alex", "--metrics lpips: the backbone, alex (the papers') or vgg, or a local torchvision "
                            "weights file (alexnet-owt-7be5be79.pth)")
    clip_model: str = option("openai/clip-vit-base-patch32", "--metrics clip-t: a CLIP hub id or local directory (default: "
                             "the sinks paper's ViT-B/32)")

    def check(self) -> None:
        super().check()
        names = self.metric_list
        perceptual = [n for n in names if n in ("lpips", "clip-t")]
        if perceptual and self.model == "organism":
            raise ValueError(f"--metrics {' '.join(perceptual)} is for real models (networks trained on photographs); the "
                             "organism's 32x32 shapes are scored by the judge, SSIM and MAE: allowed there: mse, mae, ssim")
        for name in ("lpips_net", "clip_model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{dashed(name)} must be a non-empty name or path, got {getattr(self, name)!r}")

    @property
    def metric_list(self) -> list[str]:
        """The metric names of --metrics (`mabook.metrics.metric_names`: commas split, "clip_t" as "clip-t")."""
        from mabook.metrics import metric_names  # deferred: the metrics import torch, and building the parser imports this

        return metric_names(self.metrics)

    def perceptual(self) -> dict:
        """What `disruption.baseline` and `sweep.run` take for the perceptual metrics asked:
        {"lpips_net": ..., "clip_model": ...}, only those --metrics names."""
        names = self.metric_list
        return {**({"lpips_net": self.lpips_net} if "lpips" in names else {}),
                **({"clip_model": self.clip_model} if "clip-t" in names else {})}
