"""``r1-launch ... cluster=slurm``: check the config against Slurm, render the job script, submit it.

The resolved config is saved as ``<run_dir>/config.yaml`` and the job script, rendered from ``slurm/job.sbatch.j2``
with Jinja2, as ``<run_dir>/job.sbatch``; ``sbatch`` submits it (``cluster.dry_run=true``: render only).
Everything the job reads is an absolute path on ``cluster.slurm.shared_dir``, so nothing depends on the submitting
shell's directory.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from launcher.slurm_job import REQUEUE_EXIT
from r1.config.public import public
from r1.config.schema import under
from r1.config.validate import ConfigError
from r1.plan.check import refuse_unfit

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
POOL_TAG = "r1_pool_"  # node resource naming a node's pool: r1_pool_train / r1_pool_rollout
TAG_UNITS = 1000  # of it per node; each bundle of a pool asks for 1
# Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")


class SlurmError(RuntimeError):
    """sbatch refused the job: its own message, verbatim."""


def on_shared_dir(cfg) -> None:
    """Make run_dir and cache_dir absolute, on the shared directory (relative ones are taken relative to it), and
    the model/data paths absolute (relative to where r1-launch ran). In place."""
    shared = str(Path(cfg.cluster.slurm.shared_dir).expanduser()) if cfg.cluster.slurm.shared_dir else None
    for key in ("run_dir", "cache_dir"):
        cfg[key] = str(Path(under(shared, str(cfg[key]))).expanduser().absolute())
    for section, key in (("model", "path"), ("data", "train_path"), ("data", "eval_path")):
        if cfg[section].get(key):
            cfg[section][key] = str(Path(cfg[section][key]).expanduser().absolute())


def problems(cfg) -> list[str]:
    """What would make the job fail or misbehave, found before submission."""
    s, t, r = cfg.cluster.slurm, cfg.trainer, cfg.rollout
    out = []
    if not s.partition:
        out.append("cluster.slurm.partition is required (sinfo lists the partitions)")
    if not s.shared_dir:
        out.append("cluster.slurm.shared_dir is required: a directory every node of the job sees (run_dir and "
                   "cache_dir go under it)")
    elif not Path(s.shared_dir).is_dir():
        out.append(f"cluster.slurm.shared_dir={s.shared_dir} is not a directory on this machine")
    else:
        shared = Path(s.shared_dir).resolve()
        for key in ("run_dir", "cache_dir"):
            if not Path(cfg[key]).resolve().is_relative_to(shared):
                out.append(f"{key}={cfg[key]} is outside cluster.slurm.shared_dir={s.shared_dir}: the other nodes "
                           "would not see it; put it under the shared directory (or make it relative)")
    out += value_problems(cfg)
    if not _TIME.match(str(s.time)):
        out.append(f"cluster.slurm.time={s.time!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS")
    elif not 0 < s.signal_before_s < time_limit_s(str(s.time)):
        out.append(f"cluster.slurm.signal_before_s={s.signal_before_s} must be > 0 and shorter than the time limit "
                   f"({s.time}): else every attempt would checkpoint and requeue at once")
    if s.max_failed_attempts < 1:
        out.append(f"cluster.slurm.max_failed_attempts={s.max_failed_attempts} must be >= 1")
    for job in s.after:
        if not re.fullmatch(r"\d+(_\d+)?", str(job)):
            out.append(f"cluster.slurm.after: {job!r} is not a Slurm job id (sbatch --parsable prints them)")
    colocated = r.placement == "colocated"  # the rollout workers share the training ranks' nodes and GPUs
    if colocated and s.rollout_nodes != 0:
        out.append(f"rollout.placement=colocated runs the engines on the training pool's nodes: set "
                   f"cluster.slurm.rollout_nodes=0 (got {s.rollout_nodes}: those nodes would sit idle)")
    elif s.train_nodes < 1 or (s.rollout_nodes < 1 and not colocated):
        out.append("cluster.slurm.train_nodes and rollout_nodes must be >= 1 (each pool has nodes of its own)")
    if colocated:  # a training rank's bundle holds its engine's CPUs too (and shares its GPU)
        t = SimpleNamespace(num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker + r.cpus_per_worker,
                            gpus_per_worker=t.gpus_per_worker)
    pools = [("trainer", t, s.train_nodes)] + ([] if colocated else [("rollout", r, s.rollout_nodes)])
    for pool, workers, nodes in pools:
        if workers.gpus_per_worker > s.gpus_per_node:
            out.append(f"{pool}.gpus_per_worker={workers.gpus_per_worker} is more than a node has "
                       f"(cluster.slurm.gpus_per_node={s.gpus_per_node})")
        elif nodes >= 1:
            per_node = min(s.cpus_per_node // max(workers.cpus_per_worker, 1e-9),
                           s.gpus_per_node // workers.gpus_per_worker if workers.gpus_per_worker else float("inf"))
            if workers.num_workers > per_node * nodes:
                out.append(f"{pool}.num_workers={workers.num_workers} do not fit on {nodes} node(s) of "
                           f"{s.cpus_per_node} CPUs / {s.gpus_per_node} GPUs at {workers.cpus_per_worker} CPUs / "
                           f"{workers.gpus_per_worker} GPUs each")
    return out


# What may go into the job script's "#SBATCH" lines: sbatch reads them itself (no shell), one option per line, so a
# newline would end the option and start a line the batch shell runs. Each value is refused unless it is plainly one.
_NAME = re.compile(r"[A-Za-z0-9._+-]{1,100}")
_NAMES = re.compile(r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*")  # partitions may be a list: "a100,h100"
_MEM = re.compile(r"\d+[KMGT]?")
_OPTION = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*(=[^\x00-\x1f\x7f]*)?")
_PATH = re.compile(r"[^\x00-\x20\x7f%]+")  # (no whitespace: --output=<run_dir>/...; no %: Slurm's patterns)


def value_problems(cfg) -> list[str]:
    """Values that would not be one plain token in the job script: refused, naming the key and what may be used."""
    s, out = cfg.cluster.slurm, []
    checks = [("name", cfg.name, _NAME, "letters, digits and . _ + - (it becomes the job name r1-<name>)"),
              ("cluster.slurm.partition", s.partition, _NAMES, "partition names: letters, digits, . _ - and commas"),
              ("cluster.slurm.account", s.account, _NAME, "letters, digits and . _ + -"),
              ("cluster.slurm.qos", s.qos, _NAME, "letters, digits and . _ + -"),
              ("cluster.slurm.mem", s.mem, _MEM, "a number with an optional unit K, M, G or T ('0': all of it)"),
              ("run_dir", cfg.run_dir, _PATH, "a path without whitespace, control characters or %")]
    for key, value, pattern, allowed in checks:
        if value is not None and not pattern.fullmatch(str(value)):
            out.append(f"{key}={str(value)!r} cannot go into the job script: use {allowed}")
    for line in s.extra_sbatch:
        if not _OPTION.fullmatch(str(line)):
            out.append(f"cluster.slurm.extra_sbatch: {str(line)!r} is not one sbatch option: write each as "
                       "'--option' or '--option=value' on its own, without control characters")
    out += [f"cluster.slurm.setup: {str(line)!r} holds a NUL byte" for line in s.setup if "\x00" in str(line)]
    out += [f"cluster.slurm.container_mounts: {str(m)!r} must be one 'src:dst' without spaces, commas or NUL"
            for m in s.container_mounts if re.search(r"[\s,\x00]", str(m))]
    return out


def time_limit_s(time: str) -> int:
    """Seconds of a Slurm ``--time`` (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]])."""
    days, _, rest = time.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, sec = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + sec
    if len(parts) == 3:  # HH:MM:SS
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)  # minutes, or MM:SS


def partition_problems(cfg) -> list[str]:
    """The config against the partition's nodes as ``sinfo`` reports them (partition, GPUs, CPUs, node count)."""
    s = cfg.cluster.slurm
    rows = [line.split("|") for line in _slurm("sinfo", "-h", "-p", str(s.partition), "-o", "%G|%c|%D").splitlines()
            if line.strip()]
    if not rows:
        listed = sorted({line.strip().rstrip("*") for line in _slurm("sinfo", "-h", "-o", "%P").splitlines()})
        return [(f"cluster.slurm.partition={s.partition} is not a partition of this cluster "
                 f"(sinfo lists: {', '.join(listed)})")]
    gpus = max(gpus_of(gres) for gres, _, _ in rows)
    cpus = max(int(c.rstrip("+")) for _, c, _ in rows)
    nodes = sum(int(n) for _, _, n in rows)
    out = []
    if s.gpus_per_node > gpus:
        out.append(f"cluster.slurm.gpus_per_node={s.gpus_per_node} is more than a node of partition {s.partition} "
                   f"has ({gpus}; sinfo's GRES: {', '.join(sorted({g for g, _, _ in rows}))})")
    if s.cpus_per_node > cpus:
        out.append(f"cluster.slurm.cpus_per_node={s.cpus_per_node} is more than a node of partition {s.partition} "
                   f"has ({cpus})")
    if s.train_nodes + s.rollout_nodes > nodes:
        out.append(f"the job asks for {s.train_nodes + s.rollout_nodes} nodes (cluster.slurm.train_nodes + "
                   f"rollout_nodes); partition {s.partition} has {nodes}")
    return out


