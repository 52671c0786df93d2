"""The one isolation scheme of the e2e and chart-e2e tests. Other sessions on this machine
share the API server and libvirtd, and their agents may watch every namespace, so each test:

- gets a node name no one else uses (`unique_node`), which its objects name in spec.nodeName
  (unless the test exercises claiming by domain), so no other agent ever takes them;
- gets a namespace of its own (`create_namespace`), which its agents watch (`--namespace`,
  unless a test needs a cluster-wide agent), so they never take anyone else's objects;
- leaves nothing behind (`release_namespace`): the finalizers of its BlockCopies are removed
  (their agents are stopped by then) and the namespace is deleted, without waiting
  (kube-controller-manager's namespace controller removes what is in it); the DiskInventory
  its agents published, named after its node, is deleted (`delete_inventory`)."""

from __future__ import annotations

import uuid
from typing import Any, cast

import kubernetes

from blockcopy.model.api import GROUP, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_PLURAL
from support.cluster import Kubectl


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def unique_node(prefix: str = "node") -> str:
    """A node name no other test or session uses."""
    return unique(prefix)


def create_namespace(kubectl: Kubectl, prefix: str = "e2e") -> str:
    name = unique(prefix)
    kubectl("create", "namespace", name)
    return name


def release_namespace(api: kubernetes.client.CustomObjectsApi, kubectl: Kubectl,
                      namespace: str) -> None:
    """Remove the finalizers of every BlockCopy in ``namespace``, then delete it (not waiting).
    Stop the agents that watch it first, or they may add a finalizer again."""
    try:
        items = cast(dict[str, Any], api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL))["items"]
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 404:  # no CRD: no BlockCopy either
            raise
        items = []
    for obj in items:
        if not obj["metadata"].get("finalizers"):
            continue
        try:
            api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                               obj["metadata"]["name"],
                                               {"metadata": {"finalizers": None}})
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
    kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")


def delete_inventory(api: kubernetes.client.CustomObjectsApi, node: str) -> None:
    """Delete the DiskInventory an agent of ``node`` published (cluster-scoped: no namespace
    takes it along). Stop the agent first, or it creates it again."""
    try:
        api.delete_cluster_custom_object(GROUP, VERSION, INVENTORY_PLURAL, node)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 404:  # never published (or no CRD)
            raise
