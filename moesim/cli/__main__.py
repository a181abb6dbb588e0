"""``python -m moesim.cli ...``: the same as the ``moesim`` console script."""

import sys

from moesim.cli import main

if __name__ == "__main__":
    sys.exit(main())
