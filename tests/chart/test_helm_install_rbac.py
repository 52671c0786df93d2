"""`helm install` into the real local API server (RBAC on), then the agent runs with the chart's
ServiceAccount token, exactly as a DaemonSet pod would (same environment, same identity; there
is no kubelet here, so it runs as a local process):

- sufficient: it claims a BlockCopy, copies a real VM's disk and pivots it (libvirt sees the VM
  on the copy), writes status, its label, its finalizer and Events, serves /healthz and /metrics,
  and never hits a 403;
- not too wide: the ServiceAccount's effective rights (SelfSubjectRulesReview) are exactly the
  chart's ClusterRole, and real requests for Secrets, other resources, and writes of a
  BlockCopy other than patches (create, update, delete) are refused with 403.

The CRD: installed by `helm install` from the chart's crds/ (Helm 4 applies it server-side), as
users install it. It is shared by every test on this API server (the e2e suite applies the same
file with `kubectl apply`, the documented upgrade path), so both ways must coexist.

Isolation (tests/support/isolation.py): the release has a namespace of its own; each test that
makes BlockCopies makes them in its own namespace. Like the DaemonSet, the agent watches every
namespace (a cluster-wide agent, started by the shared launcher with the chart's environment and
arguments); its node name is the test's and the BlockCopy names it in spec.nodeName, so no other
agent on this machine takes it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from blockcopy.kubectl.names import RESOURCE
from blockcopy.model.api import FINALIZER, GROUP, KIND, NODE_LABEL, PLURAL, VERSION
from blockcopy.model.inventory import INVENTORY_PLURAL
from support.agents import Agent, free_port, http_get
from support.cluster import apply_crd, custom_objects, token_kubeconfig
from support.helm import (
    NO_USER_ROLES,
    USER_ROLES,
    agent_part,
    by_kind,
    controller_part,
    install_with_user_roles,
    one,
    user_roles_turn,
)
from support.inventories import raw_inventory, wait_domain
from support.isolation import create_namespace, release_namespace, unique, unique_node
from support.libvirt_probes import live_disk_source, live_mirror
from support.paths import CHART, KUBECTL
from support.waits import wait_for

pytestmark = pytest.mark.e2e

PLUGIN_BIN = pathlib.Path(sys.executable).parent  # where pip put kubectl-blockcopy


def install(helm, namespace: str, name: str, *args: str) -> tuple[str, list[dict]]:
    """`helm install` of the chart (crds/ included): its stderr and the release's objects."""
    proc = helm.run("install", name, str(CHART), "--namespace", namespace, *args)
    return proc.stderr, helm.manifest(name, namespace)


def sa_kubeconfig_for(docs: list[dict], namespace: str, kubectl, cluster: pathlib.Path,
                      path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig with the release's ServiceAccount token and the admin kubeconfig's CA."""
    sa = one(agent_part(docs), "ServiceAccount")["metadata"]["name"]
    return token_kubeconfig(kubectl, sa, namespace, path, admin=cluster)


def agent_role(docs: list[dict]) -> dict:
    """The agent's ClusterRole (the others are the user roles, userRoles.create)."""
    (role,) = [d for d in by_kind(agent_part(docs), "ClusterRole")
               if d["metadata"]["name"] not in USER_ROLES]
    return role


@pytest.fixture(scope="module")
def release(kubectl, cluster, cluster_helm):
    """A fresh namespace and a uniquely named release of the chart in it, crds/ included,
    with the default values (so the fixed-name user ClusterRoles too: this module holds
    their turn while the release exists)."""
    namespace = create_namespace(kubectl, "chart")
    name = unique("bc").replace("-", "")
    with user_roles_turn():
        proc = install_with_user_roles(cluster_helm, name, namespace,
                                       before=lambda: apply_crd(kubectl))
        try:
            assert "Warning" not in proc.stderr, proc.stderr
            kubectl("wait", "--for=condition=Established", f"crd/{RESOURCE}",
                    "--timeout=60s")
            yield {"namespace": namespace, "name": name,
                   "docs": cluster_helm.manifest(name, namespace)}
        finally:
            # The ClusterRoles and ClusterRoleBinding are cluster-scoped: never leave them.
            cluster_helm.run("uninstall", name, "--namespace", namespace, check=False)
            release_namespace(custom_objects(cluster), kubectl, namespace)


@pytest.fixture(scope="module")
def sa_kubeconfig(release, kubectl, cluster, tmp_path_factory) -> pathlib.Path:
    return sa_kubeconfig_for(release["docs"], release["namespace"], kubectl, cluster,
                             tmp_path_factory.mktemp("sa") / "kubeconfig")


def test_install_created_the_release_objects(release, kubectl):
    ns = release["namespace"]
    kinds = sorted(d["kind"] for d in agent_part(release["docs"]))
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRole", "ClusterRole",
                     "ClusterRoleBinding",
                     "DaemonSet", "Service", "ServiceAccount"]
    assert sorted(d["kind"] for d in controller_part(release["docs"])) == [
        "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    roles = {d["metadata"]["name"] for d in by_kind(agent_part(release["docs"]), "ClusterRole")}
    assert roles == {agent_role(release["docs"])["metadata"]["name"], *USER_ROLES}
    for doc in release["docs"]:
        scope = [] if doc["kind"].startswith("Cluster") else ["--namespace", ns]
        kubectl("get", doc["kind"].lower(), doc["metadata"]["name"], *scope)


def test_identity_is_the_service_account(release, sa_kubeconfig, kubectl):
    sa = one(agent_part(release["docs"]), "ServiceAccount")["metadata"]["name"]
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
              "spec": {"resourceAttributes": {"verb": "list", "group": GROUP,
                                              "resource": PLURAL}}}
    out = kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review),
                  kubeconfig=sa_kubeconfig).stdout
    assert json.loads(out)["status"]["allowed"] is True
    # and the admin's token is not what we use:
    assert sa in kubectl("get", "secrets", "--namespace", release["namespace"], check=False,
                         kubeconfig=sa_kubeconfig).stderr


