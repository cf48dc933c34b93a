"""`python -m ppow_plugin.cli ...` = `ppow ...` (what torchrun and the deepspeed launcher start)."""

import sys

from ppow_plugin.cli import main

sys.exit(main())
