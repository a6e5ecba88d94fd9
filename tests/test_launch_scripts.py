"""The cluster launch scripts, run for real against stand-ins for the cluster tools.

launch/slurm_gpu.sbatch under a fake `srun` that starts its tasks on this machine with the
variables SLURM gives them (JAX's own SLURM detection then finds the coordinator and ranks), and
launch/tpu_pod.sh under a fake `gcloud` whose workers are directories here: the scripts' own
logic (task layout, mesh flags, create-or-reuse, copying the repository, quoting the arguments
through ssh) runs unchanged, and each ends in a 2-process pretraining job that checkpoints.
"""

import json
import os
import pathlib
import socket
import stat
import subprocess

import pytest
from repo import ROOT

from data_pipelines.modalities import MODALITIES
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax.training import metric_writers

PYTHON = ROOT / ".venv" / "bin" / "python"
# Rehearsals of a pod launch (minutes of 2-process jobs each): `make test-long`, not `make test`.
pytestmark = [pytest.mark.multiprocess, pytest.mark.long, pytest.mark.timeout(900)]

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: every task on this machine, with the environment SLURM gives a task.
set -euo pipefail
echo "srun $*" >> "$FAKE_LOG"
per_node=1
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks-per-node=*) per_node="${1#*=}" ;; esac
  shift
done
ntasks=$((per_node * SLURM_NNODES))
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) SLURM_NTASKS=$ntasks \
  SLURM_NTASKS_PER_NODE=$per_node SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=$SLURM_NNODES \
    "$@" > "$FAKE_LOG.task$i" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud stand-in for `compute tpus tpu-vm`: a pod of $FAKE_WORKERS workers, each a home
# directory under $FAKE_POD; ssh runs the command in every worker at once, as the TPU runtime
# would, with the coordinator variables a pod's metadata would give JAX.
set -euo pipefail
echo "gcloud $*" >> "$FAKE_LOG"
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || exit 2
verb="$4"
shift 4
case "$verb" in
  describe) [[ -f "$FAKE_POD/state" ]] && cat "$FAKE_POD/state" || exit 1 ;;
  create) mkdir -p "$FAKE_POD"; echo READY > "$FAKE_POD/state"
          for ((w = 0; w < FAKE_WORKERS; w++)); do mkdir -p "$FAKE_POD/worker$w"; done ;;
  scp) source="$1"; target="${2#*:}"
       for ((w = 0; w < FAKE_WORKERS; w++)); do cp "$source" "$FAKE_POD/worker$w/${target#/tmp/}"; done ;;
  ssh) command=""
       for a in "$@"; do [[ "$a" == --command=* ]] && command="${a#--command=}"; done
       pids=()
       for ((w = 0; w < FAKE_WORKERS; w++)); do
         ( cd "$FAKE_POD/worker$w"; command="${command//\/tmp\/mermed.tar.gz/$FAKE_POD/worker$w/mermed.tar.gz}"
           HOME="$FAKE_POD/worker$w" MERMED_COORDINATOR="127.0.0.1:$FAKE_PORT" MERMED_NUM_PROCESSES=$FAKE_WORKERS \
           MERMED_PROCESS_ID=$w bash -c "$command" > "$FAKE_POD/worker$w.log" 2>&1 ) &
         pids+=("$!")
       done
       status=0
       for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
       exit $status ;;
  *) exit 2 ;;
