"""`python -m fastdecode ...`: the same command line as the `fastdecode` script."""
import sys

from .cli import main

sys.exit(main())
