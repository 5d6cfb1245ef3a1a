"""``r1-launch ... cluster=k8s``: the Hydra config rendered through the real helm chart, and submitted, followed,
shown and cancelled through the real ``kubernetes`` client over HTTP against kmock's Kubernetes API emulator
(tests/k8s_api.py), with the test playing KubeRay (it sets the RayJob's status)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from r1.config.validate import ConfigError
from tests.conftest import REPO, TINY, compose
from tests.k8s_api import KubeAPI, fetch_helm

PLANTED = "planted-secret-4b1d7e"  # a W&B key in the submitting environment: must reach no object, file or log
NS = "research"
K8S = ["cluster=k8s", f"cluster.k8s.namespace={NS}", "cluster.k8s.release=r1-test", "run_dir=runs/a",
       "cluster.k8s.train.gpus=0", "cluster.k8s.rollout.gpus=0", "cluster.k8s.train.replicas=2",
       "cluster.k8s.secret_env=[{name: WANDB_API_KEY, secretName: r1-secrets, key: wandb-api-key}]"]


@pytest.fixture(scope="module")
def helm_on_path() -> dict:
    """An environment whose PATH has the real helm, and a planted W&B key."""
    helm = fetch_helm(REPO)
    return {**os.environ, "PATH": f"{helm.parent}:{os.environ['PATH']}", "WANDB_API_KEY": PLANTED}


def _launch(env: dict, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.main", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout, check=False)


def test_bad_k8s_settings_fail_before_anything_is_rendered():
    from launcher.k8s import problems

    cfg = compose([*TINY, *K8S, "cluster.k8s.namespace=Research_1", "cluster.k8s.train.memory=lots",
                   "trainer.gpus_per_worker=1", "run_dir=/elsewhere/run",
                   ("cluster.k8s.secret_env=[{name: WANDB_API_KEY, secretName: r1-secrets}, {name: HF_TOKEN, "
                   "secretName: hf, key: token, pods: [head, gpu]}]"), "cluster.k8s.sandbox_seccomp=Localhost"])
    assert problems(cfg) == [
        "cluster.k8s.namespace='Research_1' is not a Kubernetes namespace name",
        ("run_dir=/elsewhere/run is outside cluster.k8s.mount_path=/r1: it would not survive the pod; make it "
        "relative (it then goes under the volume) or put it under the mount path"),
        "cluster.k8s.train.memory='lots' is not a Kubernetes quantity (e.g. 32, 500m, 256Gi)",
        "trainer.gpus_per_worker=1.0 is more than a pod of the pool has (cluster.k8s.train.gpus=0)",
        ("cluster.k8s.secret_env entry {'name': 'WANDB_API_KEY', 'secretName': 'r1-secrets'}: give name, "
         "secretName, key (the variable, the existing Secret, its key) and optionally pods (of head, train, rollout; "
         "default: head)"),
        ("cluster.k8s.secret_env entry {'name': 'HF_TOKEN', 'secretName': 'hf', 'key': 'token', 'pods': ['head', "
         "'gpu']}: pods must be a non-empty list of ('head', 'train', 'rollout')"),
        ("cluster.k8s.sandbox_seccomp='Localhost': give RuntimeDefault, Unconfined or Localhost:<path under the "
         "kubelet's seccomp directory> (e.g. Localhost:r1/code-sandbox.json)"),
    ]
    with pytest.raises(ConfigError, match="cluster=k8s:"):
        from launcher.k8s import render

        render(cfg)


@pytest.mark.slow
def test_a_dry_run_renders_the_chart_from_the_config_and_holds_no_secret(helm_on_path, tmp_path):
    done = _launch(helm_on_path, tmp_path, *TINY, *K8S, "cluster.dry_run=true",
                   "cluster.k8s.sandbox_seccomp=Localhost:r1/code-sandbox.json")
    assert done.returncode == 0, done.stderr
    records = tmp_path / "outputs" / "k8s" / NS / "r1-test"
    assert f"rendered {records}/manifests.yaml" in done.stdout
    objects = {d["kind"]: d for d in yaml.safe_load_all((records / "manifests.yaml").read_text()) if d}
    assert set(objects) == {"ConfigMap", "ServiceAccount", "PersistentVolumeClaim", "NetworkPolicy", "RayJob"}
    # the config the driver will run: the launcher's, with its paths on the volume and resume on
    expected = compose([*TINY, *K8S])
    run = yaml.safe_load(objects["ConfigMap"]["data"]["config.yaml"])
    assert run["run_dir"] == "/r1/runs/a" and run["cache_dir"] == "/r1/" + expected.cache_dir
    assert run["resume"] is True and run["cluster"]["kind"] == "k8s"
    assert run["algo"] == yaml.safe_load(yaml.safe_dump(dict(expected.algo)))  # the rest verbatim
    job = objects["RayJob"]["spec"]
    assert job["backoffLimit"] == 3  # a failed run is retried on a new cluster, and resumes from the volume
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    assert (groups["train"]["replicas"], groups["rollout"]["replicas"]) == (2, 1)
    for path in (records / "values.yaml", records / "manifests.yaml"):
        assert PLANTED not in path.read_text()
    assert PLANTED not in done.stdout + done.stderr
    # the sandbox's seccomp profile from the config, on the pods where programs run
    assert groups["rollout"]["template"]["spec"]["securityContext"]["seccompProfile"] == {
        "type": "Localhost", "localhostProfile": "r1/code-sandbox.json"}
    assert groups["train"]["template"]["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.slow
def test_submit_follow_status_and_cancel_through_the_kubernetes_api(helm_on_path, tmp_path):
    from kubernetes import client

    with KubeAPI() as k8s:
        env = {**helm_on_path, "KUBECONFIG": str(k8s.kubeconfig(tmp_path / "kubeconfig"))}
        launcher = subprocess.Popen([sys.executable, "-m", "launcher.main", *TINY, *K8S, "cluster.k8s.poll_s=0.1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=tmp_path)
        api = k8s.client()
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

        def rayjob() -> dict | None:
            found = custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]
            return found[0] if found else None

        deadline = time.monotonic() + 120
        while rayjob() is None:
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "the launcher created no RayJob"
            time.sleep(0.2)
        # play KubeRay: the cluster comes up, the run fails once, is retried, and succeeds
        for status in ({"jobDeploymentStatus": "Initializing"},
                       {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                       {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1},
                       {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                       {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}):
            custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", "r1-test",
                                                         {"status": status})
            time.sleep(0.6)
        out, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, err
        lines = [line for line in out.splitlines() if line.startswith("RayJob r1-test:")]
        assert lines == [
            "RayJob r1-test: New / -",
            "RayJob r1-test: Initializing / -",
            "RayJob r1-test: Running / RUNNING",
            "RayJob r1-test: Retrying / FAILED, 1 failed attempt(s) (backoffLimit 3)",
            "RayJob r1-test: Running / RUNNING, 1 failed attempt(s) (backoffLimit 3)",
            "RayJob r1-test: Complete / SUCCEEDED, 1 failed attempt(s) (backoffLimit 3)",
        ]
        # every object of the release is in the namespace, made by the client from the rendered chart
        config = core.read_namespaced_config_map("r1-test-config", NS)
        assert yaml.safe_load(config.data["config.yaml"])["run_dir"] == "/r1/runs/a"
        core.read_namespaced_service_account("r1-test", NS)
        core.read_namespaced_persistent_volume_claim("r1-test-data", NS)
        client.NetworkingV1Api(k8s.client()).read_namespaced_network_policy("r1-test", NS)
        stored = yaml.safe_dump([rayjob(), config.to_dict()])
        assert PLANTED not in stored + out + err

        again = _launch(env, tmp_path, *TINY, *K8S)  # the same release twice: the API's refusal, verbatim
        assert again.returncode == 2 and "creating NetworkPolicy r1-test in research:" in again.stderr
        assert "already exists" in again.stderr.lower() and "(HTTP 409)" in again.stderr

        shown = _launch(env, tmp_path, "status", "release=r1-test", f"namespace={NS}")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == "RayJob r1-test: Complete / SUCCEEDED, 1 failed attempt(s) (backoffLimit 3)"
        cancelled = _launch(env, tmp_path, "cancel", "release=r1-test", f"namespace={NS}")
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.split() == ["deleted", "RayJob/r1-test", "ConfigMap/r1-test-config",
                                            "ServiceAccount/r1-test", "NetworkPolicy/r1-test"]
        assert rayjob() is None
        assert core.read_namespaced_persistent_volume_claim("r1-test-data", NS)  # the checkpoints stay
        gone = _launch(env, tmp_path, "status", "release=r1-test", f"namespace={NS}")
        assert gone.returncode == 2 and "no RayJob or RayCluster of release r1-test" in gone.stderr


@pytest.mark.slow
def test_a_run_that_fails_for_good_exits_nonzero(helm_on_path, tmp_path):
    from kubernetes import client

    with KubeAPI() as k8s:
        env = {**helm_on_path, "KUBECONFIG": str(k8s.kubeconfig(tmp_path / "kubeconfig"))}
        launcher = subprocess.Popen([sys.executable, "-m", "launcher.main", *TINY, *K8S, "cluster.k8s.poll_s=0.1",
                                     "cluster.k8s.backoff_limit=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, cwd=tmp_path)
        custom = client.CustomObjectsApi(k8s.client())
        deadline = time.monotonic() + 120
        while not custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]:
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)
        custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", "r1-test", {"status": {
            "jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "failed": 1,
            "message": "the driver exited with 1"}})
        out, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 1, err
        assert out.splitlines()[-1] == ("RayJob r1-test: Failed / FAILED, 1 failed attempt(s) (backoffLimit 0) - "
                                        "the driver exited with 1")


@pytest.mark.slow
def test_a_raycluster_release_is_followed_until_ready_and_cancelled(helm_on_path, tmp_path):
    from kubernetes import client

    with KubeAPI() as k8s:
        env = {**helm_on_path, "KUBECONFIG": str(k8s.kubeconfig(tmp_path / "kubeconfig"))}
        launcher = subprocess.Popen([sys.executable, "-m", "launcher.main", *TINY, *K8S, "cluster.k8s.poll_s=0.1",
                                     "cluster.k8s.mode=raycluster", "cluster.k8s.volume_claim=shared-r1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        api = k8s.client()
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        deadline = time.monotonic() + 120
        while not custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayclusters")["items"]:
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
            time.sleep(0.2)
        assert not custom.list_namespaced_custom_object("ray.io", "v1", NS, "rayjobs")["items"]
        assert not core.list_namespaced_persistent_volume_claim(NS).items  # the existing claim is used, none made
        custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayclusters", "r1-test",
                                                     {"status": {"state": "ready"}})
        out, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, err
        assert out.splitlines()[-2:] == [
            "RayCluster r1-test: ready",
            (f"ready: kubectl -n {NS} port-forward svc/r1-test-head-svc 8265:8265 & RAY_AUTH_MODE=token "
             f"RAY_AUTH_TOKEN=$(kubectl -n {NS} get secret r1-test -o jsonpath='{{.data.auth_token}}' | base64 -d) "
             "ray job submit --address http://127.0.0.1:8265 -- python -m launcher.k8s_job /etc/r1/config.yaml")]
        cancelled = _launch(env, tmp_path, "cancel", "release=r1-test", f"namespace={NS}")
        assert cancelled.stdout.split() == ["deleted", "RayCluster/r1-test", "ConfigMap/r1-test-config",
                                            "ServiceAccount/r1-test", "NetworkPolicy/r1-test"]
