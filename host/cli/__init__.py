"""The ``plugin-host`` command line (Typer).

The CLI is the one place that configures logging and installs signal handlers; the
library never does either.
"""

from __future__ import annotations

import sys

# Importing a command module registers its commands; --help lists them in this order.
from . import serving as serving

# isort: split
from . import publishing as publishing

# isort: split
from . import keys as keys

# isort: split
from . import calls as calls

# isort: split
from . import rollouts as rollouts

# isort: split
from . import fleet as fleet

# isort: split
from . import triggers as triggers

# isort: split
from ._common import app as app
from ._common import configure_logging as configure_logging
from ._common import fail as fail

__all__ = ("app", "configure_logging", "fail", "main")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # Ctrl+C before the daemon took over signals
        sys.exit(130)
