"""`python -m imgpipe ARGS...` runs the `imgpipe ARGS...` command."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional


def main(argv: Optional[Sequence[str]] = None) -> int:
    from workers.cli import main as command

    return command(argv)


if __name__ == "__main__":
    sys.exit(main())
