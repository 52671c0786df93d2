"""BlockCopy objects as the tests handle them: creating (through kubectl, as users do),
reading, patching and deleting them in the test's namespace, their Events and conditions,
and `copy_spec`, the one way tests write a spec."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, cast

import kubernetes
import yaml

from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION
from support.waits import copying_with, phase_in, wait_for

if TYPE_CHECKING:
    from support.cluster import Kubectl
    from support.vms import VM


def copy_spec(vm: VM | str, *, node: str | None, dest: str, **fields: Any) -> dict[str, Any]:
    """The spec of a copy of ``vm``'s vda (a VM, or a domain name) to ``dest``, for the agent
    of ``node`` (None: no spec.nodeName, the object is claimed by domain); ``fields`` add to
    or replace the others (disk, pivot, bandwidth, flags...)."""
    spec = {"domain": vm if isinstance(vm, str) else vm.name, "disk": "vda", "dest": dest}
    if node is not None:
        spec["nodeName"] = node
    return {**spec, **fields}


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


class BlockCopies:
    """Create / read / patch / delete BlockCopy objects in one namespace."""

    def __init__(self, api: kubernetes.client.CustomObjectsApi, namespace: str,
                 kubectl: Kubectl):
        self.api, self.namespace, self.kubectl = api, namespace, kubectl

    def create(self, spec: dict[str, Any], name: str | None = None,
               labels: dict[str, str] | None = None) -> str:
        name = name or f"bc-{uuid.uuid4().hex[:6]}"
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                "metadata": {"name": name, "labels": labels or {}}, "spec": spec}
        self.apply_manifest(body)
        return name

    def apply_manifest(self, body: dict[str, Any]) -> None:
        self.kubectl("apply", "-n", self.namespace, "-f", "-", input=yaml.safe_dump(body))

    def get(self, name: str) -> dict[str, Any]:
        return cast(dict[str, Any], self.api.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name))

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name,
                                                {"spec": spec})

    def patch_status(self, name: str, status: dict[str, Any]) -> None:
        """Write status directly, as the agent would."""
        self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL,
                                                       name, {"status": status})

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def wait_phase(self, name: str, *phases: str, timeout: float = 90) -> dict[str, Any]:
        try:
            return wait_for(phase_in(self, name, *phases), timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatus: {self.status(name)}") from None

    def wait_copying(self, name: str, *, counter: str = "end", above: int = 1,
                     timeout: float = 60) -> dict[str, Any]:
        """Copying, with libvirt's counter (end > 1: the job started; cur > 0: bytes copied)
        already in status."""
        return wait_for(copying_with(self, name, counter=counter, above=above), timeout)

    def events(self, core: kubernetes.client.CoreV1Api, name: str
               ) -> list[kubernetes.client.CoreV1Event]:
        items = core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}").items
        return sorted(items, key=lambda e: (e.first_timestamp or e.event_time or 0,
                                            e.metadata.name))
