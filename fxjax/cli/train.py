"""Trains a head on a pre-trained backbone from a config file.

    fxjax train --config quickstart --workdir runs/quickstart [--config.a.b=value ...]
    python -m launch.train --config configs/quickstart.py --workdir runs/quickstart     # the same, from a clone

--config takes a Python file with get_config() or a shipped config's name (`fxjax config show quickstart`
lists every key, its default and what it means); --config.KEY=VALUE overrides any key.

Rerunning the same command on the same workdir resumes from its last checkpoint. Exit status: 0 done,
1 training diverged (NaN/Inf loss), 2 bad input, 75 preempted by SIGTERM or Ctrl-C (checkpoint saved; rerun to
resume), 130 Ctrl-C before training started.

Multi-host: every process runs the same command. Under SLURM (`launch/slurm.sbatch`) or Open MPI nothing more is
needed; on a Cloud TPU pod add `--distributed` (`launch/tpu_pod.sh`); elsewhere name the coordinator:

    python -m launch.train ... --coordinator_address 10.0.0.1:1234 --num_processes 2 --process_id 0   # host 0
    python -m launch.train ... --coordinator_address 10.0.0.1:1234 --num_processes 2 --process_id 1   # host 1
"""

from __future__ import annotations

import logging
import sys

from fxjax.cli.config import split_overrides
from fxjax.cli.main import command_parser, input_error

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM with a checkpoint saved; rerun to resume


def parse_args(
    argv: list[str],
    *,
    workdir_required: bool = True,
    command: str = "train",
    doc: str = __doc__,
    workdir_help: str = "run directory (created; resumed if it has checkpoints)",
):
    parser = command_parser(command, doc)
    parser.add_argument("--config", required=True, help="Python file with get_config(), or a shipped config's name")
    parser.add_argument("--workdir", required=workdir_required, help=workdir_help)
    parser.add_argument("--coordinator_address", help="host:port of process 0, for a multi-process run")
    parser.add_argument("--num_processes", type=int, help="processes in a multi-process run")
    parser.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes - 1")
    parser.add_argument(
        "--distributed", action="store_true", help="join a multi-process run that JAX detects itself (Cloud TPU pods)"
    )
    args, rest = parser.parse_known_args(argv)
    return args, split_overrides(parser, rest)


def start(args) -> bool:
    """Joins a multi-process run if there is one, then sets up logging; → whether this is process 0."""
    import jax

    from fxjax.parallel import distributed

    # Before anything asks JAX for its devices; a plain single process skips it.
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, cluster=args.distributed)
    primary = jax.process_index() == 0  # only process 0 logs and reports; every process works
    # What a run does goes to stdout; stderr carries only warnings and the one-line error of a refused input.
    info, problems = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    problems.setLevel(logging.WARNING)
    logging.basicConfig(
        level=logging.INFO if primary else logging.WARNING, format="%(message)s", handlers=[info, problems]
    )
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return primary


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    primary = start(args)
    from fxjax import config as config_lib
    from fxjax.heads.engine import NonFiniteLossError
    from fxjax.runs import experiment
    from fxjax.runs.rundir import WorkdirBusyError

    try:
        config = config_lib.load_config(args.config, overrides)
        summary = experiment.run(config, args.workdir)
    except experiment.Preempted as err:
        print(str(err), file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # before training started (loading, extraction): nothing of the run to save
        print("interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, AttributeError, WorkdirBusyError) as err:
        return input_error(err)
    if not primary:
        return 0
    speed = summary["images_per_second"]  # None when a resumed run had no step left to train
    print(
        f"test_accuracy={summary['test_accuracy']:.4f} val_accuracy={summary['val_accuracy']:.4f} "
        f"best_step={summary['best_step']} train_seconds={summary['train_seconds']:.1f} "
        f"images_per_second={'n/a' if speed is None else f'{speed:.0f}'} workdir={args.workdir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