def dependency_problems(cfg) -> list[str]:
    """Each job of ``cluster.slurm.after`` is known to Slurm and can still succeed (Slurm takes an unknown id as
    satisfied, and would start this job at once)."""
    out = []
    for job in map(str, cfg.cluster.slurm.after):
        queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, check=False)
        if queued.returncode == 0 and queued.stdout.strip():
            continue
        ended = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "State"], capture_output=True,
                               text=True, check=False).stdout.split()
        if not ended:
            out.append(f"cluster.slurm.after: Slurm job {job} is neither queued nor in the accounting")
        elif ended[-1] != "COMPLETED":
            out.append(f"cluster.slurm.after: Slurm job {job} ended {ended[-1]}; this job would never start")
    return out


def gpus_of(gres: str) -> int:
    """GPUs per node in sinfo's %G: "gpu:8", "gpu:h100:8(S:0-1)", "gpu:a100:4,gpu:h100:4", "(null)"."""
    return sum(int(m) for m in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres))


PORT_LOW, PORT_HIGH = 20000, 32768  # above Ray's default worker ports (10002-19999), below Linux's ephemeral range
SERVICE_PORTS = 10  # per Ray node: GCS, client server, node manager, object manager, metrics, agents (slots 0-8)


def worker_ports(cfg) -> int:
    """Worker ports each Ray node of the job needs: every Ray worker process (a task worker or an actor) binds one.
    Ray keeps up to ``num_cpus`` task workers per node and starts one more per actor; r1 places at most two actors
    per GPU (a training rank and a colocated engine), a health monitor and reward-model replicas, and the driver
    and Ray's own helpers take a few: CPUs + 2 x GPUs + 32 to spare. (The old fixed 10 gave "no available ports"
    on any real node.)"""
    s = cfg.cluster.slurm
    return s.cpus_per_node + 2 * s.gpus_per_node + 32


