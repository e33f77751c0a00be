"""Joining the processes of a multi-host run (`jax.distributed.initialize`), before anything touches a device.

A plain single process does nothing here. A run is multi-process when the flags name a coordinator, when SLURM
or Open MPI started more than one task (JAX reads their variables itself), or when `cluster=True` asks JAX to
detect the cluster on its own (Cloud TPU pods, whose workers learn their peers from the metadata server).
Gloo carries the collectives between CPU processes, so the same code runs multi-process on one CPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")  # what JAX's detection reads


def cluster_tasks(env: Mapping[str, str] = os.environ) -> int:
    """How many processes a cluster launcher started for this job step (1 when none did)."""
    if all(k in env for k in _SLURM):  # under `srun`; a batch script's own shell lacks SLURM_STEP_NODELIST
        return int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "OMPI_MCA_orte_hnp_uri" in env:
        return int(env.get("OMPI_COMM_WORLD_SIZE", "1"))
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")  # set on GKE TPU pods
    return len(hosts.split(",")) if hosts else 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cluster: bool = False,
) -> bool:
    """Joins a multi-process run when one is asked for or detected; returns whether it did.

    Explicit arguments override what JAX detects; with none, JAX detects SLURM, Open MPI and Cloud TPU.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not (explicit or cluster or cluster_tasks() > 1):
        return False
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:  # e.g. "mpi", chosen by the user
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; accelerators use theirs
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