def effective_rules(kubectl, kubeconfig, namespace: str) -> set[tuple[str, str, str]]:
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
              "spec": {"namespace": namespace}}
    out = kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review),
                  kubeconfig=kubeconfig).stdout
    rules = set()
    for rule in json.loads(out)["status"]["resourceRules"]:
        assert not rule.get("resourceNames"), rule
        for group in rule.get("apiGroups", []):
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    rules.add((group, resource, verb))
    return rules


# What every authenticated user may do on any cluster (system:basic-user, and on current
# releases reading the cluster's trust bundles): not the chart's.
BASELINE = {("authorization.k8s.io", "selfsubjectaccessreviews", "create"),
            ("authorization.k8s.io", "selfsubjectrulesreviews", "create"),
            ("authentication.k8s.io", "selfsubjectreviews", "create"),
            *(("certificates.k8s.io", "clustertrustbundles", verb)
              for verb in ("get", "list", "watch"))}


def test_rights_are_exactly_the_cluster_role(release, sa_kubeconfig, kubectl):
    role = agent_role(release["docs"])
    declared = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]}
    assert declared == {
        (GROUP, PLURAL, "list"),
        (GROUP, PLURAL, "watch"),
        (GROUP, PLURAL, "patch"),
        (GROUP, f"{PLURAL}/status", "patch"),
        (GROUP, INVENTORY_PLURAL, "create"),
        (GROUP, f"{INVENTORY_PLURAL}/status", "patch"),
        ("", "events", "create"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }
    # Both in the release's namespace and in any other one (a ClusterRoleBinding).
    for namespace in (release["namespace"], "default"):
        effective = effective_rules(kubectl, sa_kubeconfig, namespace) - BASELINE
        assert effective == declared, effective ^ declared


def can_i(kubectl, kubeconfig, *args: str) -> bool:
    proc = kubectl("auth", "can-i", *args, check=False, kubeconfig=kubeconfig)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


@pytest.mark.parametrize("args", [
    ["get", "secrets"], ["list", "secrets", "-A"], ["watch", "secrets"],
    ["get", "configmaps"], ["list", "pods", "-A"], ["list", "namespaces"],
    ["create", "leases.coordination.k8s.io"],
    ["create", RESOURCE], ["update", RESOURCE],
    ["delete", RESOURCE], ["get", RESOURCE],
    ["update", RESOURCE, "--subresource=status"],
    ["patch", "customresourcedefinitions.apiextensions.k8s.io"],
    ["delete", "events"], ["patch", "events"], ["list", "events"],
    ["create", "clusterrolebindings.rbac.authorization.k8s.io"],
    ["patch", "daemonsets.apps"],
    # The node inventory: written blind (create, status patch), never read or deleted.
    ["get", f"{INVENTORY_PLURAL}.{GROUP}"], ["list", f"{INVENTORY_PLURAL}.{GROUP}"],
    ["delete", f"{INVENTORY_PLURAL}.{GROUP}"], ["patch", f"{INVENTORY_PLURAL}.{GROUP}"],
])
def test_refused(release, sa_kubeconfig, kubectl, args):
    assert not can_i(kubectl, sa_kubeconfig, *args, "--namespace", release["namespace"])


@pytest.fixture
def agent(release, sa_kubeconfig, agent_factory, node) -> Agent:
    """blockcopy-operator as the DaemonSet would run it: the container's environment and
    arguments from the rendered chart, the ServiceAccount's credentials, the test's node name,
    every namespace watched. Not started yet."""
    (container,) = one(release["docs"], "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert "NODE_NAME" not in env  # from the downward API in the pod
    # Other agents on this machine may use the chart's ports: pick free ones.
    env.update(BLOCKCOPY_METRICS_PORT=str(free_port()), BLOCKCOPY_LIVENESS_PORT=str(free_port()))
    return agent_factory(node, start=False, clusterwide=True, status_interval=None,
                         extra_args=container["args"], env=env, kubeconfig=sa_kubeconfig)


def port(agent: Agent, which: str) -> int:
    return int(agent.env[f"BLOCKCOPY_{which}_PORT"])


@pytest.fixture
def vm(vms):
    return vms(name="chart", layers=2)


def get_bc(kubectl, namespace: str, name: str) -> dict | None:
    proc = kubectl("get", RESOURCE, name, "--namespace", namespace,
                   "-o", "json", check=False)
    if proc.returncode != 0:
        assert "NotFound" in proc.stderr, proc.stderr
        return None
    return json.loads(proc.stdout)


def test_agent_as_the_service_account_copies_and_pivots(release, agent, vm, kubectl,
                                                        sa_kubeconfig, namespace):
    ns, name = namespace, "copy-vda"
    dest = f"{vm.workdir}/copy.qcow2"
    allowed = agent.env["BLOCKCOPY_ALLOWED_PATHS"].split(":")
    assert any(dest.startswith(root.rstrip("/") + "/") for root in allowed), (dest, allowed)
    agent.start()
    assert http_get(port(agent, "LIVENESS"), "/healthz")[0] == 200

    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": ns},
            "spec": {"domain": vm.name, "disk": "vda", "dest": dest, "pivot": True,
                     "nodeName": agent.node}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
    started = time.monotonic()

    def pivoted():
        obj = get_bc(kubectl, ns, name) or {}
        phase = (obj.get("status") or {}).get("phase")
        assert phase != "Failed", obj.get("status")
        return obj if phase == "Pivoted" else None
    try:
        obj = wait_for(pivoted, 180, interval=0.5, what=f"{name} to pivot")
    except AssertionError:
        print(agent.log()[-6000:])
        raise
    print(f"copy + pivot as the ServiceAccount took {time.monotonic() - started:.1f} s")

    # libvirt: the VM runs on the copy.
    assert live_disk_source(vm) == dest
    assert live_mirror(vm) is None
    # Everything the agent writes got written with the chart's rights.
    assert obj["metadata"]["labels"][NODE_LABEL] == agent.node
    assert FINALIZER in obj["metadata"].get("finalizers", [])
    assert obj["status"]["nodeName"] == agent.node
    assert obj["metadata"]["generation"] == 1  # the agent never wrote spec
    events = json.loads(kubectl("get", "events", "--namespace", ns, "-o", "json",
                                "--field-selector", f"involvedObject.name={name}").stdout)
    reasons = {e["reason"] for e in events["items"]}
    assert "Pivoted" in reasons, reasons
    status, text = http_get(port(agent, "METRICS"), "/metrics")
    assert status == 200 and "blockcopy" in text
    # Its node inventory, published with the chart's rights (create, then status patches).
    wait_domain(custom_objects(), agent.node, vm.name,
                lambda d: d is not None and d.disk("vda") is not None
                and d.disk("vda").source == dest)

    # Deleting the object: the agent (as the ServiceAccount) removes its finalizer.
    kubectl("delete", RESOURCE, name, "--namespace", ns, "--wait=false")
    wait_for(lambda: get_bc(kubectl, ns, name) is None, 60, what=f"{name} to be deleted")

    log = agent.log()
    # Without the lines' timestamps: their milliseconds are "403" once in a thousand lines.
    messages = re.sub(r"^\[[^\]]*\] ", "", log, flags=re.M)
    assert not re.search(r"\b403\b|forbidden", messages, re.I), log[-6000:]
    assert agent.proc.poll() is None, log[-6000:]


def test_service_account_requests_are_refused(release, sa_kubeconfig, kubectl, namespace):
    """Real requests with the agent's own client library and identity, not just reviews:
    403 for what the agent must never do; what it must do goes through. (In the test's
    namespace: the chart's rights are a ClusterRoleBinding, the same in every namespace.)"""
    ns, name = namespace, "refusals"
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": ns},
            "spec": {"domain": "nothing-here", "disk": "vda",
                     "dest": "/var/lib/libvirt/images/none.qcow2",
                     "nodeName": unique_node("no-such-node")}}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
    client = kubernetes.config.new_client_from_config(config_file=str(sa_kubeconfig))
    core = kubernetes.client.CoreV1Api(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    try:
        current = get_bc(kubectl, ns, name)
        changed = {**current, "spec": {**current["spec"], "pivot": True}}
        forbidden = {
            "read a Secret": lambda: core.list_namespaced_secret(ns),
            "list Secrets everywhere": lambda: core.list_secret_for_all_namespaces(),
            "create a Secret": lambda: core.create_namespaced_secret(
                ns, {"metadata": {"name": "stolen"}, "stringData": {"a": "b"}}),
            "list Pods": lambda: core.list_namespaced_pod(ns),
            "read ConfigMaps": lambda: core.list_namespaced_config_map(ns),
            "get one BlockCopy (the watch carries them)":
                lambda: custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name),
            "update a BlockCopy's spec (PUT)": lambda: custom.replace_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name, changed),
            "create a BlockCopy": lambda: custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, {**body, "metadata": {"name": "forged"}}),
            "delete a BlockCopy": lambda: custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name),
            "replace status (PUT)": lambda: custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, ns, PLURAL, name, changed),
        }
        for what, call in forbidden.items():
            with pytest.raises(ApiException) as info:
                call()
            assert info.value.status == 403, (what, info.value)
        # What it needs, it can: list everywhere, patch status, post an Event.
        listed = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        assert name in {o["metadata"]["name"] for o in listed["items"]}
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, {"status": {"message": "written as the agent"}})
        core.create_namespaced_event(ns, {
            "metadata": {"generateName": f"{name}."}, "type": "Normal", "reason": "Test",
            "message": "posted as the agent",
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                               "namespace": ns, "name": name}})
        obj = get_bc(kubectl, ns, name)
        assert obj["status"]["message"] == "written as the agent"
        assert obj["spec"].get("pivot") is False and obj["metadata"]["generation"] == 1
    finally:
        kubectl("delete", RESOURCE, name, "--namespace", ns,
                "--wait=false", check=False)