def render(cfg, config_path: Path) -> str:
    import jinja2

    s = cfg.cluster.slurm
    # (Jinja's comments would start at bash's "${#array[@]}": the template has none, so they are moved out of the way)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, comment_start_string="<#--", comment_end_string="--#>")
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template("job.sbatch.j2").render(
        job_name=f"r1-{cfg.name}", partition=s.partition, account=s.account, qos=s.qos, time=s.time,
        train_nodes=s.train_nodes, rollout_nodes=s.rollout_nodes, cpus_per_node=s.cpus_per_node,
        gpus_per_node=s.gpus_per_node, mem=s.mem, extra_sbatch=list(s.extra_sbatch),
        setup_script="" if s.container_image else str(setup_script(cfg)),
        run_dir=cfg.run_dir, config_path=str(config_path), tag_prefix=POOL_TAG, tag_units=TAG_UNITS,
        signal_before_s=s.signal_before_s, after=[str(job) for job in s.after], requeue_exit=REQUEUE_EXIT,
        service_ports=SERVICE_PORTS, worker_ports=worker_ports(cfg), port_low=PORT_LOW, port_high=PORT_HIGH,
        container=container_options(cfg), in_step=f"bash {shlex.quote(str(step_script(cfg)))} " if s.container_image else "")


def container_options(cfg) -> str:
    """pyxis options of every srun step (a leading space), or "" without a container."""
    s = cfg.cluster.slurm
    if not s.container_image:
        return ""
    mounts = [f"{s.shared_dir}:{s.shared_dir}", *s.container_mounts]
    return (f" --container-image={shlex.quote(str(s.container_image))} "
            f"--container-mounts={shlex.quote(','.join(mounts))} --no-container-mount-home")


