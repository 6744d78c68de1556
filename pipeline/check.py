"""One check of `imgpipe doctor`: its name, its status and one line of detail."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail", "skip"]
OK: Status = "ok"
WARN: Status = "warn"
FAIL: Status = "fail"
SKIP: Status = "skip"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: `detail` is one line, never a secret."""

    name: str
    status: Status
    detail: str
