"""``r1-launch ... cluster=k8s``: the Hydra config -> the ``helm/r1`` chart's values -> objects on Kubernetes.

The chart is rendered by ``helm template`` (the same chart ``helm install`` installs) and its objects are created
through the Kubernetes Python client, so one kubeconfig is all a researcher needs. The values, the manifests and the
resolved config are kept in ``outputs/k8s/<namespace>/<release>/``; ``cluster.dry_run=true`` stops there. Then the
launcher follows the RayJob until it ends (Ctrl-C stops following, not the run);
``r1-launch status|cancel release=<name> [namespace=<ns>]`` show it and delete it (the volume, with the checkpoints,
is kept).

Inside the cluster the run's paths are on the volume: a relative ``run_dir``/``cache_dir``/model/data path is taken
under ``cluster.k8s.mount_path``, and ``resume`` is on, so a retried run continues from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from r1.config.public import public
from r1.config.schema import under
from r1.config.validate import ConfigError
from r1.plan.check import refuse_unfit

CHART = Path(__file__).resolve().parent.parent / "helm" / "r1"
RECORDS = Path("outputs") / "k8s"  # local records of each release: values.yaml, manifests.yaml
GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}
INSTANCE = "app.kubernetes.io/instance"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class K8sError(RuntimeError):
    """helm or the Kubernetes API refused: their message, verbatim."""


def release_name(cfg) -> str:
    """``cluster.k8s.release``, else ``r1-<name>-<6 hex of run_dir>``: one release per run directory."""
    if cfg.cluster.k8s.release:
        return str(cfg.cluster.k8s.release)
    name = re.sub(r"[^a-z0-9-]+", "-", str(cfg.name).lower()).strip("-")[:24].strip("-")
    return f"r1-{name}-{hashlib.sha1(str(cfg.run_dir).encode()).hexdigest()[:6]}"


def in_cluster(cfg):
    """The config the driver runs in the cluster: paths on the volume, resume on, the job's own Ray."""
    run = OmegaConf.create(OmegaConf.to_container(cfg))
    mount = run.cluster.k8s.mount_path
    for key in ("run_dir", "cache_dir"):
        run[key] = under(mount, str(run[key]))
    for section, key in (("model", "path"), ("data", "train_path"), ("data", "eval_path")):
        if run[section].get(key):
            run[section][key] = under(mount, str(run[section][key]))
    run.resume = True
    run.cluster.ray_address = None
    return run


def problems(cfg) -> list[str]:
    k, out = cfg.cluster.k8s, []
    if not _DNS.match(str(k.namespace)):
        out.append(f"cluster.k8s.namespace={k.namespace!r} is not a Kubernetes namespace name")
    release = release_name(cfg)
    if len(release) > 40 or not _DNS.match(release):
        out.append(f"cluster.k8s.release={release!r}: lower-case letters, digits and '-', at most 40 characters")
    mount = str(k.mount_path)
    for key in ("run_dir", "cache_dir"):
        path = str(cfg[key])
        if path.startswith("/") and not Path(path).is_relative_to(mount):
            out.append(f"{key}={path} is outside cluster.k8s.mount_path={mount}: it would not survive the pod; "
                       "make it relative (it then goes under the volume) or put it under the mount path")
    for group in ("head", "train", "rollout"):
        for key in ("cpu", "memory"):
            if not _QUANTITY.match(str(k[group][key])):
                out.append(f"cluster.k8s.{group}.{key}={k[group][key]!r} is not a Kubernetes quantity "
                           "(e.g. 32, 500m, 256Gi)")
    for pool, section in (("train", "trainer"), ("rollout", "rollout")):
        pods, workers = k[pool], cfg[section]
        if workers.gpus_per_worker > pods.gpus:
            out.append(f"{section}.gpus_per_worker={workers.gpus_per_worker} is more than a pod of the pool has "
                       f"(cluster.k8s.{pool}.gpus={pods.gpus})")
        elif workers.gpus_per_worker:
            per_pod = pods.gpus // workers.gpus_per_worker
            if workers.num_workers > per_pod * pods.replicas:
                out.append(f"{section}.num_workers={workers.num_workers} do not fit on "
                           f"cluster.k8s.{pool}.replicas={pods.replicas} pod(s) of {pods.gpus} GPUs")
    for entry in k.secret_env:
        if not {"name", "secretName", "key"} <= set(entry) <= {"name", "secretName", "key", "pods"}:
            out.append(f"cluster.k8s.secret_env entry {dict(entry)}: give name, secretName, key (the variable, the "
                       "existing Secret, its key) and optionally pods (of head, train, rollout; default: head)")
        elif not set(entry.get("pods") or ["head"]) <= set(POD_GROUPS) or entry.get("pods") == []:
            out.append(f"cluster.k8s.secret_env entry {dict(entry)}: pods must be a non-empty list of {POD_GROUPS}")
    try:
        seccomp_profile(k.sandbox_seccomp)
    except ValueError as err:
        out.append(str(err))
    return out


