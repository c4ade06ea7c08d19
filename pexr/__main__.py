"""`python -m pexr ...`: the `pexr` command line (see `pexr.cli`)."""

from pexr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
