"""Token authentication for every Ray cluster r1 starts: nobody who merely reaches its ports runs code as the job.

Ray (2.52+) checks a bearer token on every GCS/raylet RPC and dashboard request when ``RAY_AUTH_MODE=token``; the
token comes from ``RAY_AUTH_TOKEN``. Both are read once, when a process first loads Ray, so they are set in the
environment before anything imports ``ray`` and are inherited from there by every Ray process of the cluster:

- ``cluster=local`` (``r1-launch`` starting its private instance): ``protect_private_cluster`` draws a fresh token for
  the run, in the driver's environment only;
- Slurm: the job script draws one per attempt into the job's environment (``srun`` passes it to every step);
- Kubernetes: the chart sets KubeRay's ``authOptions: {mode: token}`` (KubeRay 1.5.1+ keeps the token in a Secret it
  creates and sets both variables on every Ray container).

The token is never written to a file, a config or a log. A cluster joined by address (``cluster.ray_address``) is
the user's: its token, if it has one, comes from their environment as Ray documents. Setting ``RAY_AUTH_MODE``
yourself (``disabled`` included) overrides all of this.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys

log = logging.getLogger(__name__)


def new_token() -> str:
    return secrets.token_hex(32)


def protect_private_cluster(cluster) -> bool:
    """Before the driver first imports Ray: turn token auth on for the private instance it is about to start.
    True if it did."""
    if cluster.kind != "local" or cluster.ray_address or "RAY_AUTH_MODE" in os.environ:
        return False
    if "ray" in sys.modules:  # (an embedding process that loaded Ray already: too late to change its mode)
        log.warning("Ray was imported before r1 could turn on its token authentication; the local Ray instance "
                    "runs without it (set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN before importing Ray)")
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", new_token())
    return True
