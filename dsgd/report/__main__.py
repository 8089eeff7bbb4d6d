"""``python -m dsgd.report RUN_OR_DIR... -o OUT [--title T] [--by KEY...] [--metrics M...]
[--reference F]``: write OUT/REPORT.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsgd.errors import UserError
from dsgd.report.report import make_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsgd.report", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories or folders holding runs")
    p.add_argument("-o", "--out", required=True, help="output folder for REPORT.md and plots/")
    p.add_argument("--title", default="dsgd report")
    p.add_argument("--by", nargs="+", default=None, help="dotted config keys defining a group")
    p.add_argument("--metrics", nargs="+", default=None, help="curves to draw (default: all)")
    p.add_argument("--reference", default=None,
                   help="JSON file {group label: paper final test accuracy in %%}")  # fmt: skip
    args = p.parse_args(argv)
    try:
        reference = None
        if args.reference:
            try:
                reference = json.loads(Path(args.reference).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read --reference {args.reference}: {e}") from None
        path = make_report(args.runs, args.out, args.title, by=args.by, reference=reference,
                           metrics=args.metrics)  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
