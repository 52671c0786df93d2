"""Kubernetes API client code: status writes (rate-limited), claims. No decisions here."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from blockcopy.api import GROUP, NODE_LABEL, PLURAL, VERSION

log = logging.getLogger(__name__)


def load_config() -> None:
    """The in-cluster ServiceAccount when running in a pod, else KUBECONFIG (~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class Kube:
    def __init__(self) -> None:
        self._api = kubernetes.client.CustomObjectsApi()
        self._core = kubernetes.client.CoreV1Api()

    async def post_event(self, body: Mapping[str, Any], etype: str, reason: str,
                         message: str, component: str) -> None:
        """A core/v1 Event about ``body`` (for code running outside kopf's handlers)."""
        meta = body["metadata"]
        now = dt.datetime.now(dt.UTC)
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                               "name": meta["name"], "namespace": meta["namespace"],
                               "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": etype, "reason": reason, "message": message[:1024],
            "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1,
        }
        try:
            await asyncio.to_thread(self._core.create_namespaced_event, meta["namespace"], event)
        except ApiException as exc:
            log.warning("posting an Event for %s failed: %s", meta["name"], exc)

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

    def iter_unclaimed(self, timeout_seconds: int, namespace: str | None = None
                       ) -> Iterator[dict[str, Any]]:
        """List, then watch for ``timeout_seconds``, the objects without the claim label
        (blocking; filtered by the API server, so agents never receive claimed objects)."""
        watch = kubernetes.watch.Watch()
        if namespace is None:
            source: tuple = (self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            source = (self._api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        for event in watch.stream(*source, label_selector=f"!{NODE_LABEL}",
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
    """Writes one object's status at most once per ``interval`` seconds.

    Writes are coalesced: while waiting for the next slot, a newer status replaces a pending
    one, so progress updates never delay a phase change. No-op writes are skipped.
    """

    def __init__(self, kube: Kube, namespace: str, name: str, interval: float):
        self._kube, self._namespace, self._name = kube, namespace, name
        self._interval = interval
        self._last_time = -interval
        self._last_written: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._task: asyncio.Task | None = None

    def submit(self, status: dict[str, Any], *, previous: dict[str, Any]) -> None:
        """Write ``status`` in the next free slot (unless it changes nothing)."""
        written = self._last_written if self._last_written is not None else \
            {k: v for k, v in previous.items() if k in status}
        if status == written:
            self._pending = None  # a newer state equal to what is stored: nothing to write
            return
        self._pending = status
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=f"status:{self._name}")

    async def write(self, status: dict[str, Any], *, previous: dict[str, Any]) -> None:
        """Submit and wait until it is stored (for intents that must precede an action)."""
        self.submit(status, previous=previous)
        await self.flush()

    async def flush(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _drain(self) -> None:
        while self._pending is not None:
            wait = self._last_time + self._interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            status, self._pending = self._pending, None
            if status is None:
                return
            try:
                await self._kube.patch_status(self._namespace, self._name, status)
            except Exception as exc:  # API hiccup: keep the newest state for the next slot
                if isinstance(exc, ApiException) and exc.status == 404:  # deleted meanwhile
                    return
                log.warning("status write of %s/%s failed: %s", self._namespace, self._name, exc)
                self._pending = self._pending or status  # retry in the next slot
            else:
                self._last_written = status
            self._last_time = time.monotonic()
