"""`python -m pedclip ...`: the `pedclip` command (see `pedclip.cli`)."""

import sys

from pedclip.cli import main

if __name__ == "__main__":
    sys.exit(main())
