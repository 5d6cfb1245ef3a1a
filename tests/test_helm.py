"""``helm/r1``: the chart linted and rendered by a real ``helm`` over a matrix of values; every rendered object checked
strictly — built-in kinds with kubernetes-validate's offline schemas, RayJob/RayCluster against the KubeRay CRDs
(../shared/kuberay-crds), and the pod templates inside them as core PodTemplates; values the schema must reject."""

from __future__ import annotations

import copy
import json
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, TINY, compose
from tests.k8s_api import fetch_helm

CHART = REPO / "helm" / "r1"
CRDS = REPO.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.32.0"
CONFIG = "name: r1_zero\nrun_dir: /r1/outputs/r1_zero/run\ncache_dir: /r1/cache\n"


@pytest.fixture(scope="module")
def helm() -> str:
    return str(fetch_helm(REPO))


def _values(**changes) -> dict:
    values = {"r1Config": CONFIG}
    for dotted, value in changes.items():
        node = values
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return values


def _helm(helm: str, command: str, values: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    args = [helm, command, *(["t"] if command == "template" else []), str(CHART), "-f", str(path),
            *(["--strict"] if command == "lint" else ["--namespace", "research"])]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def render(helm: str, values: dict, tmp_path: Path) -> list[dict]:
    done = _helm(helm, "template", values, tmp_path)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _crd_schemas() -> dict:
    """KubeRay's CRD schemas, made strict: unknown fields rejected, as ``kubectl --validate=strict`` does."""
    def strict(node):
        if isinstance(node, list):
            return [strict(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: strict(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return node

    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                         "metadata": {"type": "object"}})
            out[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = schema
    return out


def pod_templates(doc: dict) -> list[dict]:
    """The pod templates a RayJob / RayCluster carries (head, worker groups, the RayJob's submitter)."""
    spec = doc["spec"]
    cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
    found = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    return found + ([spec["submitterPodTemplate"]] if "submitterPodTemplate" in spec else [])


def check_objects(docs: list[dict]) -> None:
    """Every object valid: a built-in kind against Kubernetes' own schema (strict, no schema = error), a KubeRay
    kind against its CRD, and each pod template inside one as a core v1 PodTemplate."""
    import kubernetes_validate

    if not CRDS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not at {CRDS} (../shared/kuberay-crds): RayJob/RayCluster not checked")
    crds = _crd_schemas()
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in crds:
            errors = [f"{'.'.join(map(str, e.path))}: {e.message[:200]}"
                      for e in jsonschema.Draft7Validator(crds[key]).iter_errors(doc)]
            assert not errors, f"{doc['kind']} against the KubeRay CRD:\n" + "\n".join(errors)
            for template in pod_templates(doc):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": "t"}, "template": template},
                                             K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # SchemaNotFoundError is an error too


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


MATRIX = [
    ("rayjob", 8, "create"), ("rayjob", 0, "create"), ("rayjob", 8, "existing"), ("rayjob", 0, "none"),
    ("raycluster", 8, "create"), ("raycluster", 0, "existing"), ("raycluster", 8, "none"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode, gpus, volume", MATRIX, ids=[f"{m}-{'gpu' if g else 'cpu'}-{v}-pvc"
                                                             for m, g, v in MATRIX])
def test_the_chart_lints_renders_and_validates(helm, tmp_path, mode, gpus, volume):
    values = _values(mode=mode, pools__train__gpus=gpus, pools__rollout__gpus=gpus, pools__train__replicas=4,
                     pools__rollout__replicas=2, persistence__enabled=volume != "none",
                     persistence__existingClaim="shared-r1" if volume == "existing" else "",
                     secretEnv=[{"name": "WANDB_API_KEY", "secretName": "r1-secrets", "key": "wandb-api-key"}])
    lint = _helm(helm, "lint", values, tmp_path)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(helm, values, tmp_path)
    check_objects(docs)
    objects = by_kind(docs)
    kind = {"rayjob": "RayJob", "raycluster": "RayCluster"}[mode]
    assert set(objects) == {"ConfigMap", "ServiceAccount", "NetworkPolicy", kind} | (
        {"PersistentVolumeClaim"} if volume == "create" else set())
    job = objects[kind]
    cluster = job["spec"]["rayClusterSpec"] if mode == "rayjob" else job["spec"]
    if mode == "rayjob":
        assert job["spec"]["entrypoint"] == "python -m launcher.k8s_job /etc/r1/config.yaml"
        assert job["spec"]["backoffLimit"] == 3  # a failed run is retried; the driver resumes from the volume
    assert objects["ConfigMap"]["data"]["config.yaml"] == CONFIG  # the resolved config, verbatim

    # the pools: one worker group each, its pods tagged with the resource r1's placement groups ask for
    from omegaconf import OmegaConf

    from r1.workers.pools import pool_bundles, pool_tag

    cfg = OmegaConf.create({"cluster": {"kind": "k8s"}})
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"train", "rollout"}
    for pool, replicas in (("train", 4), ("rollout", 2)):
        group = groups[pool]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
        tag = pool_bundles(1, 1, 0, tag=pool_tag(cfg, pool))[0]
        (name,) = [k for k in tag if k.startswith("r1_pool_")]
        assert group["rayStartParams"]["resources"] == json.dumps(json.dumps({name: 1000}))  # KubeRay's quoting
    assert "resources" not in cluster["headGroupSpec"]["rayStartParams"]  # the driver's node carries no pool

    for pod, group in [(cluster["headGroupSpec"]["template"], None), *((g["template"], g) for g in groups.values())]:
        spec = pod["spec"]
        (container,) = spec["containers"]
        limits = container["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (gpus if group and gpus else None)
        assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])) == bool(group and gpus)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        data = volumes["r1-data"]
        if volume == "none":
            assert data == {"name": "r1-data", "emptyDir": {}}
        else:
            assert data["persistentVolumeClaim"]["claimName"] == ("shared-r1" if volume == "existing"
                                                                  else "t-r1-data")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts == {"r1-config": "/etc/r1", "r1-data": "/r1", "dshm": "/dev/shm", "tmp": "/tmp"}
        secret_env = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        assert secret_env == ([] if group else [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "r1-secrets", "key": "wandb-api-key"}}}])  # the driver's pod only, by default
        # the health monitor names the Kubernetes node (the downward API), as SREs find it with kubectl
        assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]


