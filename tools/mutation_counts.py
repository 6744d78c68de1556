"""Per-module counts of the last `make mutate` run, from mutmut's files in mutants/.

mutmut prints only totals; docs/mutation.md quotes this table.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut 3's exit codes per mutant (mutmut/stats.py); anything else is "other".
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          None: "not run"}
COLUMNS = ["generated", "killed", "survived", "timeout", "no tests", "not run", "other"]


def main(root: Path = Path("mutants")) -> int:
    metas = sorted(root.glob("**/*.py.meta"))
    if not metas:
        print(f"no mutmut results under {root}/", file=sys.stderr)
        return 1
    print("| module | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    total: Counter[str] = Counter()
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        counts = Counter(STATUS.get(code, "other") for code in codes)
        counts["generated"] = len(codes)
        total += counts
        module = str(meta.relative_to(root)).removesuffix(".meta")
        print(f"| {module} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
    print("| total | " + " | ".join(str(total[c]) for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