POD_GROUPS = ("head", "train", "rollout")


def seccomp_profile(value: str) -> dict:
    """``cluster.k8s.sandbox_seccomp`` as a pod's seccompProfile."""
    kind, _, path = str(value).partition(":")
    if kind in ("RuntimeDefault", "Unconfined") and not path:
        return {"type": kind}
    if kind == "Localhost" and path:
        return {"type": "Localhost", "localhostProfile": path}
    raise ValueError(f"cluster.k8s.sandbox_seccomp={value!r}: give RuntimeDefault, Unconfined or "
                     "Localhost:<path under the kubelet's seccomp directory> (e.g. Localhost:r1/code-sandbox.json)")


def chart_values(cfg) -> dict:
    """The chart's values for this run; helm merges them over helm/r1/values.yaml (security context, service
    account and the RayJob's TTL keep the chart's defaults)."""
    import ray

    k = cfg.cluster.k8s
    repository, sep, tag = str(k.image).rpartition(":")
    if not sep or "/" in tag:  # no tag (a ':' before the last '/' is a registry's port)
        repository, tag = str(k.image), ""

    def placement(group) -> dict:
        return {"cpu": str(group.cpu), "memory": str(group.memory),
                "nodeSelector": OmegaConf.to_container(group.node_selector),
                "tolerations": OmegaConf.to_container(group.tolerations),
                "affinity": OmegaConf.to_container(group.affinity)}

    return {
        "mode": str(k.mode),
        "r1Config": OmegaConf.to_yaml(public(in_cluster(cfg))),  # (a ConfigMap: no Slurm setup lines)
        "image": {"repository": repository, "tag": tag, "pullPolicy": str(k.image_pull_policy),
                  "pullSecrets": list(k.image_pull_secrets)},
        "rayVersion": ray.__version__,  # the image installs this project, hence this Ray
        "head": placement(k.head),
        "pools": {pool: {"replicas": k[pool].replicas, "gpus": k[pool].gpus, **placement(k[pool])}
                  for pool in ("train", "rollout")},
        "persistence": {"enabled": bool(k.persistent), "mountPath": str(k.mount_path),
                        "existingClaim": k.volume_claim or "", "size": str(k.volume_size),
                        "storageClass": k.storage_class or "", "accessMode": "ReadWriteMany"},
        "shmSize": str(k.shm_size),
        "secretEnv": [OmegaConf.to_container(e) if OmegaConf.is_config(e) else dict(e) for e in k.secret_env],
        "codeSandbox": {"seccompProfile": seccomp_profile(k.sandbox_seccomp)},
        "rayJob": {"backoffLimit": k.backoff_limit},
        "network": {"annotations": dict(k.network.annotations), "rdmaResources": dict(k.network.rdma_resources),
                    "ncclEnv": {str(n): str(v) for n, v in k.network.nccl_env.items()},
                    "allowIngressFrom": [OmegaConf.to_container(e) if OmegaConf.is_config(e) else dict(e)
                                         for e in k.network.allow_ingress_from]},
        "stackDumps": bool(k.stack_dumps),
    }