def test_rbac_does_not_cover_spec_patches(release, sa_kubeconfig, kubectl):
    """The one thing RBAC cannot refuse, documented rather than hidden: the agent must patch
    the main resource (claim label, finalizer), and `patch` cannot be limited to metadata.
    The agent never writes spec (test above: generation stays 1); specGuard.enabled=true makes
    the API server refuse it (test_spec_guard_enforced_by_the_api_server)."""
    assert can_i(kubectl, sa_kubeconfig, "patch", RESOURCE,
                 "--namespace", release["namespace"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["specGuard"] == {"enabled": False}


def test_spec_guard_enforced_by_the_api_server(kubectl, cluster_helm, cluster, tmp_path,
                                               namespace):
    """specGuard.enabled=true on a real server (ValidatingAdmissionPolicy, GA since 1.30): the
    agent's ServiceAccount can claim (label), finalize and write status, but not change spec;
    a user still can. A release of its own, in the test's namespace."""
    release_name = unique("bg").replace("-", "")
    nobody = unique_node("nobody")  # a node without an agent
    apply_crd(kubectl)  # this checkout's, as the e2e suite applies it (see the docstring)
    _, docs = install(cluster_helm, namespace, release_name, "--set", "specGuard.enabled=true",
                      *NO_USER_ROLES)
    try:
        config = sa_kubeconfig_for(docs, namespace, kubectl, cluster, tmp_path / "kubeconfig")
        name = "guarded"
        kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"domain": "d", "disk": "vda", "nodeName": nobody,
                     "dest": "/var/lib/libvirt/images/g.qcow2"}}))
        as_agent = kubernetes.client.CustomObjectsApi(
            kubernetes.config.new_client_from_config(config_file=str(config)))

        def patch(body: dict, status: bool = False):
            call = (as_agent.patch_namespaced_custom_object_status if status
                    else as_agent.patch_namespaced_custom_object)
            return call(GROUP, VERSION, namespace, PLURAL, name, body)

        # The policy's binding is evaluated by the server a moment after it is created.
        def refused_spec_write():
            try:
                patch({"spec": {"pivot": True}})
            except ApiException as exc:
                return exc
            patch({"spec": {"pivot": False}})  # it went through: undo, and look again
            return None
        exc = wait_for(refused_spec_write, 30, interval=1, what="the spec guard to be active")
        assert exc.status in (403, 422), exc
        assert "never writes spec" in exc.body, exc.body
        patch({"metadata": {"labels": {NODE_LABEL: nobody}, "finalizers": [FINALIZER]}})
        patch({"status": {"message": "written by the agent"}}, status=True)
        obj = get_bc(kubectl, namespace, name)
        assert obj["metadata"]["labels"][NODE_LABEL] == nobody
        assert obj["status"]["message"] == "written by the agent"
        assert obj["spec"]["pivot"] is False
        # A user (admin here) still changes spec freely.
        kubectl("patch", "bc", name, "-n", namespace, "--type=merge", "-p",
                '{"spec":{"pivot":true}}')
        assert get_bc(kubectl, namespace, name)["spec"]["pivot"] is True
        kubectl("patch", "bc", name, "-n", namespace, "--type=merge", "-p",
                '{"metadata":{"finalizers":null}}')
    finally:
        cluster_helm.run("uninstall", release_name, "--namespace", namespace, check=False)


