"""`python -m fxq` runs the command line."""
import sys

from fxq.cli import main

sys.exit(main())
