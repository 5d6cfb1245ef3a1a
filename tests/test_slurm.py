"""``cluster=slurm``: the job script rendered from the config, errors before submission, and a real run on a real
local Slurm cluster (tests/slurm/slurm-up.sh: munge, slurmctld, slurmdbd, 2 slurmd nodes on loopback addresses)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launcher.slurm import SlurmError, submit
from r1.config.validate import ConfigError
from tests import fake_nvml
from tests.conftest import REPO, TINY, compose

SLURM_DIR = REPO / "tests" / "slurm"


def _slurm_cfg(shared: Path, *extra: str):
    return compose([*TINY, "cluster=slurm", "cluster.slurm.partition=debug", f"cluster.slurm.shared_dir={shared}",
                    "run_dir=runs/a", "cache_dir=cache", *extra])


def test_a_big_job_script_has_its_sbatch_lines_node_split_and_pool_tags(tmp_path):
    cfg = _slurm_cfg(tmp_path, "cluster.slurm.train_nodes=16", "cluster.slurm.rollout_nodes=8",
                     "cluster.slurm.gpus_per_node=8", "cluster.slurm.cpus_per_node=96", "cluster.slurm.account=rl",
                     "cluster.slurm.qos=high", "cluster.slurm.time=2-00:00:00", "cluster.slurm.mem=1800G",
                     "cluster.slurm.extra_sbatch=[--exclusive]", "cluster.dry_run=true",
                     "cluster.slurm.setup=['source /opt/r1/.venv/bin/activate']", "cluster.slurm.after=[101,102]",
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
        f"#SBATCH --output={tmp_path}/runs/a/slurm-%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600", "#SBATCH --dependency=afterok:101:102", "#SBATCH --kill-on-invalid-dep=yes",
        "#SBATCH --exclusive",
    ]
    assert f"source {tmp_path}/runs/a/setup.sh " in text and "activate" not in text  # (the setup lines' file)
    # nodes 0-15 are the training pool's, 16-23 the rollout pool's; each node's Ray carries its pool's tag
    assert 'pool_of() { if [ "$1" -lt 16 ]; then echo train; else echo rollout; fi; }' in text
    assert 'echo "{\\"r1_pool_$(pool_of "$1")\\": 1000}"' in text
    assert text.count("--resources=\"$(resources") == 2 and "--num-gpus=8" in text
    assert f"python -m launcher.slurm_job {tmp_path}/runs/a/config.yaml &" in text
    assert "if [ $rc -eq 75 ]; then" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text  # REQUEUE_EXIT
    saved = (tmp_path / "runs" / "a" / "config.yaml").read_text()
    assert f"run_dir: {tmp_path}/runs/a" in saved and f"cache_dir: {tmp_path}/cache" in saved
    assert "resume: true" in saved  # on by default under Slurm: a requeued job continues


def test_setup_lines_exporting_a_key_reach_the_job_through_a_private_file_only(tmp_path):
    """``cluster.slurm.setup`` is where a key gets exported: it goes to ``setup.sh`` (0600, sourced by the job), not
    into job.sbatch (Slurm keeps and shows it), config.yaml or what W&B records; the run directory is the job
    user's and group's (0750, and the job runs with umask 027)."""
    from r1.run_context import RunContext

    key = "wandb_v1_0123456789abcdef"
    cfg = _slurm_cfg(tmp_path, "cluster.dry_run=true", f"cluster.slurm.setup=['export WANDB_API_KEY={key}', "
                     "'export R1_FROM_SETUP=yes']")
    script, _ = submit(cfg)
    run_dir = tmp_path / "runs" / "a"
    setup = run_dir / "setup.sh"
    assert oct(setup.stat().st_mode & 0o777) == "0o600" and oct(run_dir.stat().st_mode & 0o777) == "0o750"
    for name in ("job.sbatch", "config.yaml"):
        assert key not in (run_dir / name).read_text(), name
    assert "\numask 027   #" in script.read_text()
    # Ray's token: drawn per attempt into the job's environment, never written down
    assert "export RAY_AUTH_MODE=token\nRAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom" in script.read_text()
    assert "RAY_AUTH_MODE=disabled" not in script.read_text()
    # what the job's driver records: the saved config, loaded, through the run context (config.yaml, W&B's config)
    saved = OmegaConf.load(run_dir / "config.yaml")
    saved.run_dir = str(tmp_path / "driver")
    with RunContext(saved) as run:
        assert key not in json.dumps(run.config_dict) and key not in (tmp_path / "driver" / "config.yaml").read_text()
    # the batch shell gets the lines: the script's own source line, run
    line = next(x for x in script.read_text().splitlines() if x.startswith("source "))
    done = subprocess.run(["bash", "-c", f'{line}\nprintf "%s|%s" "$WANDB_API_KEY" "$R1_FROM_SETUP"'],
                          capture_output=True, text=True, check=True)
    assert done.stdout == f"{key}|yes"


def _ports_of(script: str, job_id: int, hosts: tuple[str, str]) -> list[tuple[list[int], range]]:
    """Run the job script's port block in bash for two nodes on machines ``hosts``: per node, its service ports (the head's GCS
    and client ports included) and its worker port range."""
    block = script[script.index("# --- ports"):script.index("# --- end ports")]
    scontrol = (f'scontrol() {{ [ "$4" = a ] && echo "NodeName=a NodeHostName={hosts[0]} State=IDLE" '
                f'|| echo "NodeName=b NodeHostName={hosts[1]} State=IDLE"; }}\n')  # (scontrol show node -o <n>)
    stub = f"SLURM_JOB_ID={job_id}; nodes=(a b)\n{scontrol}{block}\necho \"$base $((base+1))\"; ports 0; ports 1\n"
    out = subprocess.run(["bash", "-c", stub], capture_output=True, text=True, check=True).stdout.split("\n")
    nodes = []
    for i, line in enumerate(out[1:3]):
        values = dict(re.findall(r"--([a-z-]+)=(\d+)", line))
        workers = range(int(values.pop("min-worker-port")), int(values.pop("max-worker-port")) + 1)
        service = [int(v) for v in values.values()] + ([int(p) for p in out[0].split()] if i == 0 else [])
        nodes.append((service, workers))
    return nodes


@pytest.mark.parametrize("hosts", [("gpu-a01", "gpu-a02"), ("box", "box")], ids=["machines", "one_machine"])
def test_a_96_cpu_node_gets_enough_worker_ports_and_none_in_the_ephemeral_range(tmp_path, hosts):
    """Ray binds a port per worker process (up to num_cpus task workers, one per actor): a 96-CPU, 8-GPU node needs
    well over 96. Every port of every job lies in [20000, 32768): above Ray's own default worker ports, below
    Linux's ephemeral range (32768-60999), where an outgoing connection could take it first. Nodes sharing a
    host (a test cluster) get disjoint blocks."""
    cfg = _slurm_cfg(tmp_path, "cluster.slurm.cpus_per_node=96", "cluster.slurm.gpus_per_node=8", "cluster.dry_run=true",
                     "trainer.num_workers=8", "trainer.gpus_per_worker=1", "rollout.num_workers=8",
                     "rollout.gpus_per_worker=1")
    text = submit(cfg)[0].read_text()
    low, high = 32768, 0
    for job_id in (0, 1, 57, 4242, 99_999, 123_456_789):
        nodes = _ports_of(text, job_id, hosts)
        for service, workers in nodes:
            assert len(workers) >= 96 + 2 * 8, "fewer worker ports than the node's CPUs and actors"
            assert not set(service) & set(workers) and len(set(service)) == len(service)
            low, high = min(low, *service, workers[0]), max(high, *service, workers[-1])
        if hosts[0] == hosts[1]:  # one machine: the two Ray nodes must not share a port
            (s0, w0), (s1, w1) = nodes
            assert not (set(s0) | set(w0)) & (set(s1) | set(w1))
    assert 20000 <= low and high < 32768
    for line in (x for x in text.splitlines() if x.lstrip().startswith("srun")):  # every step gets the node's CPUs
        assert line.lstrip().startswith("srun $step")
    assert 'step="--nodes=1 --ntasks=1 --overlap --cpus-per-task=96"' in text


def test_with_a_container_every_step_runs_in_it_with_the_setup_lines(tmp_path):
    cfg = _slurm_cfg(tmp_path, "cluster.dry_run=true", "cluster.slurm.container_image='nvcr.io#nvidia/pytorch:25.01-py3'",
                     "cluster.slurm.container_mounts=[/data:/data]",
                     "cluster.slurm.setup=['export R1_IN_STEP=yes']")
    text = submit(cfg)[0].read_text()
    step_sh = tmp_path / "runs" / "a" / "step.sh"
    assert (f'step="--nodes=1 --ntasks=1 --overlap --cpus-per-task=32 --container-image=\'nvcr.io#nvidia/pytorch:'
            f'25.01-py3\' --container-mounts={tmp_path}:{tmp_path},/data:/data --no-container-mount-home"') in text
    runs = [x.strip() for x in text.splitlines() if x.lstrip().startswith("srun")]
    assert len(runs) == 4 and all(x.startswith('srun $step -w "$') and f"bash {step_sh} " in x for x in runs)
    assert runs[2].endswith(f"python -m launcher.slurm_job {tmp_path}/runs/a/config.yaml &")  # the driver too
    assert f"python -m launcher.slurm_job --ended $rc $terminated {tmp_path}/runs/a/config.yaml" in runs[3]
    assert "R1_IN_STEP" not in text and "export PATH=" not in text  # nothing of the host's in the batch shell
    assert "\nsource " not in text and "R1_IN_STEP" in (tmp_path / "runs" / "a" / "setup.sh").read_text()
    # step.sh: the setup lines, then the step's command with its arguments as given
    done = subprocess.run(["bash", str(step_sh), "bash", "-c", 'printf "%s|" "$R1_IN_STEP" "$@"', "_", "a b", "c"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == "yes|a b|c|"


def test_r1_launch_says_where_the_run_and_its_wandb_run_will_be(tmp_path):
    done = _launch(*[o for o in TINY if not o.startswith("logger=")], "logger.mode=offline", "cluster=slurm",
                   "cluster.slurm.partition=debug", f"cluster.slurm.shared_dir={tmp_path}", "run_dir=runs/w",
                   "cache_dir=cache", "cluster.dry_run=true")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "w"
    run_id = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]  # the id every attempt's W&B run resumes
    assert done.stdout.splitlines() == [
        f"r1-launch: rendered {run_dir}/job.sbatch (cluster.dry_run=true: not submitted)",
        f"  W&B     r1, run {run_id} (offline, in {run_dir}/wandb: upload with wandb sync)"]


@pytest.mark.parametrize("overrides, message", [
    (["cluster.slurm.partition=null"], "cluster.slurm.partition is required"),
    (["cluster.slurm.time=1h"], "cluster.slurm.time='1h' is not a Slurm time"),
    (["cluster.slurm.gpus_per_node=8", "trainer.gpus_per_worker=16"],
     "trainer.gpus_per_worker=16.0 is more than a node has (cluster.slurm.gpus_per_node=8)"),
    (["run_dir=/elsewhere/run"], "run_dir=/elsewhere/run is outside cluster.slurm.shared_dir"),
    (["rollout.num_workers=9", "cluster.slurm.cpus_per_node=8"], "rollout.num_workers=9 do not fit on 1 node(s)"),
    (["cluster.slurm.time=01:00:00", "cluster.slurm.signal_before_s=3600"],
     "cluster.slurm.signal_before_s=3600 must be > 0 and shorter than the time limit (01:00:00)"),
    (["cluster.slurm.max_failed_attempts=0"], "cluster.slurm.max_failed_attempts=0 must be >= 1"),
    (["cluster.slurm.after=[12x]"], "cluster.slurm.after: '12x' is not a Slurm job id"),
    (["name='x\ntouch /tmp/pwned'"], "name='x\\ntouch /tmp/pwned' cannot go into the job script"),
    (["cluster.slurm.partition='debug --uid=0'"], "cluster.slurm.partition='debug --uid=0' cannot go into"),
    (["cluster.slurm.account='rl\nid'"], "cluster.slurm.account='rl\\nid' cannot go into the job script"),
    (["cluster.slurm.qos='a b'"], "cluster.slurm.qos='a b' cannot go into the job script"),
    (["cluster.slurm.mem=lots"], "cluster.slurm.mem='lots' cannot go into the job script"),
    (["cluster.slurm.extra_sbatch=['--exclusive\nrm -rf ~']"], "extra_sbatch: '--exclusive\\nrm -rf ~' is not one"),
    (["cluster.slurm.extra_sbatch=[exclusive]"], "extra_sbatch: 'exclusive' is not one sbatch option"),
    (["run_dir='runs/my run'"], "run_dir=.*my run' cannot go into the job script"),
], ids=["no-partition", "bad-time", "gpus", "run-dir-outside", "too-many-workers", "signal-after-limit",
        "no-attempts", "bad-dependency", "newline-in-name", "option-in-partition", "newline-in-account",
        "space-in-qos", "bad-mem", "newline-in-extra", "extra-not-an-option", "space-in-run-dir"])
def test_bad_slurm_settings_fail_before_submission(tmp_path, overrides, message):
    pattern = message if ".*" in message else re.escape(message)
    with pytest.raises(ConfigError, match=pattern):
        submit(_slurm_cfg(tmp_path, *overrides))
    assert not (tmp_path / "runs" / "a" / "job.sbatch").exists()


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real 2-node Slurm cluster on this machine for the module's tests, started from empty state (a controller
    that recovers jobs left by an earlier, killed session would keep the nodes allocated) and purged afterwards."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("the local Slurm cluster needs root and apt-get (tests/slurm/slurm-up.sh)")
    subprocess.run(["bash", str(SLURM_DIR / "slurm-down.sh"), "--purge"], capture_output=True, timeout=300,
                   check=False)
    up = subprocess.run(["bash", str(SLURM_DIR / "slurm-up.sh")], capture_output=True, text=True, timeout=900,
                        env={**os.environ, "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "2",
                             "SLURM_LOCAL_GPUS": "2"}, check=False)
    if up.returncode != 0:
        pytest.fail(f"slurm-up.sh failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
    yield
    subprocess.run(["bash", str(SLURM_DIR / "slurm-down.sh"), "--purge"], capture_output=True, timeout=300,
                   check=False)


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
    assert (shared / "runs" / name / ".hydra").is_dir() and not (REPO / "runs").exists()  # nothing in the cwd
    return shared / "runs" / name, done.stdout.split("submitted Slurm job ")[1].split()[0]


ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT"}


def _wait_for(job: str, timeout_s: float = 600) -> str:
    """The job's final state: from the controller's queue while it knows the job (it goes from NODE_FAIL through
    COMPLETING back to PENDING when it requeues one), else from Slurm's accounting."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                                check=False).stdout.split()
        if not queued:
            ended = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True,
                                   text=True, check=False).stdout.split()
            if ended and ended[0] not in ACTIVE:
                return ended[0]
        elif queued[0] not in ACTIVE:
            return queued[0]
        time.sleep(2)
    raise AssertionError(f"Slurm job {job} did not finish in {timeout_s} s")


