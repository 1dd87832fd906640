"""``python -m backend`` = ``conjure-backend`` (serve | generate | jobs | keys)."""

import sys

from backend.cli import main

if __name__ == "__main__":
    sys.exit(main())
