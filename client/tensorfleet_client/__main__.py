"""``python -m tensorfleet_client``: the same as ``tensorfleet-client``."""

import sys

from .cli import main

sys.exit(main())
