"""The `mabook` verbs: one module per experiment, each a config and a run function.

Every module here has the same three parts, top to bottom:

- ``Config``: the experiment's settings (`mabook.config`): defaults, help, one-line checks. The
  command line (`mabook VERB --help`), the sweep's command line (`mabook sweep VERB`) and the summary
  JSON's "settings" are made from it: a new default or a new option is an edit here, nowhere else;
- ``run(config, adapter, ...)``: the computation. discover, disrupt and sinks run as shards of
  `mabook.sweep` -- with one process when called directly, over accelerate's processes under
  ``accelerate launch``: one code path either way;
- ``write(config, result, out, record)``: the files in ``--out`` (the summary JSON last) and the
  lines the verb prints.

`VERBS` names each verb with its one-line help; `module(verb)` imports its module (only the verb a
command line names is imported, so ``mabook --help`` starts without torch). `mabook.cli` only
parses, loads the model and reports errors.
"""

from __future__ import annotations

import importlib

VERBS = {  # verb -> its one-line help; the module mabook.experiments.<verb> holds the rest
    "discover": "find massive channels: statistics + top-k table",
    "disrupt": "edit top-k vs control channels during generation; table of what changes",
    "cluster": "K-means masks from one tap and step (mask PNGs, IoU JSON)",
    "sinks": "find attention sinks; suppress them vs equal-budget random and bottom keys",
    "transport": "copy top-k channels of a source generation into a target; alpha strip",
}
SWEEPS = ("discover", "disrupt", "sinks")  # what `mabook sweep` runs (mabook.sweep: statistics, or baselines + conditions)


def module(verb: str):
    """The verb's module (`mabook.experiments.<verb>`)."""
    if verb not in VERBS:
        raise ValueError(f"unknown verb {verb!r}; allowed: {list(VERBS)}")
    return importlib.import_module(f"mabook.experiments.{verb}")
