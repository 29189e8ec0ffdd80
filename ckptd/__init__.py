"""ckptd: shared core (fragment model, layouts, planner, errors) and command-line tools."""

import logging

__version__ = "0.1.0"

logging.getLogger("ckptd").addHandler(logging.NullHandler())