def helm_binary() -> str:
    for candidate in (shutil.which("helm"), CHART.parent.parent / ".tools" / "bin" / "helm"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise K8sError("helm is not on PATH: install Helm 3 (https://helm.sh/docs/intro/install/)")


def render(cfg) -> tuple[Path, list[dict]]:
    """Check, write values.yaml, ``helm template`` the chart, keep the manifests. Returns (records dir, objects)."""
    found = problems(cfg)
    if found:
        raise ConfigError("cluster=k8s:\n- " + "\n- ".join(found))
    refuse_unfit(cfg)  # (r1.plan: a pool that cannot fit is refused before anything is created)
    k, release = cfg.cluster.k8s, release_name(cfg)
    records = (RECORDS / str(k.namespace) / release).absolute()
    records.mkdir(parents=True, exist_ok=True)
    (records / "values.yaml").write_text(yaml.safe_dump(chart_values(cfg), sort_keys=False))
    done = subprocess.run([helm_binary(), "template", release, str(CHART), "--namespace", str(k.namespace), "-f",
                           str(records / "values.yaml")], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise K8sError(f"helm refused the values:\n{done.stderr.strip()}")
    (records / "manifests.yaml").write_text(done.stdout)
    return records, [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def api_client():
    """A client from the kubeconfig (``KUBECONFIG`` or ~/.kube/config), else the pod's in-cluster account."""
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()
    return client.ApiClient()


def create(objects: list[dict], namespace: str, api=None) -> None:
    """Create the release's objects; an existing one is an error (``r1-launch cancel`` it, or name another)."""
    from kubernetes import client, utils
    from kubernetes.client.exceptions import ApiException

    api = api or api_client()
    for doc in objects:
        try:
            if doc["apiVersion"] == f"{GROUP}/{VERSION}":
                client.CustomObjectsApi(api).create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURALS[doc["kind"]], doc)
            else:
                utils.create_from_dict(api, doc, namespace=namespace)
        except (ApiException, utils.FailToCreateError) as err:
            raise K8sError(f"creating {doc['kind']} {doc['metadata']['name']} in {namespace}: {_reason(err)}\n"
                           f"(r1-launch cancel release={doc['metadata']['labels'][INSTANCE]} namespace={namespace} "
                           "removes what the release has)") from err


def ray_object(release: str, namespace: str, api=None) -> dict | None:
    """The release's RayJob (or RayCluster), as the API has it now; None if there is none."""
    from kubernetes import client

    api = client.CustomObjectsApi(api or api_client())
    for kind, plural in PLURALS.items():
        found = api.list_namespaced_custom_object(GROUP, VERSION, namespace, plural,
                                                  label_selector=f"{INSTANCE}={release}")["items"]
        if found:
            return {**found[0], "kind": kind}
    return None


def describe(obj: dict) -> str:
    """One line: the RayJob's deployment and job status, retries, message (a RayCluster's state)."""
    status = obj.get("status") or {}
    if obj["kind"] == "RayCluster":
        return f"RayCluster {obj['metadata']['name']}: {status.get('state', 'pending')}"
    parts = [status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-"]
    line = f"RayJob {obj['metadata']['name']}: {' / '.join(parts)}"
    if status.get("failed"):
        line += f", {status['failed']} failed attempt(s) (backoffLimit {obj['spec'].get('backoffLimit', 0)})"
    if status.get("message"):
        line += f" - {status['message']}"
    return line


FINAL = {"Complete", "Failed"}  # jobDeploymentStatus of a RayJob that will not run again


def follow(release: str, namespace: str, poll_s: float, api=None, say=print) -> int:
    """Print the RayJob's status as it changes until it ends: 0 if the run succeeded, else 1."""
    last = None
    while True:
        obj = ray_object(release, namespace, api)
        if obj is None:
            say(f"the release {release} has no RayJob or RayCluster in {namespace} any more (cancelled?)")
            return 1
        line = describe(obj)
        if line != last:
            say(line)
            last = line
        status = obj.get("status") or {}
        if obj["kind"] == "RayCluster" and status.get("state") == "ready":
            name = obj["metadata"]["name"]
            say(f"ready: kubectl -n {namespace} port-forward svc/{name}-head-svc 8265:8265 & "
                f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(kubectl -n {namespace} get secret {name} "
                "-o jsonpath='{.data.auth_token}' | base64 -d) ray job submit --address http://127.0.0.1:8265 -- "
                "python -m launcher.k8s_job /etc/r1/config.yaml")  # (KubeRay keeps the token in a Secret: r1.ray_auth)
            return 0
        if status.get("jobDeploymentStatus") in FINAL:
            return 0 if status.get("jobStatus") == "SUCCEEDED" else 1
        time.sleep(poll_s)


def status(release: str, namespace: str, api=None) -> str:
    obj = ray_object(release, namespace, api)
    if obj is None:
        raise K8sError(f"no RayJob or RayCluster of release {release} in namespace {namespace}")
    return describe(obj)


def cancel(release: str, namespace: str, api=None) -> list[str]:
    """Delete the release's RayJob/RayCluster (KubeRay then removes its pods), ConfigMap, ServiceAccount and
    NetworkPolicy; the volume with the checkpoints stays. Returns what was deleted."""
    from kubernetes import client

    api = api or api_client()
    custom, core, net = client.CustomObjectsApi(api), client.CoreV1Api(api), client.NetworkingV1Api(api)
    selector, deleted = f"{INSTANCE}={release}", []
    for kind, plural in PLURALS.items():
        for obj in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural,
                                                        label_selector=selector)["items"]:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, obj["metadata"]["name"])
            deleted.append(f"{kind}/{obj['metadata']['name']}")
    for kind, lister, deleter in (
            ("ConfigMap", core.list_namespaced_config_map, core.delete_namespaced_config_map),
            ("ServiceAccount", core.list_namespaced_service_account, core.delete_namespaced_service_account),
            ("NetworkPolicy", net.list_namespaced_network_policy, net.delete_namespaced_network_policy)):
        for obj in lister(namespace, label_selector=selector).items:
            deleter(obj.metadata.name, namespace)
            deleted.append(f"{kind}/{obj.metadata.name}")
    if not deleted:
        raise K8sError(f"nothing of release {release} in namespace {namespace}")
    return deleted


def _reason(err) -> str:
    """The API server's own message (a Status object's ``message``)."""
    for api_error in getattr(err, "api_exceptions", None) or [err]:  # create_from_dict wraps them
        body = getattr(api_error, "body", None)
        if body:
            try:
                return f"{json.loads(body).get('message', body)} (HTTP {api_error.status})"
            except ValueError:
                return str(body)
    return str(err)