def _sacct(job: str, fields: str) -> list[list[str]]:
    """One row per attempt of the job (-D: requeued attempts too)."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job, "-o", fields], capture_output=True, text=True,
                         check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def _log(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text(errors="replace")[-6000:] if path.exists() else "(no log)"


@pytest.mark.slow
def test_slurms_own_refusal_is_shown_verbatim(slurm_cluster, tmp_path):
    with pytest.raises(SlurmError, match="sbatch refused the job:\n.*Invalid feature specification"):
        submit(_slurm_cfg(tmp_path, "cluster.slurm.extra_sbatch=['--constraint=nosuch']", "cluster.slurm.cpus_per_node=2",
                          "cluster.slurm.gpus_per_node=2"))


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["cluster.slurm.partition=nosuch"], ("cluster.slurm.partition=nosuch is not a partition of this cluster "
                                         "(sinfo lists: debug)")),
    (["cluster.slurm.gpus_per_node=4", "cluster.slurm.cpus_per_node=2"],
     "cluster.slurm.gpus_per_node=4 is more than a node of partition debug has (2; sinfo's GRES: gpu:2)"),
    (["cluster.slurm.cpus_per_node=64"], ("cluster.slurm.cpus_per_node=64 is more than a node of partition debug "
                                         "has (2)")),
    (["cluster.slurm.train_nodes=2"], ("the job asks for 3 nodes (cluster.slurm.train_nodes + rollout_nodes); "
                                      "partition debug has 2")),
    (["cluster.slurm.after=[987654]"], "Slurm job 987654 is neither queued nor in the accounting"),
], ids=["partition", "gpus", "cpus", "nodes", "unknown-dependency"])
def test_the_config_is_checked_against_the_clusters_nodes_before_submission(slurm_cluster, tmp_path, overrides,
                                                                            message):
    base = ["cluster.slurm.cpus_per_node=2", "cluster.slurm.gpus_per_node=2"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        submit(_slurm_cfg(tmp_path, *base, *overrides))
    assert not (tmp_path / "runs" / "a" / "job.sbatch").exists()


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


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(x)["step"] for x in lines if "reward/mean" in x]


def _attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm_attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _until(what, timeout_s: float = 300, explain=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while not (found := what()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting\n{explain()}")
        time.sleep(0.5)
    return found


@pytest.mark.slow
def test_the_tiny_experiment_runs_as_a_slurm_job_and_resumes_after_preemption_and_node_failure(
        slurm_cluster, tmp_path):
    """The tiny experiment as a job on 2 nodes (after a job it depends on), one pool per node, interrupted four times
    by what ends jobs on real clusters: the preemption warning (SIGUSR1 to the batch shell, what
    ``--signal=B:USR1@s`` sends: the run checkpoints and the job requeues itself), SIGTERM to every process of the
    job (preemption without that warning, an admin: the Ray nodes end at once, the driver cannot checkpoint, and the
    job requeues itself from the latest complete checkpoint), the driver alone SIGKILLed (the OOM killer: a failed
    attempt, requeued while attempts are left), and a node failure (``--requeue``: no handler runs). Each attempt
    continues from the latest checkpoint; the run ends with every step once and no prompt group trained twice."""
    first = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 3"], capture_output=True,
                           text=True, check=True).stdout.strip()  # a stage before: the run starts once it succeeded
    total = 14
    run_dir, job = _submit_tiny(tmp_path, "requeue", "cluster.slurm.time=00:20:00", f"trainer.total_steps={total}",
                                "algo.group_size=4", "algo.prompts_per_step=4", "eval.every_steps=0",
                                "checkpoint.every_steps=1", f"cluster.slurm.after=[{first}]")
    explain = lambda: _log(run_dir, job)

    def moved_on(attempt: int) -> bool:
        """The attempt runs and has logged a step it trained itself: two past the checkpoint it resumed from (the
        attempt before may have logged one step past its last checkpoint, a line the resume drops)."""
        started = [a for a in _attempts(run_dir) if a["event"] == "start" and a["attempt"] == attempt]
        resumed = int(started[0]["resume_from"][-6:]) if started and started[0]["resume_from"] else 0
        return bool(started) and max(_steps(run_dir), default=0) > resumed + 1

    _until(lambda: moved_on(0), explain=explain)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # "time limit or preemption ahead"
    _until(lambda: moved_on(1), explain=explain)
    subprocess.run(["scancel", "--full", "--signal=TERM", job], check=True)  # every process of every step
    _until(lambda: moved_on(2), explain=explain)
    driver = subprocess.run(["pgrep", "-f", f"launcher.slurm_job {run_dir}/config.yaml"], capture_output=True,
                            text=True, check=True).stdout.split()
    subprocess.run(["kill", "-KILL", *driver], check=True)  # the driver alone, as the OOM killer would
    _until(lambda: moved_on(3), explain=explain)
    subprocess.run(["scontrol", "update", "nodename=node2", "state=down", "reason=r1-test"], check=True)
    subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], check=False)  # (may be back already)
    assert _wait_for(job) == "COMPLETED", explain()

    states = lambda: [row[0] for row in _sacct(job, "State")]
    # slurmdbd records an attempt a moment after the controller moved on: wait for the fifth row
    _until(lambda: len(states()) >= 5, explain=lambda: f"sacct: {states()}\n{explain()}", timeout_s=60)
    assert states() == ["REQUEUED", "REQUEUED", "REQUEUED", "NODE_FAIL", "COMPLETED"], explain()
    assert _sacct(job, "Start")[0][0] >= _sacct(first, "End")[0][0]  # ISO times: --dependency=afterok held it
    nodes = json.loads((run_dir / "nodes.json").read_text())
    ips = {n: subprocess.run(["getent", "ahostsv4", n], capture_output=True, text=True, check=True).stdout.split()[0]
           for n in ("node1", "node2")}
    assert nodes == {"train": [ips["node1"]], "rollout": [ips["node2"], ips["node2"]]}  # one node per pool
    assert (run_dir / "checkpoints" / f"step_{total:06d}" / "policy" / "model.safetensors").exists()
    starts = [a for a in _attempts(run_dir) if a["event"] == "start"]
    ends = {a["attempt"]: a for a in _attempts(run_dir) if a["event"] == "end"}  # (the last word on each)
    assert [a["attempt"] for a in starts] == [0, 1, 2, 3, 4]
    # the preempted attempt checkpointed exactly where it stopped and the next one resumed there
    assert ends[0]["outcome"] == "preempted" and starts[1]["resume_from"] == f"step_{ends[0]['step']:06d}"
    assert ends[1]["outcome"] == "terminated", ends  # requeued, and not counted as a failure
    assert ends[2]["outcome"] == "killed" and ends[2]["signal"] == "SIGKILL", ends  # counted: 1 of 3 allowed
    # killed with its node: no word from it (an attempt that counts as failed), or, where the driver outlived its
    # node's Ray processes for a moment (Slurm's SIGTERM to the steps left), the failure or the signal it saw: never
    # an end that claims it finished or checkpointed
    assert ends.get(3, {}).get("outcome") in (None, "failed", "stopped by SIGTERM"), ends
    resumed = [int(a["resume_from"][-6:]) for a in starts[1:]]
    assert resumed == sorted(resumed) and resumed[0] >= 2, starts  # each from the latest checkpoint, moving on
    assert ends[4] == {**ends[4], "outcome": "completed", "step": total}
    log = (run_dir / f"slurm-{job}.out").read_text(errors="replace")  # --open-mode=append: every attempt's output
    for step in resumed:
        assert f"at step {step} (policy version {step})" in log
    # the records of a run that was never interrupted: every step once, every group trained once
    assert _steps(run_dir) == list(range(1, total + 1))
    ledger = [json.loads(x) for x in (run_dir / "groups.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in ledger}) == list(range(1, total + 1))
    assert len({row["uid"] for row in ledger}) == len(ledger) == 4 * total
    assert len({(row["step"], row["prompt_index"]) for row in ledger}) == len(ledger)


@pytest.mark.slow
def test_a_canary_halt_ends_the_job_with_a_checkpoint_and_is_not_requeued(slurm_cluster, tmp_path):
    """The mismatch canary's fire drill on the cluster: version 2's push leaves a tensor out, the probe catches it,
    canary.action=stop checkpoints and exits 70 - the job ends FAILED at once (a restart would not cure it), its one
    attempt recorded as halted, while it had attempts left to requeue with."""
    run_dir, job = _submit_tiny(tmp_path, "halt", "trainer.total_steps=6", "algo.group_size=4",
                                "algo.prompts_per_step=4", "trainer.lr=1e-3", "canary.action=stop",
                                "canary.probe_threshold=1e-6", "canary.drill_from_version=2",
                                "canary.drill_skip_tensor=model.layers.0.self_attn.q_proj.weight",
                                "cluster.slurm.max_failed_attempts=3",
                                # (a graded reward: the untrained model's accuracy and format are all 0, no gradient)
                                "reward.terms=[{name: language, weight: 1.0}]")
    assert _wait_for(job) == "FAILED", _log(run_dir, job)
    assert [row[0] for row in _sacct(job, "State")] == ["FAILED"]  # never requeued
    [end] = [a for a in _attempts(run_dir) if a["event"] == "end"]
    assert (end["outcome"], end["signal"], end["step"]) == ("halted", "mismatch_probe", 2)
    assert (run_dir / "checkpoints" / "step_000002" / "driver_state.json").exists()


@pytest.mark.slow
def test_a_job_that_keeps_failing_gives_up_and_its_dependent_stage_is_cancelled(slurm_cluster, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    data = {name: shared / f"{name}.jsonl" for name in ("train", "eval")}
    for path in data.values():
        path.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    common = [*TINY, "cluster=slurm", "cluster.slurm.partition=debug", f"cluster.slurm.shared_dir={shared}",
              "cache_dir=cache", "cluster.slurm.cpus_per_node=2", "cluster.slurm.gpus_per_node=2"]
    done = _launch(*common, "run_dir=runs/fails", "cluster.slurm.max_failed_attempts=2", "data.generator=null",
                   f"data.train_path={data['train']}", f"data.eval_path={data['eval']}")
    assert done.returncode == 0, done.stderr
    job = done.stdout.split("submitted Slurm job ")[1].split()[0]
    data["train"].unlink()  # gone before the job starts: every attempt fails
    later = _launch(*common, "run_dir=runs/next", f"cluster.slurm.after=[{job}]")
    assert later.returncode == 0, later.stderr
    next_job = later.stdout.split("submitted Slurm job ")[1].split()[0]
    run_dir = shared / "runs" / "fails"
    assert _wait_for(job) == "FAILED", _log(run_dir, job)
    states = lambda: [row[0] for row in _sacct(job, "State")]
    _until(lambda: len(states()) >= 2, explain=lambda: f"sacct: {states()}", timeout_s=60)
    assert states() == ["REQUEUED", "FAILED"], _log(run_dir, job)
    outcomes = [(a["attempt"], a["outcome"]) for a in _attempts(run_dir) if a["event"] == "end"]
    assert outcomes == [(0, "failed"), (1, "failed")]
    assert "data.train_path" in _attempts(run_dir)[-1]["error"]
    assert _wait_for(next_job, timeout_s=120) == "CANCELLED"  # afterok can never be met: not left pending forever
    assert not (shared / "runs" / "next" / "slurm_attempts.jsonl").exists()  # it never ran


@pytest.mark.slow
def test_a_health_abort_requeues_the_job_without_the_sick_node(slurm_cluster, tmp_path, monkeypatch):
    """node2's first GPU reports an uncorrectable ECC error (a fake NVML in the job's environment, which sbatch
    passes on): the run checkpoints and exits 75, and the job script requeues the job with node2 excluded. A 2-node
    job with one node left waits in the queue."""
    script = tmp_path / "nvml.json"
    fake_nvml.write_script(script, {"gpus": 2, "faults": [
        {"node": "node2", "gpu": 0, "kind": "ecc_uncorrectable", "count": 1}]})
    monkeypatch.setenv("R1_NVML_MODULE", "tests.fake_nvml")
    monkeypatch.setenv("FAKE_NVML_SCRIPT", str(script))
    run_dir, job = _submit_tiny(tmp_path, "sick", "trainer.total_steps=100", "health.interval_s=0.5",
                                "algo.group_size=4", "algo.prompts_per_step=4")
    try:
        def requeued_without_node2() -> str | None:
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                                  check=False).stdout
            return show if "ExcNodeList=node2" in show and "JobState=PENDING" in show else None

        _until(requeued_without_node2, explain=lambda: _log(run_dir, job))
        [end] = [a for a in _attempts(run_dir) if a["event"] == "end"]
        assert (end["outcome"], end["signal"], end["node"], end["gpu"]) == ("aborted", "ecc_uncorrectable", "node2",
                                                                            0)
        assert (run_dir / "checkpoints" / f"step_{end['step']:06d}" / "driver_state.json").exists()
        assert (run_dir / f"slurm-{job}.exclude").read_text().strip() == "node2"
        assert f"r1: excluding node2 from Slurm job {job}" in _log(run_dir, job)
        [incident] = [json.loads(x) for x in (run_dir / "health" / "incidents.jsonl").read_text().splitlines()]
        assert (incident["node"], incident["uuid"]) == ("node2", "GPU-fake-node2-0")
        time.sleep(6)  # two scheduling passes: still waiting, never started on node2 again
        again = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout
        assert "JobState=PENDING" in again and "Restarts=1" in again, again
    finally:
        subprocess.run(["scancel", job], check=False)


@pytest.mark.slow
def test_a_pipeline_is_a_chain_of_dependent_jobs_that_a_failed_stage_cancels(slurm_cluster, tiny_model, tmp_path):
    """``+pipeline=r1 cluster=slurm``: finished stages are not submitted, every other stage is a job depending
    (afterok) on the one before. The first job, rejection sampling (a stage without training steps), completes; the
    next, a broken SFT stage, fails and Slurm cancels the rest."""
    from tests.test_pipeline import SMALL

    shared = tmp_path / "shared"
    for stage in ("cold_start", "reasoning_rl"):  # as finished stages leave them
        (shared / "pipe" / stage).mkdir(parents=True)
        (shared / "pipe" / stage / "stage.json").write_text("{}")
    (shared / "pipe" / "reasoning_rl" / "policy").symlink_to(tiny_model)
    done = _launch("+pipeline=r1", *TINY, *SMALL, "cluster=slurm", "cluster.slurm.partition=debug",
                   f"cluster.slurm.shared_dir={shared}", "pipeline.dir=pipe", "cache_dir=cache",
                   "cluster.slurm.cpus_per_node=2", "cluster.slurm.gpus_per_node=2",
                   "cluster.slurm.max_failed_attempts=1", 'pipeline.stages.3.overrides=["model.source=pretrained","model.path=/no/such/model"]')
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stage 1/7 cold_start finished already" in done.stdout and "stage 2/7 reasoning_rl finished" in done.stdout
    jobs = [line.split("Slurm job ")[1].split()[0].rstrip(":") for line in done.stdout.splitlines()
            if "Slurm job " in line]
    assert len(jobs) == 5
    for before, job in itertools.pairwise(jobs):
        show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
        assert re.search(rf"Dependency=afterok:{before}\b", show), show
    sampled = shared / "pipe" / "rejection_sampling"
    assert OmegaConf.load(sampled / "config.yaml").model.path == str(shared / "pipe" / "reasoning_rl" / "policy")
    # the base model (evaluated beside the stages) was built into the jobs' cache on the shared directory, not the cwd
    base = Path(OmegaConf.load(shared / "pipe" / "eval" / "config.yaml").eval.checkpoints[0])
    assert base.parent == shared / "cache" / "models" and (base / "config.json").is_file()

    assert _wait_for(jobs[0]) == "COMPLETED", _log(sampled, jobs[0])
    assert (sampled / "stage.json").is_file() and (sampled / "sft_data.jsonl").is_file()
    assert [a["outcome"] for a in _attempts(sampled) if a["event"] == "end"] == ["completed"]
    assert _wait_for(jobs[1]) == "FAILED", _log(shared / "pipe" / "sft", jobs[1])  # (its model is not there)
    for job in jobs[2:]:
        assert _wait_for(job, timeout_s=120) == "CANCELLED"


def test_colocated_engines_take_one_8_gpu_node_and_no_rollout_nodes(tmp_path):
    """rollout.placement=colocated on Slurm: one node, its 8 GPUs each shared by a training rank and an engine; the
    job asks for no rollout nodes (any would sit idle, so asking for one is refused)."""
    colocated = ["rollout.placement=colocated", "cluster.slurm.gpus_per_node=8", "cluster.slurm.cpus_per_node=32",
                 "trainer.num_workers=8", "rollout.num_workers=8", "trainer.gpus_per_worker=1",
                 "rollout.gpus_per_worker=1", "trainer.cpus_per_worker=2", "rollout.cpus_per_worker=2"]
    script, _ = submit(_slurm_cfg(tmp_path, *colocated, "cluster.slurm.rollout_nodes=0", "cluster.dry_run=true"))
    text = script.read_text()
    assert "#SBATCH --nodes=1" in text and "#SBATCH --gpus-per-node=8" in text
    with pytest.raises(ConfigError, match="set cluster.slurm.rollout_nodes=0"):
        submit(_slurm_cfg(tmp_path, *colocated, "cluster.dry_run=true"))
    with pytest.raises(ConfigError, match="trainer.num_workers=8 do not fit on 1 node"):  # 8 x (2 + 3) CPUs > 32
        submit(_slurm_cfg(tmp_path, *colocated, "cluster.slurm.rollout_nodes=0", "rollout.cpus_per_worker=3",
                          "cluster.dry_run=true"))
