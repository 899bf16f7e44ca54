"""``python -m raysight``: the ``raysight`` command (see raysight/cli.py)."""

from raysight.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
