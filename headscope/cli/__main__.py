"""``python -m headscope.cli``."""

import sys

from headscope.cli.main import main

sys.exit(main())
