"""The plan as a gate: a Slurm or Kubernetes submission whose pools cannot fit is refused before it queues."""

from __future__ import annotations

import logging

from r1.config.validate import ConfigError
from r1.plan.planner import make_plan
from r1.plan.render import render


def refuse_unfit(cfg) -> None:
    """Raise ConfigError with the plan and the change that fits when the training or rollout pool does not fit at
    the context schedule's longest response (``planner.check=false``: submit anyway)."""
    if not cfg.planner.check:
        return
    try:
        plan = make_plan(cfg)
    except ValueError as err:  # e.g. a model whose config.json is not readable from here: say so, do not block
        logging.getLogger("r1").warning("planner: not checked before submission: %s", err)
        return
    if not plan.fits:
        raise ConfigError(f"refused before submission, the run cannot fit:\n{plan.refusal}\n(planner.check=false "
                          f"submits anyway)\n\n{render(plan)}")
