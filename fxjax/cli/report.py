"""Writes a run's report.html, or compares several runs side by side.

fxjax report runs/quickstart                                  # → runs/quickstart/report.html
fxjax report runs/a runs/b [--out comparison]                 # → comparison/comparison.html
python -m launch.report runs/quickstart                       # the same, from a clone
"""

from __future__ import annotations

import sys

from fxjax.cli.main import command_parser, print_result


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("report", __doc__)
    parser.add_argument("workdirs", nargs="+", help="run directories; two or more are compared")
    parser.add_argument("--out", help="where a comparison is written (default: ./comparison)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.out is not None and len(args.workdirs) == 1:
        parser.error("--out is for comparisons; a single run's report is written into its workdir")
    from fxjax.runs import report

    if len(args.workdirs) == 1:
        return print_result(lambda: report.write_report(args.workdirs[0]))
    return print_result(lambda: report.compare_runs(args.workdirs, args.out or "comparison"))


if __name__ == "__main__":
    sys.exit(main())
