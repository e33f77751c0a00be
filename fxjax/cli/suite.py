"""Runs a benchmark suite: backbones × datasets × protocols into one table (suite.json, suite.md, suite.html).

    fxjax suite --config offline --workdir runs/suite_offline [--config.key=value ...]
    python -m launch.suite --config configs/suites/offline.py --workdir runs/suite_offline   # from a clone

--config takes a suite file with get_config() (configs/suites/: offline, vtab1k, clip_benchmark, by name or path);
--config.KEY=VALUE overrides a suite key, typed as its default: backbones, datasets, protocols, image_size, seed,
data_dir, overrides.<protocol>.<setting> (e.g. --config.overrides.dinov2_knn.k=10), run.<run key> (e.g.
--config.run.eval_batch_size=64).

Features are extracted once per (backbone, dataset) through the feature cache. Each (backbone, dataset, protocol)
cell is written to WORKDIR/cells/ when it finishes: rerunning the same command after a kill reruns only the
unfinished cells; adding backbones, datasets or protocols adds cells; a change that would alter what a finished
cell means (protocol settings, image size, seed, splits) is refused. Exit status: 0 done, 2 bad input,
130 Ctrl-C (finished cells are kept; rerun to continue).
"""

from __future__ import annotations

import sys

from fxjax.cli.main import input_error
from fxjax.cli.train import parse_args, start


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(
        sys.argv[1:] if argv is None else argv,
        command="suite",
        doc=__doc__,
        workdir_help="suite directory (created; a rerun continues with its unfinished cells)",
    )
    primary = start(args)
    from fxjax import config as config_lib
    from fxjax.runs import suite as suite_lib
    from fxjax.runs.rundir import WorkdirBusyError

    try:
        config = config_lib.load_config_file(str(suite_lib.find_suite(args.config)))
        for key, value in overrides:
            suite_lib.suite_override(config, key, value)
        summary = suite_lib.run_suite(config, args.workdir)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue with the unfinished cells", file=sys.stderr)
        return 130
    except (ValueError, OSError, AttributeError, WorkdirBusyError) as err:
        return input_error(err)
    if primary:
        print(suite_lib.suite_markdown(summary).split("\n## ")[0].rstrip())
        print(f"{len(summary['cells'])} cells; workdir={args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
