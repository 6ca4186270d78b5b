"""``python -m nlnet.cli``: the ``nlnet`` command."""

import sys

from nlnet.cli import main

sys.exit(main())
