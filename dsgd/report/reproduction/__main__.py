"""``python -m dsgd.report.reproduction OUT``: REPORT.md, verdicts.json and figures from
OUT/results.json (what ``dsgd reproduce`` wrote), without training or measuring anything."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsgd.report.reproduction.markdown import write_report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dsgd.report.reproduction OUT", file=sys.stderr)
        return 2
    path = Path(args[0]) / "results.json"
    if not path.is_file():
        print(f"error: {path} not found; run dsgd reproduce --out {args[0]} first",
              file=sys.stderr)
        return 2
    print(write_report(json.loads(path.read_text()), args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
