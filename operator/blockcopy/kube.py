"""Kubernetes API client code: status writes (rate-limited), claims. No decisions here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from blockcopy.api import GROUP, NODE_LABEL, PLURAL, VERSION

log = logging.getLogger(__name__)


def load_config() -> None:
    """KUBECONFIG (or ~/.kube/config) if present, else the in-cluster ServiceAccount."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Kube:
    def __init__(self) -> None:
        self._api = kubernetes.client.CustomObjectsApi()

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None) -> bool:
        """Merge-patch the status; with ``resource_version``, only if nobody wrote since
        (returns False when the object changed or is gone)."""
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            await asyncio.to_thread(self._api.patch_namespaced_custom_object_status,
                                    GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as exc:
            if resource_version is not None and exc.status in (404, 409):
                return False
            raise
        return True

    def iter_unclaimed(self, timeout_seconds: int) -> Iterator[dict[str, Any]]:
        """List, then watch for ``timeout_seconds``, the objects without the claim label
        (blocking; filtered by the API server, so agents never receive claimed objects)."""
        watch = kubernetes.watch.Watch()
        for event in watch.stream(self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                                  label_selector=f"!{NODE_LABEL}",
                                  timeout_seconds=timeout_seconds):
            if event["type"] in ("ADDED", "MODIFIED"):
                yield event["object"]

    async def claim(self, namespace: str, name: str, node: str, resource_version: str) -> bool:
        """Label the object as ours, only if nobody changed it since ``resource_version``.

        The resourceVersion in the patch makes the API server refuse (409) a write based on a
        stale read, so of two agents racing from the same version only one can win.
        """
        body = {"metadata": {"labels": {NODE_LABEL: node}, "resourceVersion": resource_version}}
        try:
            await asyncio.to_thread(self._api.patch_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


class StatusWriter:
    """Writes one object's status at most once per ``interval`` seconds, skipping no-ops."""

    def __init__(self, kube: Kube, namespace: str, name: str, interval: float):
        self._kube, self._namespace, self._name = kube, namespace, name
        self._interval = interval
        self._last_time = 0.0
        self._last_written: dict[str, Any] | None = None

    async def write(self, status: dict[str, Any], *, previous: dict[str, Any]) -> bool:
        comparable = {k: v for k, v in previous.items() if k in status}
        if status == comparable or status == self._last_written:
            return False
        wait = self._last_time + self._interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            await self._kube.patch_status(self._namespace, self._name, status)
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile
                return False
            raise
        self._last_time = time.monotonic()
        self._last_written = status
        return True
