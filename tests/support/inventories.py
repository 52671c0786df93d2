"""The node inventories (DiskInventory, cluster-scoped, one per node) as the tests read them:
parsed with the plugin's and the agent's own model (blockcopy.model.inventory), and waited
for until a domain shows up, changes or goes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import kubernetes

from blockcopy.model.api import GROUP, VERSION
from blockcopy.model.inventory import (
    INVENTORY_PLURAL,
    InventoryDomain,
    NodeInventory,
    parse_inventory,
)
from support.waits import wait_for


def raw_inventory(api: kubernetes.client.CustomObjectsApi, node: str) -> dict[str, Any] | None:
    try:
        return cast(dict[str, Any], api.get_cluster_custom_object(
            GROUP, VERSION, INVENTORY_PLURAL, node))
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def inventory_of(api: kubernetes.client.CustomObjectsApi, node: str) -> NodeInventory | None:
    raw = raw_inventory(api, node)
    return parse_inventory(raw.get("status") or {}) if raw is not None else None


def wait_domain(api: kubernetes.client.CustomObjectsApi, node: str, domain: str,
                check: Callable[[InventoryDomain | None], bool], *, timeout: float = 15,
                what: str = "") -> InventoryDomain | None:
    """Poll ``node``'s inventory until ``check(the domain or None)`` holds; the domain."""
    def look() -> tuple[InventoryDomain | None] | None:
        inv = inventory_of(api, node)
        found = inv.find(domain) if inv is not None else None
        return (found,) if inv is not None and check(found) else None
    return wait_for(look, timeout, interval=0.2,
                    what=what or f"domain {domain} in the inventory of {node}")[0]
