"""`python -m rlver_jax.cli` is `rlver-jax`."""

import sys

from rlver_jax.cli.main import main

sys.exit(main())
