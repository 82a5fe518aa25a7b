"""`python -m mabook ...` is the `mabook` command (and `accelerate launch -m mabook sweep ...` needs it)."""

import sys

from mabook.cli import main

sys.exit(main())
