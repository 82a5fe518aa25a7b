"""mabook: massive activations and attention sinks in Diffusion Transformers.

`import mabook` stays light: `mabook.load`, `mabook.adapter_for` and the submodules
(`mabook.probe`, `mabook.discovery`, ...) import torch and diffusers only when first used.
"""

import importlib
import pkgutil

__all__ = ["load", "adapter_for"]
# every public submodule, read from the package itself (a hand-kept list goes stale)
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name):
    # PEP 562 lazy attributes: the heavy imports happen on first use, not on `import mabook`.
    if name in ("load", "adapter_for"):
        return getattr(importlib.import_module("mabook.models"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mabook.{name}")
    raise AttributeError(f"module 'mabook' has no attribute {name!r}")
