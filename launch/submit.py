"""Submits `launch.train` to Slurm from Python (submitit), as `launch/slurm.sbatch` does from the shell.

    python -m launch.submit --config configs/quickstart.py --workdir runs/quickstart \\
        [--nodes 2 --tasks_per_node 8 --gpus_per_node 8 --cpus_per_task 12 --partition gpu --time_min 240] \\
        [--logs DIR] [--wait] [--config.a.b=value ...]

One task per GPU, every task running the same training command; each task joins the others through JAX's
SLURM detection (`fxjax.parallel.distributed`), exactly as under the sbatch file, so the same rules hold:
every task sees all of its node's GPUs (no --gpus-per-task), config.batch_size is global, the workdir and
`--logs` must be on a filesystem every node shares. Slurm sends SIGTERM 120 s before the time limit: each
task saves a checkpoint and exits 75; rerun the same command to resume. With `--wait` the exit status is
the worst task's (0 when all succeeded); without it the job id is printed and the command returns at once.
"""

from __future__ import annotations

import argparse
import sys


def run_task(train_argv: list[str]) -> int:
    """What each Slurm task runs (pickled by reference, so `launch` must be importable on the nodes)."""
    from launch import train

    return train.main(train_argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Python file with get_config()")
    parser.add_argument("--workdir", required=True, help="run directory on a filesystem every node shares")
    parser.add_argument("--logs", default="slurm-logs/%j", help="submitit's folder for job files and logs")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--tasks_per_node", type=int, default=1, help="one per GPU")
    parser.add_argument("--gpus_per_node", type=int, default=0)
    parser.add_argument("--cpus_per_task", type=int, default=1)
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    parser.add_argument("--time_min", type=int, default=240, help="time limit in minutes")
    parser.add_argument("--wait", action="store_true", help="wait for the job; exit with its tasks' status")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if not o.startswith("--config.") or "=" not in o]
    if bad:
        parser.error(f"unrecognised argument {bad[0]!r}; overrides look like --config.optimizer.learning_rate=0.01")

    import submitit

    executor = submitit.SlurmExecutor(folder=args.logs)
    executor.update_parameters(
        job_name="fxjax",
        nodes=args.nodes,
        ntasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time_min,
        signal_delay_s=120,
        additional_parameters={"signal": "TERM@120"},  # launch.train checkpoints on SIGTERM, not USR2
        **({"gpus_per_node": args.gpus_per_node} if args.gpus_per_node else {}),
        **({"partition": args.partition} if args.partition else {}),
    )
    job = executor.submit(run_task, ["--config", args.config, "--workdir", args.workdir, *overrides])
    print(f"submitted job {job.job_id}; logs in {job.paths.folder}", flush=True)
    if not args.wait:
        return 0
    try:
        codes = job.results()  # one per task
    except submitit.core.utils.UncompletedJobError as err:
        print(f"error: job {job.job_id} did not complete: {err}", file=sys.stderr)
        return 1
    return max(codes, key=lambda c: (c != 0, c))


if __name__ == "__main__":
    sys.exit(main())
