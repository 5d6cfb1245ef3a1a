"""The config as it may be written down: in ``config.yaml``, a job's files, W&B's run config.

``cluster.slurm.setup`` is where users put ``export WANDB_API_KEY=...`` or ``source ~/secrets.sh``: its lines go only
to ``<run_dir>/setup.sh`` (mode 0600, sourced by the job's steps), never into files others can read or services
that keep them. Everything else in the config holds no secrets by construction (keys come from the environment or,
on Kubernetes, from Secret references).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

WITHHELD = "(withheld: in <run_dir>/setup.sh)"


def public(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with the Slurm setup lines replaced by a marker (an empty list where there were none)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    slurm = out.get("cluster", {}).get("slurm") if isinstance(out.get("cluster"), DictConfig) else None
    if slurm is not None and slurm.get("setup"):
        slurm.setup = [WITHHELD]
    return out
