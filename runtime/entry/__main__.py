"""`python -m lmspec` and `torchrun -m lmspec`: the command line."""
import sys

from lmspec.runtime.cli.main import main

sys.exit(main())
