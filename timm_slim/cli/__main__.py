"""``python -m timm_slim.cli``: the same as the ``timm-slim`` command."""

import sys

from . import main

sys.exit(main())
