"""``python -m vitssl`` is the ``vitssl`` command."""

import sys

from vitssl.cli import main

sys.exit(main())
