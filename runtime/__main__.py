import sys

from lmspec.runtime.cli.main import main

sys.exit(main())
