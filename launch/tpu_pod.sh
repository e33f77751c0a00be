#!/bin/bash
# Runs the same `launch.train` command on every worker of a Cloud TPU pod slice (one process per host).
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/vit_b16_cifar10.py /mnt/shared/runs/vit \
#       --config.mesh.fsdp=4
#
# Every worker needs this repository at ~/fxjax with its dependencies installed (e.g. once:
#   gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command "git clone ... fxjax && pip install ...")
# `--distributed` makes launch.train call jax.distributed.initialize(), which finds the other workers and the
# coordinator through the TPU metadata server. The workdir must be a filesystem all workers mount (e.g. NFS,
# Filestore or gcsfuse): Orbax writes each checkpoint from every host. config.batch_size is global.
# Optional: FXJAX_DIR (default fxjax, relative to the home directory), PYTHON (default python3).

set -euo pipefail
if [[ $# -lt 2 || -z "${TPU:-}" || -z "${ZONE:-}" ]]; then
  echo "usage: TPU=name ZONE=zone launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi

remote="cd ${FXJAX_DIR:-fxjax} && ${PYTHON:-python3} -m launch.train --distributed"
for arg in --config "$1" --workdir "$2" "${@:3}"; do
  remote+=" $(printf '%q' "$arg")"
done
exec gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote"