esac
"""


def _free_port(candidates: range | None = None) -> int | None:
    for port in candidates or (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    return None


def _tool(directory: pathlib.Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("launch_data")
    write_demo_data(out, images_per_modality=16, size=40, seed=0, shard_size=8)
    return repr(tuple(str(out / f"demo_{m}") for m in MODALITIES))


def _pretrain_args(workdir: pathlib.Path, data_dirs: str) -> list[str]:
    overrides = {"data.dirs": data_dirs, "max_steps": 2, "log_every_steps": 1, "checkpoint.every_steps": 2,
                 "crops.num_local": 2, "model.depth": 1, "global_batch": 16, "mesh.shape": "(1,-1,1)",
                 "mesh.dcn_shape": "(2,1,1)"}
    return ["--config=configs/demo_cpu.py", f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def _env(tmp_path: pathlib.Path, bin_dir: pathlib.Path, **extra: str) -> dict:
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "calls.log"),
               XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               MERMED_CPU_COLLECTIVES="gloo", PYTHONPATH="", **extra)
    for key in ("PYTEST_CURRENT_TEST", "JAX_COMPILATION_CACHE_DIR"):
        env.pop(key, None)
    return env


def _assert_trained(workdir: pathlib.Path) -> dict:
    config = json.loads((workdir / "config.json").read_text())
    assert (workdir / "checkpoints" / "2").is_dir()
    records = metric_writers.read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # host 0 alone writes metrics
    return config


def test_slurm_script_runs_one_task_per_node_across_two_nodes(tmp_path, data_dirs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "srun", FAKE_SRUN)
    first = 65535 - 2**12 + 1  # JAX's SLURM detection: coordinator port = first + job id % 4096
    port = _free_port(range(first + 1000, first + 2**12))
    if port is None:
        pytest.skip("no free port in the range JAX's SLURM detection uses")
    job_id = port - first
    env = _env(tmp_path, bin_dir, SLURM_JOB_ID=str(job_id), SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1",
               SLURM_SUBMIT_DIR=str(ROOT), VENV=str(ROOT / ".venv"))
    workdir = tmp_path / "run"
    done = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), *_pretrain_args(workdir, data_dirs)],
                          env=env, capture_output=True, text=True, timeout=600)
    tasks = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("calls.log.task*")))
    assert done.returncode == 0, done.stderr[-2000:] + tasks
    assert "--ntasks-per-node=1 --gpus-per-task=1" in (tmp_path / "calls.log").read_text()
    config = _assert_trained(workdir)
    # the script made each task (a node here) one DCN granule; the data axis crosses them
    assert (config["mesh"]["granule"], config["mesh"]["processes_per_granule"]) == ("process", 1)
    task0 = (tmp_path / "calls.log.task0").read_text()
    assert "'data': 2, 'fsdp': 2, 'tensor': 1}; the process of each device: [[[0], [0]], [[1], [1]]]" in task0


def test_tpu_pod_script_creates_copies_and_runs_on_every_worker(tmp_path, data_dirs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "gcloud", FAKE_GCLOUD)
    pod = tmp_path / "pod"
    env = _env(tmp_path, bin_dir, FAKE_POD=str(pod), FAKE_WORKERS="2", FAKE_PORT=str(_free_port()),
               TPU_NAME="test-pod", ZONE="us-central2-b", ACCELERATOR="v4-16", SKIP_INSTALL="1")
    # SKIP_INSTALL: the workers get this machine's environment instead of a pip install
    for w in range(2):
        (pod / f"worker{w}" / "mermed-jax").mkdir(parents=True)
        (pod / f"worker{w}" / "mermed-jax" / ".venv").symlink_to(ROOT / ".venv")
    workdir = tmp_path / "run dir"  # a space: the arguments must survive ssh's shell
    done = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), *_pretrain_args(workdir, data_dirs)],
                          env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-3000:] for p in sorted(pod.glob("worker*.log")))
    assert done.returncode == 0, done.stderr[-2000:] + logs
    calls = (tmp_path / "calls.log").read_text()
    assert "tpu-vm create test-pod --accelerator-type=v4-16" in calls and "--zone=us-central2-b" in calls
    for w in range(2):  # each worker ran the committed tree it was sent
        assert (pod / f"worker{w}" / "mermed-jax" / "mermed_jax" / "pretrain.py").is_file()
    _assert_trained(workdir)
    assert "tpu_pod: reusing" not in done.stderr
    # a second launch finds the pod READY and reuses it (and resumes: nothing left to train)
    again = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), *_pretrain_args(workdir, data_dirs)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "tpu_pod: reusing test-pod" in again.stderr, again.stderr[-2000:]
