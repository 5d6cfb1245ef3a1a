"""``cluster=slurm``: the job script rendered from the config, errors before submission, and a real run on a real
local Slurm cluster (tests/slurm/slurm-up.sh: munge, slurmctld, slurmdbd, 2 slurmd nodes on loopback addresses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.slurm import SlurmError, submit
from r1.config.validate import ConfigError
from tests.conftest import REPO, TINY, compose

SLURM_DIR = REPO / "tests" / "slurm"


def _slurm_cfg(shared: Path, *extra: str):
    return compose([*TINY, "cluster=slurm", "cluster.slurm.partition=debug", f"cluster.slurm.shared_dir={shared}",
                    "run_dir=runs/a", "cache_dir=cache", *extra])


def test_a_big_job_script_has_its_sbatch_lines_node_split_and_pool_tags(tmp_path):
    cfg = _slurm_cfg(tmp_path, "cluster.slurm.train_nodes=16", "cluster.slurm.rollout_nodes=8",
                     "cluster.slurm.gpus_per_node=8", "cluster.slurm.cpus_per_node=96", "cluster.slurm.account=rl",
                     "cluster.slurm.qos=high", "cluster.slurm.time=2-00:00:00", "cluster.slurm.mem=1800G",
                     "cluster.slurm.extra_sbatch=[--exclusive]", "cluster.slurm.dry_run=true",
                     "cluster.slurm.setup=['source /opt/r1/.venv/bin/activate']",
                     "trainer.num_workers=128", "trainer.gpus_per_worker=1", "trainer.cpus_per_worker=8",
                     "rollout.num_workers=64", "rollout.gpus_per_worker=1", "rollout.cpus_per_worker=8")
    script, job = submit(cfg)
    assert job is None and script == tmp_path / "runs" / "a" / "job.sbatch"
    text = script.read_text()
    sbatch = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=r1-r1_zero_tiny", "#SBATCH --partition=debug", "#SBATCH --account=rl",
        "#SBATCH --qos=high", "#SBATCH --nodes=24", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=96",
        "#SBATCH --gpus-per-node=8", "#SBATCH --mem=1800G", "#SBATCH --time=2-00:00:00",
        f"#SBATCH --output={tmp_path}/runs/a/slurm-%j.out", "#SBATCH --exclusive",
    ]
    assert "source /opt/r1/.venv/bin/activate" in text
    # nodes 0-15 are the training pool's, 16-23 the rollout pool's; each node's Ray carries its pool's tag
    assert 'pool_of() { if [ "$1" -lt 16 ]; then echo train; else echo rollout; fi; }' in text
    assert 'echo "{\\"r1_pool_$(pool_of "$1")\\": 1000}"' in text
    assert text.count("--resources=\"$(resources") == 2 and "--num-gpus=8" in text
    assert text.rstrip().endswith(f"python -m launcher.slurm_job {tmp_path}/runs/a/config.yaml")
    saved = (tmp_path / "runs" / "a" / "config.yaml").read_text()
    assert f"run_dir: {tmp_path}/runs/a" in saved and f"cache_dir: {tmp_path}/cache" in saved


@pytest.mark.parametrize("overrides, message", [
    (["cluster.slurm.partition=null"], "cluster.slurm.partition is required"),
    (["cluster.slurm.time=1h"], "cluster.slurm.time='1h' is not a Slurm time"),
    (["cluster.slurm.gpus_per_node=8", "trainer.gpus_per_worker=16"],
     "trainer.gpus_per_worker=16.0 is more than a node has (cluster.slurm.gpus_per_node=8)"),
    (["run_dir=/elsewhere/run"], "run_dir=/elsewhere/run is outside cluster.slurm.shared_dir"),
    (["rollout.num_workers=9", "cluster.slurm.cpus_per_node=8"], "rollout.num_workers=9 do not fit on 1 node(s)"),
], ids=["no-partition", "bad-time", "gpus", "run-dir-outside", "too-many-workers"])
def test_bad_slurm_settings_fail_before_submission(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        submit(_slurm_cfg(tmp_path, *overrides))
    assert not (tmp_path / "runs" / "a" / "job.sbatch").exists()


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real 2-node Slurm cluster on this machine for the module's tests, always stopped afterwards."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local Slurm cluster needs root and apt-get (tests/slurm/slurm-up.sh)")
    up = subprocess.run(["bash", str(SLURM_DIR / "slurm-up.sh")], capture_output=True, text=True, timeout=900,
                        env={**os.environ, "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "2",
                             "SLURM_LOCAL_GPUS": "2"}, check=False)
    if up.returncode != 0:
        pytest.fail(f"slurm-up.sh failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
    yield
    subprocess.run(["bash", str(SLURM_DIR / "slurm-down.sh")], capture_output=True, timeout=300, check=False)


def _launch(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.main", *overrides], capture_output=True, text=True,
                          timeout=300, check=False)


def _submit_tiny(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    """Submit the tiny experiment through ``r1-launch`` to the local cluster (2 nodes of 2 CPUs and 2 fake GPUs);
    (run dir on the shared dir, job id)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    done = _launch(*TINY, "cluster=slurm", "cluster.slurm.partition=debug", f"cluster.slurm.shared_dir={shared}",
                   f"run_dir=runs/{name}", "cache_dir=cache", "cluster.slurm.cpus_per_node=2",
                   "cluster.slurm.gpus_per_node=2", "eval.at_start=false", *extra)
    assert done.returncode == 0, done.stderr
    return shared / "runs" / name, done.stdout.split("submitted Slurm job ")[1].split()[0]


