"""Every Ray cluster r1 starts takes only clients that hold its token (``r1.ray_auth``): real Ray, on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from tests.conftest import REPO

# r1-launch's order: the token is set (protect_private_cluster) before Ray is first imported, then the run connects
DRIVER = """
import sys, time
from omegaconf import OmegaConf
from r1.ray_auth import protect_private_cluster
cluster = OmegaConf.create({"kind": "local", "ray_address": None, "num_cpus": 1, "num_gpus": 0})
assert protect_private_cluster(cluster)
from r1.cluster import connect
connect(cluster)
import ray
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # (until the test closes it)
"""

CLIENT = """
import sys, ray
ray.init(address=sys.argv[1])
print("joined", ray.cluster_resources().get("CPU"))
"""


def _clients(address: str, envs: list[dict]) -> list[tuple[int, str, str]]:
    """Each client's (exit code, stdout, stderr), all at once (a refused client retries for a while)."""
    started = [subprocess.Popen([sys.executable, "-c", CLIENT, address], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for env in envs]
    return [(c.returncode, *c.communicate(timeout=240)) for c in started if c.wait(timeout=240) is not None]


def test_a_client_without_the_clusters_token_is_refused_and_one_with_it_joins():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=clean, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        address = driver.stdout.readline().strip()
        assert address, "the driver did not start its Ray instance"
        # the token lives in the processes' environment only: read it where Ray's own servers got it
        gcs = next(p for p in psutil.Process(driver.pid).children(recursive=True) if "gcs_server" in p.name())
        environ = gcs.environ()
        token = environ["RAY_AUTH_TOKEN"]
        assert environ["RAY_AUTH_MODE"] == "token" and len(token) == 64

        anyone, guessed, holder = _clients(address, [
            clean,  # reaches the port, has no token
            {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},  # a wrong one
            {**clean, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}])
        for rc, _, err in (anyone, guessed):
            assert rc != 0 and "InvalidAuthToken" in err, err[-2000:]
        assert holder[0] == 0 and "joined 1.0" in holder[1], holder[2][-2000:]
    finally:
        driver.stdin.close()
        driver.wait(timeout=120)
