"""`python -m closesync` is the same as the `closesync` command."""

import sys

from closesync.cli.main import main

sys.exit(main())
