"""How a finished run becomes a process exit code: one function (``r1.monitoring.stop.exit_code``) for every
launcher, so a run that aborted itself can never exit 0 under one of them."""

import signal

import pytest
from omegaconf import OmegaConf

from r1.monitoring.stop import exit_code
from tests.conftest import TINY, compose

ABORTED = {"step": 3, "stopped_by": None, "run_dir": "r",
           "aborted": {"signal": "ecc_uncorrectable", "node": "n1", "gpu": 0}}


@pytest.mark.parametrize("result, code", [
    ({"step": 5, "stopped_by": None, "aborted": None}, 0),  # completed
    (ABORTED, 75),  # a sick GPU or a stall: checkpointed, run it again elsewhere (EX_TEMPFAIL)
    ({"step": 2, "stopped_by": signal.SIGUSR1, "aborted": None}, 75),  # time limit / preemption ahead: come back
    ({"step": 2, "stopped_by": signal.SIGTERM, "aborted": None}, 128 + 15),
    ({"step": 2, "stopped_by": signal.SIGINT, "aborted": None}, 128 + 2),
    # the mismatch canary halted it: checkpointed, and a restart would not cure it (EX_SOFTWARE, not requeued)
    ({"step": 2, "stopped_by": None, "aborted": None, "halted": {"signal": "mismatch_probe"}}, 70),
])
def test_each_way_a_run_ends_has_its_exit_code(result, code):
    assert exit_code(result) == code


def test_the_kubernetes_entry_point_exits_non_zero_when_the_run_aborted(tmp_path, monkeypatch):
    """The RayJob's entrypoint: a run that aborted (health) must fail the RayJob, so that KubeRay retries it on a
    new cluster (it used to exit 0: SUCCEEDED, never retried, training stopped in silence). Ray and the run itself
    are replaced here: what is tested is the entry point's reading of the run's result."""
    import r1.cluster
    import r1.stages
    from launcher import k8s_job

    config = tmp_path / "config.yaml"
    OmegaConf.save(compose(TINY + ["cluster=k8s"]), config)
    monkeypatch.setattr(r1.cluster, "connect", lambda cluster: None)
    monkeypatch.setattr(r1.cluster, "wait_for_nodes", lambda expected: None)
    monkeypatch.setattr(r1.stages, "run", lambda cfg: ABORTED)
    assert k8s_job.main(str(config)) == 75
