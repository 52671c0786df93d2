"""The Kubernetes API client of the agent (``model.kubeapi.Kube``): status patches, claims, Events
and the watch of unclaimed objects. The kubernetes client library blocks, so each call runs
in a worker thread. No decisions here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from blockcopy.model.api import GROUP, NODE_LABEL, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_KIND, INVENTORY_PLURAL
from blockcopy.model.kubeapi import FieldSelectorUnsupported, ObjectRef

log = logging.getLogger(__name__)

EVENT_SOURCE = "blockcopy-operator"


def load_config() -> None:
    """The in-cluster ServiceAccount when running in a pod, else KUBECONFIG (~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


class KubeClient:
    def __init__(self) -> None:
        self._api = kubernetes.client.CustomObjectsApi()
        self._core = kubernetes.client.CoreV1Api()

    async def post_event(self, ref: ObjectRef, *, type: str, reason: str,
                         message: str) -> None:
        now = dt.datetime.now(dt.UTC)
        event: Any = {
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {"apiVersion": ref.api_version, "kind": ref.kind,
                               "name": ref.name, "namespace": ref.namespace, "uid": ref.uid,
                               "resourceVersion": ref.resource_version},
            "type": type, "reason": reason, "message": message[:1024],
            "source": {"component": EVENT_SOURCE}, "firstTimestamp": now,
            "lastTimestamp": now, "count": 1,
        }
        try:
            await asyncio.to_thread(self._core.create_namespaced_event, ref.namespace, event)
        except Exception as exc:  # an Event is best effort: never fail the caller
            log.warning("posting an Event for %s/%s failed: %s", ref.namespace, ref.name, exc)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any], *,
                           resource_version: str | None = None) -> bool:
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            await asyncio.to_thread(self._api.patch_namespaced_custom_object_status,
                                    GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as exc:
            if exc.status == 404 or (resource_version is not None and exc.status == 409):
                return False
            raise
        return True

    async def claim(self, namespace: str, name: str, *, node: str, resource_version: str,
                    finalizers: list[str]) -> bool:
        """The resourceVersion in the patch makes the API server refuse (409) a write based
        on a stale read, so of two agents racing from the same version only one can win;
        it also makes the whole finalizer list safe to write (a merge patch replaces lists)."""
        body = {"metadata": {"labels": {NODE_LABEL: node}, "finalizers": finalizers,
                             "resourceVersion": resource_version}}
        try:
            await asyncio.to_thread(self._api.patch_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    async def publish_inventory(self, name: str, status: dict[str, Any]) -> None:
        """Patch the status; when the object is missing (404), create it (an empty object:
        the API server drops status on create) and patch again. The agent needs create on
        diskinventories and patch on diskinventories/status, nothing else."""
        def patch() -> None:
            self._api.patch_cluster_custom_object_status(GROUP, VERSION, INVENTORY_PLURAL,
                                                         name, {"status": status})

        try:
            await asyncio.to_thread(patch)
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": INVENTORY_KIND,
                "metadata": {"name": name}}
        try:
            await asyncio.to_thread(self._api.create_cluster_custom_object, GROUP, VERSION,
                                    INVENTORY_PLURAL, body)
        except ApiException as exc:
            if exc.status != 409:  # created meanwhile (another agent of the same node name)
                raise
        await asyncio.to_thread(patch)

    async def list_namespace(self, namespace: str) -> list[dict[str, Any]]:
        listed: Any = await asyncio.to_thread(
            lambda: self._api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL))
        return list(listed.get("items") or [])

    async def unclaimed(self, namespace: str | None, *, node_name: str | None, timeout: int
                        ) -> AsyncIterator[dict[str, Any]]:
        """The client's watch blocks: it runs in a thread that hands objects to the loop.
        ``spec.nodeName=`` matches the objects without the field too (the API server reads
        an absent selectable field as "")."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        watch = kubernetes.watch.Watch()
        stopped = threading.Event()
        if namespace is None:
            source: tuple[Any, ...] = (self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            source = (self._api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)
        selectors = {"label_selector": f"!{NODE_LABEL}"}
        if node_name is not None:
            selectors["field_selector"] = node_field_selector(node_name)

        def pump() -> None:
            try:
                for event in watch.stream(*source, **selectors, timeout_seconds=timeout):
                    if stopped.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        loop.call_soon_threadsafe(queue.put_nowait, ("object", event["object"]))
            except ApiException as exc:
                # 400 for a field selector: the CRD's selectableFields are not served
                # ("field label not supported", Kubernetes < 1.32 or an older CRD).
                refused: Exception = exc
                if exc.status == 400 and node_name is not None:
                    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) \
                        else str(exc.body or "")
                    refused = FieldSelectorUnsupported(
                        f"{selectors['field_selector']}: {exc.status} {exc.reason}: "
                        f"{body.strip()[:300]}")
                loop.call_soon_threadsafe(queue.put_nowait, ("error", refused))
            except Exception as exc:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            else:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        thread = threading.Thread(target=pump, name=f"unclaimed:{namespace or '*'}",
                                  daemon=True)
        thread.start()
        try:
            while True:
                kind, item = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            stopped.set()
            with contextlib.suppress(Exception):
                watch.stop()


def node_field_selector(node_name: str) -> str:
    """``spec.nodeName=NODE``, the value escaped as the API server parses it."""
    escaped = node_name.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")
    return f"spec.nodeName={escaped}"