def step_script(cfg) -> Path:
    """``<run_dir>/step.sh``: what every step runs in the container - the setup lines, then its command."""
    return Path(cfg.run_dir) / "step.sh"


def setup_script(cfg) -> Path:
    """``<run_dir>/setup.sh``: the setup lines, readable by the job's user only (they are where keys get exported);
    the batch shell, or in a container every step, sources it. Nothing else holds them."""
    return Path(cfg.run_dir) / "setup.sh"


def write_setup_scripts(cfg) -> None:
    s = cfg.cluster.slurm
    lines = list(s.setup) or ([] if s.container_image else  # (the submitting Python's environment)
                              [f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"])
    path = setup_script(cfg)
    path.unlink(missing_ok=True)  # (created afresh: 0600 from the first byte, whoever owned an old one)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# cluster.slurm.setup (r1-launch): sourced first by the job; kept out of job.sbatch and config.yaml\n"
                + "".join(line + "\n" for line in lines))
    if s.container_image:
        step = ["#!/bin/bash", "# every srun step of the job, in its container: the setup lines, then the command",
                "set -e", f"source {shlex.quote(str(path))}", 'exec "$@"']
        step_script(cfg).write_text("\n".join(step) + "\n")


def submit(cfg) -> tuple[Path, str | None]:
    """Check, save the config, render and (unless dry_run) submit. Returns (script path, job id or None)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    on_shared_dir(cfg)
    found = problems(cfg)
    if found:
        raise ConfigError("cluster=slurm:\n- " + "\n- ".join(found))
    refuse_unfit(cfg)  # (r1.plan: a pool that cannot fit is refused here, not after hours in the queue)
    dry_run = cfg.cluster.dry_run
    if not dry_run:
        if shutil.which("sbatch") is None:
            raise SlurmError("sbatch is not on PATH: submit from a Slurm login node (or use "
                             "cluster.dry_run=true)")
        found = partition_problems(cfg) + dependency_problems(cfg)
        if found:
            raise ConfigError("cluster=slurm, checked against the cluster:\n- " + "\n- ".join(found))
    run_dir = Path(cfg.run_dir)
    if not run_dir.exists():  # checkpoints, logs and setup.sh: the job's user and group only (the job: umask 027)
        run_dir.mkdir(parents=True)
        run_dir.chmod(0o750)
    config_path = run_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(public(cfg)))
    write_setup_scripts(cfg)
    script = run_dir / "job.sbatch"
    script.write_text(render(cfg, config_path))
    if dry_run:
        return script, None
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job:\n{done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    (run_dir / JOB_ID_FILE).write_text(job_id + "\n")
    return script, job_id


JOB_ID_FILE = "slurm_job_id"  # in the run directory: what `r1-launch status/cancel run_dir=...` act on


def job_of(run_dir: str) -> str:
    path = Path(run_dir).expanduser() / JOB_ID_FILE
    if not path.is_file():
        raise SlurmError(f"{run_dir} has no {JOB_ID_FILE}: no Slurm job was submitted for this run directory")
    return path.read_text().strip()


def _slurm(*command: str) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SlurmError(f"{command[0]} failed:\n{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def status(run_dir: str) -> str:
    """The run's job (state, elapsed time, nodes: from the queue while it is there, else from Slurm's accounting,
    which records a job a little after it starts) and the run's last progress line."""
    job = job_of(run_dir)
    # (squeue fails for a job it has forgotten: that only means "not in the queue")
    table = subprocess.run(["squeue", "-j", job, "-o", "%.12i %.24j %.10T %.10M %.6D %R"], capture_output=True,
                           text=True, check=False).stdout
    if len(table.strip().splitlines()) < 2:  # left the queue
        table = _slurm("sacct", "-X", "-j", job, "-o", "JobID,JobName%24,State,Elapsed,ExitCode,NodeList%30")
    progress = [line for line in _read_lines(Path(run_dir).expanduser() / f"slurm-{job}.out")
                if line.startswith(("step ", "eval @"))]
    return table.rstrip() + ("\n" + progress[-1] if progress else "")


def cancel(run_dir: str) -> str:
    job = job_of(run_dir)
    _slurm("scancel", job)
    return job


def _read_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.is_file() else []
