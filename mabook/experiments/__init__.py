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

`VERBS` maps a verb to its module; `mabook.cli` only parses, loads the model and reports errors.
"""

from mabook.experiments import cluster, discover, disrupt, sinks, transport

VERBS = {m.Config.NAME: m for m in (discover, disrupt, cluster, sinks, transport)}
SWEEPS = {name: m for name, m in VERBS.items() if getattr(m.Config, "SWEEP", False)}  # what `mabook sweep` runs