@pytest.mark.slow
def test_pods_run_non_root_without_privileges_or_an_api_token(helm, tmp_path):
    for mode in ("rayjob", "raycluster"):
        docs = render(helm, _values(mode=mode), tmp_path)
        assert not {d["kind"] for d in docs} & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
        assert by_kind(docs)["ServiceAccount"]["automountServiceAccountToken"] is False
        job = by_kind(docs)["RayJob" if mode == "rayjob" else "RayCluster"]
        for pod in pod_templates(job):
            spec = pod["spec"]
            assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == "t-r1"
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for container in spec["containers"]:
                assert container["securityContext"] == {
                    "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]}}


@pytest.mark.slow
def test_a_secret_is_only_ever_referenced(helm, tmp_path, monkeypatch):
    """A secret's value can reach a manifest only through the values: the launcher never copies one there (a key
    planted in the submitting environment is in no value), the schema refuses an entry that carries a value
    instead of a reference, and every secret variable renders as a ``secretKeyRef`` with no ``value``. (Helm
    templates cannot read the environment at all: planting it there alone, as this test once did, tests nothing.)"""
    from launcher.k8s import chart_values

    planted = "planted-wandb-key-7f3c9a"
    monkeypatch.setenv("WANDB_API_KEY", planted)
    values = chart_values(compose([*TINY, "cluster=k8s", "run_dir=runs/a", "logger=wandb",
                                   ("+cluster.k8s.secret_env=[{name: WANDB_API_KEY, secretName: r1-secrets, "
                                   "key: wandb-api-key}, {name: HF_TOKEN, secretName: hf, key: token, "
                                   "pods: [head, train]}]")]))
    assert planted not in yaml.safe_dump(values)
    docs = render(helm, values, tmp_path)
    assert planted not in yaml.safe_dump(docs)
    secret_vars = [e for d in docs if d["kind"] == "RayJob" for t in pod_templates(d)
                   for c in t["spec"]["containers"] for e in c.get("env", []) if e["name"] in ("WANDB_API_KEY",
                                                                                              "HF_TOKEN")]
    assert len(secret_vars) == 3  # each variable on the pods it names: the head (both), train
    for entry in secret_vars:
        assert "value" not in entry and set(entry["valueFrom"]) == {"secretKeyRef"}, entry

    carried = _values(secretEnv=[{"name": "WANDB_API_KEY", "secretName": "r1-secrets", "key": "wandb-api-key",
                                  "value": planted}])
    done = _helm(helm, "template", carried, tmp_path)
    assert done.returncode != 0 and "value" in done.stderr and "Additional property" in done.stderr, done.stderr
    assert planted not in done.stdout


@pytest.mark.slow
def test_secrets_and_the_sandbox_profile_reach_only_the_pods_named(helm, tmp_path):
    """Rollout pods run untrusted programs: no secret reaches them unless named. The code sandbox's seccomp profile
    (user namespaces) goes to the pods where programs run -- the head and the rollout pool -- not the trainers."""
    values = _values(secretEnv=[{"name": "WANDB_API_KEY", "secretName": "r1-secrets", "key": "wandb-api-key"},
                                {"name": "HF_TOKEN", "secretName": "hf", "key": "token", "pods": ["train"]}],
                     codeSandbox={"seccompProfile": {"type": "Localhost", "localhostProfile": "r1/code-sandbox.json"}})
    docs = render(helm, values, tmp_path)
    check_objects(docs)
    job = by_kind(docs)["RayJob"]
    pods = {pod.get("metadata", {}).get("labels", {}).get("r1.io/group", "submitter"): pod["spec"]
            for pod in pod_templates(job)}
    assert set(pods) == {"head", "train", "rollout", "submitter"}
    assert "secretKeyRef" not in json.dumps(pods.pop("submitter"))
    secrets = {group: [e["name"] for e in spec["containers"][0]["env"] if "secretKeyRef" in e.get("valueFrom", {})]
               for group, spec in pods.items()}
    assert secrets == {"head": ["WANDB_API_KEY"], "train": ["HF_TOKEN"], "rollout": []}
    profiles = {group: spec["securityContext"]["seccompProfile"] for group, spec in pods.items()}
    localhost = {"type": "Localhost", "localhostProfile": "r1/code-sandbox.json"}
    assert profiles == {"head": localhost, "rollout": localhost, "train": {"type": "RuntimeDefault"}}


BAD = [
    ({"mode": "job"}, "mode"),
    ({"pool": {"train": {"replicas": 2}}}, "pool"),  # a typo of "pools"
    ({"pools": {"train": {"gpus": -1}}}, "gpus"),
    ({"head": {"memory": "lots"}}, "memory"),
    ({"securityContext": {"runAsUser": 0}}, "runAsUser"),  # root
    ({"secretEnv": [{"name": "WANDB_API_KEY", "secretName": "r1-secrets"}]}, "key"),
    ({"rayVersion": "latest"}, "rayVersion"),
    ({"persistence": {"accessMode": "ReadWriteSome"}}, "accessMode"),
    ({"secretEnv": [{"name": "HF_TOKEN", "secretName": "hf", "key": "token", "pods": ["gpu"]}]}, "pods"),
    ({"codeSandbox": {"seccompProfile": {"type": "Localhost"}}}, "localhostProfile"),  # which file?
    ({"codeSandbox": {"seccompProfile": {"type": "Privileged"}}}, "type"),
    ({"network": {"annotations": {}, "rdmaResources": {}, "ncclEnv": {"WANDB_API_KEY": "x"}}}, "ncclEnv"),
    ({"network": {"annotations": {}, "rdmaResources": {"rdma/ib": 0}, "ncclEnv": {}}}, "rdmaResources"),
]


@pytest.mark.slow
@pytest.mark.parametrize("bad, field", BAD, ids=[f for _, f in BAD])
def test_the_values_schema_rejects_bad_values(helm, tmp_path, bad, field):
    values = copy.deepcopy(bad)
    values["r1Config"] = CONFIG
    done = _helm(helm, "template", values, tmp_path)
    assert done.returncode != 0 and "values don't meet the specifications of the schema" in done.stderr
    assert field in done.stderr, done.stderr


NETWORK = {"annotations": {"k8s.v1.cni.cncf.io/networks": "ib-net"}, "rdmaResources": {"rdma/rdma_shared_device_a": 1},
           "ncclEnv": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"},
           "allowIngressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}


@pytest.mark.slow
def test_rdma_devices_network_annotations_nccl_env_and_capabilities_reach_the_pools_pods(helm, tmp_path):
    """What NCCL over InfiniBand needs on the pools' pods (the head runs no NCCL: none of it), IPC_LOCK with RDMA
    devices (it pins memory), SYS_PTRACE everywhere for stack dumps when asked; valid against Kubernetes' and
    KubeRay's schemas. Off by default (test_pods_run_non_root_...: nothing added)."""
    docs = render(helm, _values(network=NETWORK, stackDumps=True), tmp_path)
    check_objects(docs)
    head, train, rollout = pod_templates(by_kind(docs)["RayJob"])[:3]
    for pod in (train, rollout):
        assert pod["metadata"]["annotations"] == NETWORK["annotations"]
        [container] = pod["spec"]["containers"]
        for kind in ("requests", "limits"):
            assert container["resources"][kind]["rdma/rdma_shared_device_a"] == 1
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["NCCL_IB_HCA"], env["NCCL_SOCKET_IFNAME"]) == ("mlx5", "eth0")
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK", "SYS_PTRACE"]}
    [container] = head["spec"]["containers"]
    assert "annotations" not in head["metadata"] and not any(e["name"].startswith("NCCL_") for e in container["env"])
    assert "rdma/rdma_shared_device_a" not in container["resources"]["requests"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}


def _selects(selector: dict, labels: dict) -> bool:
    """A NetworkPolicy podSelector's matchLabels against a pod's labels (Kubernetes: every pair must be there)."""
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rayjob", "raycluster"])
def test_only_the_releases_pods_reach_its_pods_and_ray_refuses_requests_without_its_token(helm, tmp_path, mode):
    """The NetworkPolicy covers every pod of the release (head, both pools, the submitter) and lets in only the
    release's own pods and the peers asked for; the Ray cluster asks KubeRay for token auth. Valid against
    Kubernetes' and KubeRay's schemas (authOptions is KubeRay 1.5.1's API)."""
    docs = render(helm, _values(mode=mode, network=NETWORK), tmp_path)
    check_objects(docs)
    objects = by_kind(docs)
    policy, job = objects["NetworkPolicy"], objects["RayJob" if mode == "rayjob" else "RayCluster"]
    cluster = job["spec"]["rayClusterSpec"] if mode == "rayjob" else job["spec"]
    assert cluster["authOptions"] == {"mode": "token"}
    pods = [t["metadata"]["labels"] for t in pod_templates(job)]
    assert len(pods) == (4 if mode == "rayjob" else 3)
    assert all(_selects(policy["spec"]["podSelector"], labels) for labels in pods)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    own, *extra = rule["from"]
    assert extra == NETWORK["allowIngressFrom"] and "ports" not in rule
    assert all(_selects(own["podSelector"], labels) for labels in pods)
    other = {**pods[0], "app.kubernetes.io/instance": "someone-else"}  # another release's pod, same namespace
    assert not _selects(own["podSelector"], other)
    assert not _selects(policy["spec"]["podSelector"], other)  # (nor is it covered by this policy)


def test_the_launcher_passes_the_network_settings_to_the_chart():
    from launcher.k8s import chart_values

    cfg = compose([*TINY, "cluster=k8s", "run_dir=runs/a", "cluster.k8s.stack_dumps=true",
                   "+cluster.k8s.network.annotations={k8s.v1.cni.cncf.io/networks: ib-net}",
                   "+cluster.k8s.network.rdma_resources={rdma/rdma_shared_device_a: 1}",
                   "+cluster.k8s.network.nccl_env={NCCL_IB_HCA: mlx5, NCCL_SOCKET_IFNAME: eth0}",
                   ("cluster.k8s.network.allow_ingress_from=[{namespaceSelector: {matchLabels: "
                   "{kubernetes.io/metadata.name: monitoring}}}]")])
    values = chart_values(cfg)
    assert values["network"] == NETWORK and values["stackDumps"] is True
    assert chart_values(compose([*TINY, "cluster=k8s", "run_dir=runs/a"]))["network"] == {
        "annotations": {}, "rdmaResources": {}, "ncclEnv": {}, "allowIngressFrom": []}


@pytest.mark.slow
def test_a_missing_config_says_how_to_make_one(helm, tmp_path):
    done = _helm(helm, "template", {}, tmp_path)
    assert done.returncode != 0
    assert "r1Config is required" in done.stderr and "cluster=k8s" in done.stderr


def test_the_dockerfile_builds_the_charts_default_image_to_run_as_the_charts_non_root_user():
    """(No Docker engine here: the image itself is not built by the tests; docs/kubernetes.md says so.)"""
    text = (REPO / "Dockerfile").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"docker build -t {values['image']['repository']}:{chart['appVersion']} ." in text
    assert chart["appVersion"] == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    user = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")][-1]
    assert user == f"{values['securityContext']['runAsUser']}:{values['securityContext']['runAsGroup']}" != "0:0"
    # the pins of pyproject/Makefile, and the GPU lock for every version
    assert "pip install -c locks/gpu.txt torch==2.13.0 && pip install -c locks/gpu.txt -e '.[gpu]'" in text
    assert "COPY locks locks" in text
    assert "libibverbs1 ibverbs-providers" in text  # NCCL's InfiniBand transport (docs/kubernetes.md)
