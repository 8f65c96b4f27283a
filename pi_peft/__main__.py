"""`python -m pi_peft ...` == `pi-peft ...`."""

import sys

from .cli import main

sys.exit(main())
