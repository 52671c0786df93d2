"""The plugin's client of the Kubernetes API (like kubectl: kubeconfig, context, namespace)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

from blockcopy.kubectl.errors import NOT_FOUND, InventoryCannotTell, PluginError
from blockcopy.kubectl.text import group_of
from blockcopy.model.api import GROUP, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_PLURAL
from blockcopy.model.plan import PLAN_PLURAL

INVENTORY_RESOURCE = f"{INVENTORY_PLURAL}.{GROUP}"
# What the plugin calls each kind it reads and writes, in messages: (singular, plural).
KINDS = {PLURAL: ("blockcopy", "BlockCopies"), PLAN_PLURAL: ("blockcopyplan", "BlockCopyPlans")}


class Cluster:
    """The BlockCopy API as the kubeconfig (``--kubeconfig``, ``KUBECONFIG``, ~/.kube/config,
    or in a pod its ServiceAccount) and ``--context`` give it, like kubectl."""

    def __init__(self, kubeconfig: str | None, context: str | None):
        import kubernetes

        self._kubernetes = kubernetes
        config = kubernetes.config
        # KUBECONFIG read now: the client library reads it once, when first imported.
        default = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        have_file = kubeconfig or any(os.path.exists(p) for p in default.split(os.pathsep))
        kubeconfig = kubeconfig or default
        try:
            if have_file or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                client = config.new_client_from_config(config_file=kubeconfig, context=context)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = next((c for c in contexts if c["name"] == (context or active["name"])),
                              active)
                self.default_namespace = (chosen.get("context") or {}).get("namespace") \
                    or "default"
            else:
                config.load_incluster_config()
                client = kubernetes.client.ApiClient()
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                    self.default_namespace = f.read().strip() or "default"
        except (config.ConfigException, OSError) as exc:
            raise PluginError(f"cannot load the kubeconfig: {exc}") from None
        self.api = kubernetes.client.CustomObjectsApi(client)
        self.host = client.configuration.host

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, plural: str = PLURAL,
              **kw: Any) -> dict[str, Any]:
        ApiException = self._kubernetes.client.exceptions.ApiException
        try:
            return cast(dict[str, Any], fn(*args, **kw))
        except ApiException as exc:
            raise self._error(what, exc, plural) from None
        except Exception as exc:  # urllib3's MaxRetryError and friends, an OSError
            if isinstance(exc, OSError) or type(exc).__module__.startswith("urllib3"):
                raise PluginError(f"cannot reach the API server at {self.host}: "
                                  f"{exc}") from None
            raise

    @staticmethod
    def _error(what: str, exc: Any, plural: str = PLURAL) -> PluginError:
        try:
            message = json.loads(exc.body)["message"]
        except (TypeError, ValueError, KeyError):
            message = exc.reason or str(exc)
        kinds = KINDS.get(plural, (plural, plural))[1]
        if exc.status == 404:
            if "the server could not find the requested resource" in message:
                return PluginError(f"{what}: the API server does not know {kinds} "
                                   f"({plural}.{GROUP}): is the CRD installed?", status=404)
            return PluginError(f"{what}: not found", NOT_FOUND, status=404)
        if exc.status == 403 and plural != PLURAL:
            message += (f" ({kinds} act on many VMs at once: ask for a role that grants "
                        f"{plural}.{GROUP})")
        return PluginError(f"{what}: {message}", status=exc.status)

    def get(self, namespace: str, name: str, plural: str = PLURAL) -> dict[str, Any]:
        return self._call(f"{KINDS[plural][0]} {name!r} in namespace {namespace!r}",
                          self.api.get_namespaced_custom_object, GROUP, VERSION, namespace,
                          plural, name, plural=plural)

    def objects(self, namespace: str | None, plural: str = PLURAL, *,
                label_selector: str | None = None) -> list[dict[str, Any]]:
        kinds = KINDS[plural][1]
        kw = {"label_selector": label_selector} if label_selector else {}
        if namespace is None:
            result = self._call(f"listing {kinds}", self.api.list_cluster_custom_object,
                                GROUP, VERSION, plural, plural=plural, **kw)
        else:
            result = self._call(f"listing {kinds} in namespace {namespace!r}",
                                self.api.list_namespaced_custom_object, GROUP, VERSION,
                                namespace, plural, plural=plural, **kw)
        return sorted(result["items"], key=lambda o: (o["metadata"].get("namespace", ""),
                                                      o["metadata"]["name"]))

    def create(self, body: dict[str, Any], *, dry_run: bool, plural: str = PLURAL
               ) -> dict[str, Any]:
        meta = body["metadata"]
        kw = {"dry_run": "All"} if dry_run else {}
        return self._call(f"creating {KINDS[plural][0]} {meta['name']!r} in namespace "
                          f"{meta['namespace']!r}", self.api.create_namespaced_custom_object,
                          GROUP, VERSION, meta["namespace"], plural, body, plural=plural, **kw)

    def inventories(self, node: str | None) -> list[dict[str, Any]]:
        """The DiskInventory of ``node``, or every one. InventoryCannotTell (with the reason)
        when there is none to read: no agent published one, the CRD is not installed, or the
        user may not read them (the blockcopy-admin ClusterRole may)."""
        what = f"reading the node inventory of {node!r}" if node else \
            "listing the node inventories"
        try:
            if node is not None:
                return [self._call(what, self.api.get_cluster_custom_object, GROUP, VERSION,
                                   INVENTORY_PLURAL, node)]
            found = self._call(what, self.api.list_cluster_custom_object, GROUP, VERSION,
                               INVENTORY_PLURAL)["items"]
        except PluginError as exc:
            if exc.status == 404 and exc.code != NOT_FOUND:
                raise InventoryCannotTell(f"{what}: the API server does not know node "
                                          f"inventories ({INVENTORY_RESOURCE}): install the "
                                          "CRD (the chart's crds/)") from None
            if exc.status == 404:
                raise InventoryCannotTell(f"node {node!r} has no node inventory (its agent "
                                          "is not running, or runs with --inventory-interval "
                                          "0)", NOT_FOUND) from None
            if exc.status == 403:
                raise InventoryCannotTell(f"{exc}: reading the node inventories (they name "
                                          "every tenant's VMs) needs the blockcopy-admin "
                                          "ClusterRole") from None
            raise
        if not found:
            raise InventoryCannotTell("no node inventory in the API server (no agent "
                                      "publishes one: agents older than the inventory, or "
                                      "--inventory-interval 0)")
        return cast(list[dict[str, Any]], found)

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any],
                   plural: str = PLURAL) -> dict[str, Any]:
        return self._call(f"patching {KINDS[plural][0]} {name!r} in namespace {namespace!r}",
                          self.api.patch_namespaced_custom_object, GROUP, VERSION, namespace,
                          plural, name, {"spec": spec}, plural=plural)


def select(cluster: Cluster, namespace: str, names: Sequence[str], group: str | None
           ) -> list[dict[str, Any]]:
    """The named objects, or the members of ``group`` in ``namespace``; at least one."""
    if group is not None:
        members = [o for o in cluster.objects(namespace) if group_of(o) == group]
        if not members:
            raise PluginError(f"no BlockCopy of group {group!r} in namespace {namespace!r}",
                              NOT_FOUND)
        return members
    return [cluster.get(namespace, name) for name in dict.fromkeys(names)]