def _wait_for(job: str, timeout_s: float = 600) -> str:
    """The job's final state in Slurm's accounting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True,
                             text=True, check=False).stdout.split()
        if out and out[0] not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
            return out[0]
        time.sleep(2)
    raise AssertionError(f"Slurm job {job} did not finish in {timeout_s} s")


@pytest.mark.slow
def test_the_tiny_experiment_runs_as_a_slurm_job_with_each_pool_on_its_own_node(slurm_cluster, tmp_path):
    run_dir, job = _submit_tiny(tmp_path, "e2e", "cluster.slurm.time=00:15:00", "trainer.total_steps=2",
                                "algo.group_size=4", "algo.prompts_per_step=4", "eval.every_steps=0",
                                "checkpoint.every_steps=1")
    state = _wait_for(job)
    assert state == "COMPLETED", (run_dir / f"slurm-{job}.out").read_text()[-5000:]
    nodes = json.loads((run_dir / "nodes.json").read_text())
    ips = {n: subprocess.run(["getent", "ahostsv4", n], capture_output=True, text=True, check=True).stdout.split()[0]
           for n in ("node1", "node2")}
    assert nodes == {"train": [ips["node1"]], "rollout": [ips["node2"], ips["node2"]]}  # one node per pool
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "reward/mean" in x]
    assert steps == [1, 2]
    assert (run_dir / "checkpoints" / "step_000002" / "policy" / "model.safetensors").exists()


@pytest.mark.slow
def test_slurms_own_refusal_is_shown_verbatim(slurm_cluster, tmp_path):
    with pytest.raises(SlurmError, match="sbatch refused the job:\n.*invalid partition"):
        submit(_slurm_cfg(tmp_path, "cluster.slurm.partition=nosuch", "cluster.slurm.cpus_per_node=2",
                          "cluster.slurm.gpus_per_node=2"))


@pytest.mark.slow
def test_status_and_cancel_act_on_the_runs_job(slurm_cluster, tmp_path):
    run_dir, job = _submit_tiny(tmp_path, "long", "trainer.total_steps=100000")
    shown = _launch("status", f"run_dir={run_dir}")
    assert shown.returncode == 0 and job in shown.stdout and ("RUNNING" in shown.stdout or "PENDING" in shown.stdout)
    cancelled = _launch("cancel", f"run_dir={run_dir}")
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"cancelled Slurm job {job}"
    assert _wait_for(job, timeout_s=120) == "CANCELLED"
    assert "CANCELLED" in _launch("status", f"run_dir={run_dir}").stdout
    missing = _launch("status", f"run_dir={tmp_path}")
    assert missing.returncode == 2 and "no Slurm job was submitted for this run directory" in missing.stderr
