"""Writes a run's report.html, or compares several runs side by side.

python -m launch.report runs/quickstart                       # → runs/quickstart/report.html
python -m launch.report runs/a runs/b [--out comparison]      # → comparison/comparison.html
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="run directories; two or more are compared")
    parser.add_argument("--out", help="where a comparison is written (default: ./comparison)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.out is not None and len(args.workdirs) == 1:
        parser.error("--out is for comparisons; a single run's report is written into its workdir")
    from fxjax.runs import report

    try:
        if len(args.workdirs) == 1:
            page = report.write_report(args.workdirs[0])
        else:
            page = report.compare_runs(args.workdirs, args.out or "comparison")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
