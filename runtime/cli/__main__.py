"""`python -m lmspec.runtime.cli`: the command line."""
import sys

from lmspec.runtime.cli.main import main

sys.exit(main())