def test_only_the_admin_role_reads_the_node_inventories(release, kubectl, namespace, node,
                                                        agent_factory, tmp_path):
    """The inventories name every tenant's VMs: blockcopy-admin reads them, blockcopy-viewer
    and blockcopy-editor do not, and `kubectl blockcopy move` says which role it takes."""
    agent_factory()  # publishes the inventory of the test's node
    wait_for(lambda: raw_inventory(custom_objects(), node), 30, what=f"the inventory of {node}")
    identities, bindings = {}, []
    for role in ("blockcopy-viewer", "blockcopy-editor", "blockcopy-admin"):
        sa = role.replace("blockcopy-", "inventory-")
        kubectl("create", "serviceaccount", sa, "--namespace", namespace)
        bindings.append(f"{sa}-{namespace}")
        kubectl("create", "clusterrolebinding", bindings[-1], f"--clusterrole={role}",
                f"--serviceaccount={namespace}:{sa}")
        identities[role] = token_kubeconfig(kubectl, sa, namespace, tmp_path / f"{sa}.conf")
    resource = f"{INVENTORY_PLURAL}.{GROUP}"
    try:
        for verb in ("get", "list", "watch"):
            assert can_i(kubectl, identities["blockcopy-admin"], verb, resource)
            assert not can_i(kubectl, identities["blockcopy-viewer"], verb, resource)
            assert not can_i(kubectl, identities["blockcopy-editor"], verb, resource)
        assert not can_i(kubectl, identities["blockcopy-admin"], "patch", resource)

        def move(role: str, expect: int) -> str:
            env = {**os.environ, "KUBECONFIG": str(identities[role]),
                   "PATH": f"{PLUGIN_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
            env.pop("KUBERNETES_SERVICE_HOST", None)
            proc = subprocess.run(
                [str(KUBECTL), "blockcopy", "move", "bct-nowhere", "--to", "/x", "--node",
                 node, "-n", namespace, "--dry-run"],
                env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == expect, (role, proc.returncode, proc.stderr)
            return proc.stderr
        for role in ("blockcopy-viewer", "blockcopy-editor"):
            refused = move(role, 4)
            assert "forbidden" in refused and "needs the blockcopy-admin ClusterRole" in refused
        # The admin reads it: the domain is just not there.
        assert f"no domain 'bct-nowhere' in the node inventory of node '{node}'" in \
            move("blockcopy-admin", 3)
    finally:
        for binding in bindings:
            kubectl("delete", "clusterrolebinding", binding, "--ignore-not-found")
