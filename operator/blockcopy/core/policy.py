"""Who may copy what: the agent's tenant policy, for clusters where several teams may create
BlockCopies. Without a policy, any BlockCopy may act on any domain of the node and write
under the agent's allowed roots (RBAC on BlockCopy objects is then the only control). With
one, a BlockCopy's namespace must match a rule that names its domain (by name pattern, or by
the tenant recorded in the domain's libvirt metadata) and a destination root that holds its
dest (so a network destination, under no root, is refused); anything else ends Failed
(Forbidden) before libvirt is asked to do anything.

The file (``--policy FILE``, a ConfigMap in the chart)::

    rules:
      - namespaces: [team-a]              # glob patterns of namespaces
        domains: ["web-*", "db-1"]        # glob patterns of spec.domain as written
        tenant: team-a                    # or: the domain's <metadata> says this tenant
        destinations: [/var/lib/libvirt/images/team-a]   # roots under the allowed roots

A domain carries its tenant in its libvirt XML::

    <metadata><blockcopy:policy xmlns:blockcopy="https://blockcopy.dev/policy/v1"
        tenant="team-a"/></metadata>

Pure: the caller reads the file (``runtime.cli``) and resolves destinations (symlinks,
``..``) before asking; roots are compared as written.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

from blockcopy.core.paths import within


class PolicyError(ValueError):
    """The policy file is not valid; the message says where."""


@dataclasses.dataclass(frozen=True)
class Rule:
    namespaces: tuple[str, ...]
    domains: tuple[str, ...] = ()
    tenant: str | None = None
    destinations: tuple[str, ...] = ()
    # The destinations after symlinks (set by ``Policy.resolving``); compared against.
    resolved_roots: tuple[str, ...] = ()

    def covers_namespace(self, namespace: str) -> bool:
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.namespaces)

    def covers_domain(self, domain: str, tenant: str | None) -> bool:
        if any(fnmatch.fnmatchcase(domain, p) for p in self.domains):
            return True
        return self.tenant is not None and tenant == self.tenant

    def covers_dest(self, resolved: str) -> bool:
        """``resolved``: the destination after symlinks and ``..`` (the caller resolves it,
        and the roots, which the runtime resolves when it loads the policy)."""
        if "://" in resolved:
            return False  # a network destination (NBD) lies under no root
        return any(within(resolved, root)
                   for root in self.resolved_roots or self.destinations)


@dataclasses.dataclass(frozen=True)
class Policy:
    """``rules`` None: no policy configured (everything within the allowed roots)."""

    rules: tuple[Rule, ...] | None = None

    @property
    def enabled(self) -> bool:
        return self.rules is not None

    def resolving(self, resolve: Callable[[str], str]) -> Policy:
        """The same rules, their roots compared as ``resolve`` (the file system) sees them."""
        if self.rules is None:
            return self
        return Policy(tuple(dataclasses.replace(
            r, resolved_roots=tuple(resolve(d) for d in r.destinations)) for r in self.rules))

    def precheck(self, *, namespace: str, dest: str, resolved: str) -> str | None:
        """Before libvirt is called: why the namespace may not write ``dest`` (``resolved``
        after symlinks and ``..``), or None."""
        if self.rules is None:
            return None
        rules = [r for r in self.rules if r.covers_namespace(namespace)]
        if not rules:
            return (f"namespace {namespace!r} may not use BlockCopy on this node (no rule of "
                    "the agent's policy covers it)")
        if not any(r.covers_dest(resolved) for r in rules):
            roots = sorted({d for r in rules for d in r.destinations})
            return (f"namespace {namespace!r} may not write {dest}: its destination roots "
                    f"are {', '.join(roots)}")
        return None

    def check(self, *, namespace: str, domain: str, tenant: str | None, dest: str,
              resolved: str) -> str | None:
        """Once the domain's tenant is known (a read-only look at libvirt), before any
        action: why the namespace may not copy ``domain`` to ``dest``, or None."""
        refused = self.precheck(namespace=namespace, dest=dest, resolved=resolved)
        if refused is not None or self.rules is None:
            return refused
        rules = [r for r in self.rules
                 if r.covers_namespace(namespace) and r.covers_domain(domain, tenant)]
        if not rules:
            of = f" (tenant {tenant!r})" if tenant else " (no tenant in its metadata)"
            return f"namespace {namespace!r} may not act on domain {domain!r}{of}"
        if not any(r.covers_dest(resolved) for r in rules):
            roots = sorted({d for r in rules for d in r.destinations})
            return (f"namespace {namespace!r} may write for domain {domain!r} only under "
                    f"{', '.join(roots)}, not {dest}")
        return None


def parse(raw: Any) -> Policy:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("rules"), list):
        raise PolicyError("a policy is a mapping with a list under 'rules'")
    rules = []
    for i, item in enumerate(raw["rules"]):
        where = f"rules[{i}]"
        if not isinstance(item, Mapping):
            raise PolicyError(f"{where} must be a mapping")
        unknown = set(item) - {"namespaces", "domains", "tenant", "destinations"}
        if unknown:
            raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
        namespaces = _strings(item.get("namespaces"), f"{where}.namespaces")
        domains = _strings(item.get("domains") or [], f"{where}.domains")
        destinations = _strings(item.get("destinations"), f"{where}.destinations")
        tenant = item.get("tenant")
        if not namespaces or not destinations:
            raise PolicyError(f"{where} needs namespaces and destinations")
        if tenant is not None and not (isinstance(tenant, str) and tenant):
            raise PolicyError(f"{where}.tenant must be a non-empty string")
        if not domains and tenant is None:
            raise PolicyError(f"{where} needs domains or a tenant")
        if any(not posixpath.isabs(d) for d in destinations):
            raise PolicyError(f"{where}.destinations must be absolute paths")
        rules.append(Rule(tuple(namespaces), tuple(domains), tenant, tuple(destinations)))
    return Policy(tuple(rules))


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where} must be a list of non-empty strings")
    return list(value)
