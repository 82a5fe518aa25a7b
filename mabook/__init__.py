"""mabook: massive activations and attention sinks in Diffusion Transformers.

`import mabook` stays light: submodules that pull in torch/diffusers load on first use.
"""

__all__ = ["load", "adapter_for"]


def __getattr__(name):
    # PEP 562 lazy attributes: `mabook.load` imports mabook.models (and diffusers) only when used.
    if name in ("load", "adapter_for"):
        from mabook import models

        return getattr(models, name)
    raise AttributeError(f"module 'mabook' has no attribute {name!r}")
