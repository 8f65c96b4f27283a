"""`python -m pi_peft.cli ...` == `pi-peft ...`."""

import sys

from . import main

sys.exit(main())
