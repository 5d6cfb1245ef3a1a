"""``r1-launch ... cluster=slurm``: check the config against Slurm, render the job script, submit it.

The resolved config is saved as ``<run_dir>/config.yaml`` and the job script, rendered from ``slurm/job.sbatch.j2``
with Jinja2, as ``<run_dir>/job.sbatch``; ``sbatch`` submits it (``cluster.slurm.dry_run=true``: render only).
Everything the job reads is an absolute path on ``cluster.slurm.shared_dir``, so nothing depends on the submitting
shell's directory.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from r1.config.validate import ConfigError

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
    s = cfg.cluster.slurm
    shared = Path(s.shared_dir).expanduser() if s.shared_dir else None
    for key in ("run_dir", "cache_dir"):
        value = Path(str(cfg[key])).expanduser()
        if not value.is_absolute() and shared is not None:
            value = shared / value
        cfg[key] = str(value.absolute())
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
    if not _TIME.match(str(s.time)):
        out.append(f"cluster.slurm.time={s.time!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS")
    if s.train_nodes < 1 or s.rollout_nodes < 1:
        out.append("cluster.slurm.train_nodes and rollout_nodes must be >= 1 (each pool has nodes of its own)")
    for pool, workers, nodes in (("trainer", t, s.train_nodes), ("rollout", r, s.rollout_nodes)):
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


def render(cfg, config_path: Path) -> str:
    import jinja2

    s = cfg.cluster.slurm
    # (Jinja's comments would start at bash's "${#array[@]}": the template has none, so they are moved out of the way)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, comment_start_string="<#--", comment_end_string="--#>")
    env.filters["q"] = lambda value: shlex.quote(str(value))
    setup = list(s.setup) or [f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"]
    return env.get_template("job.sbatch.j2").render(
        job_name=f"r1-{cfg.name}", partition=s.partition, account=s.account, qos=s.qos, time=s.time,
        train_nodes=s.train_nodes, rollout_nodes=s.rollout_nodes, cpus_per_node=s.cpus_per_node,
        gpus_per_node=s.gpus_per_node, mem=s.mem, extra_sbatch=list(s.extra_sbatch), setup=setup,
        run_dir=cfg.run_dir, config_path=str(config_path), tag_prefix=POOL_TAG, tag_units=TAG_UNITS)


def submit(cfg) -> tuple[Path, str | None]:
    """Check, save the config, render and (unless dry_run) submit. Returns (script path, job id or None)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    on_shared_dir(cfg)
    found = problems(cfg)
    if found:
        raise ConfigError("cluster=slurm:\n- " + "\n- ".join(found))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(cfg))
    script = run_dir / "job.sbatch"
    script.write_text(render(cfg, config_path))
    if cfg.cluster.slurm.dry_run:
        return script, None
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not on PATH: submit from a Slurm login node (or use cluster.slurm.dry_run=true)")
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
