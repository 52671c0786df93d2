"""Issue R, item 6: tenants end to end, on the real API server (RBAC on), the real libvirtd and
the agent as a process.

Two tenant namespaces A and B, a ServiceAccount in each bound (RoleBinding, its own namespace
only) to the chart's blockcopy-editor ClusterRole, the chart installed with Helm (its
blockcopy-viewer and blockcopy-editor ClusterRoles, the policy ConfigMap), and an agent that
reads that ConfigMap's policy: namespace A may copy the domains `bct-ta-*` into root RA,
namespace B the domain whose libvirt <metadata> names tenant "tb" into root RB.

- RBAC: each tenant's identity is refused (403) in the other namespace; `view` lists
  BlockCopies but cannot create one (blockcopy-viewer is aggregated into view and edit),
  `edit` cannot create one either (blockcopy-editor is not aggregated).
- The agent's policy: each tenant copies its own VM into its own root and pivots (the live
  domain XML and qemu-img compare say so); a copy of the other tenant's VM, or into the other
  root, ends Failed/Forbidden with a Warning Event and creates nothing (no file, no block job,
  the VM untouched).
- The ValidatingAdmissionPolicy (admissionPolicy.enabled, same rules): a dest under the other
  root, or with `..`, and any dest in a namespace without a rule, are refused at admission
  with the policy's message, on create and on a change of dest; an allowed one is admitted.

Isolation: the fixed-name user ClusterRoles are taken in turns with other sessions
(support.helm.user_roles_turn). The admission policy is rendered by the chart and applied as
rendered, except that its binding is limited (matchResources.namespaceSelector) to this
module's namespaces: as the chart installs it, it judges every namespace of the cluster, and
other test sessions share this API server. Every cluster-scoped object is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from blockcopy.model.api import GROUP, KIND, PLURAL, VERSION
from support.assertions import assert_on_source, assert_untouched
from support.cluster import custom_objects, token_kubeconfig
from support.helm import NO_USER_ROLES, by_kind, install_with_user_roles, one, user_roles_turn
from support.images import assert_identical
from support.isolation import create_namespace, release_namespace, unique, unique_node
from support.libvirt_probes import live_disk_source, live_mirror, no_block_job
from support.objects import BlockCopies, condition, copy_spec
from support.paths import KUBECONFIG
from support.vms import IMAGES
from support.waits import events_of, wait_for

TENANT_B = "tb"


def create_as(kubeconfig, namespace: str, spec: dict, name: str | None = None) -> str:
    """Create a BlockCopy with the identity of ``kubeconfig`` (raises ApiException if
    refused)."""
    name = name or unique("bc")
    custom_objects(kubeconfig).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL,
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name},
         "spec": spec})
    return name


def refused(call) -> ApiException:
    with pytest.raises(ApiException) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def tenancy(cluster, kubectl, cluster_helm, api, tmp_path_factory):
    """Namespaces A and B (and the release's), roots RA and RB, the ServiceAccounts and
    their RoleBindings and kubeconfigs, and the chart installed with the policy."""
    token = uuid.uuid4().hex[:6]
    ns_a, ns_b, ns_sys = (create_namespace(kubectl, p) for p in ("ta", "tb", "tsys"))
    top = str(IMAGES / f"tenants-{token}")
    roots = {"a": os.path.join(top, "ra"), "b": os.path.join(top, "rb")}
    for d in (top, *roots.values()):
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)  # QEMU (libvirt-qemu) writes the copies
    accounts = {"alice": (ns_a, "blockcopy-editor"), "bob": (ns_b, "blockcopy-editor"),
                "viewer": (ns_a, "view"), "k8s-editor": (ns_a, "edit")}
    configs = {}
    home = tmp_path_factory.mktemp("tenants")
    for sa, (ns, role) in accounts.items():
        kubectl("create", "serviceaccount", sa, "--namespace", ns)
        kubectl("create", "rolebinding", f"{sa}-{role}", f"--clusterrole={role}",
                f"--serviceaccount={ns}:{sa}", "--namespace", ns)
        configs[sa] = token_kubeconfig(kubectl, sa, ns, home / f"{sa}.kubeconfig")
    rules = [{"namespaces": [ns_a], "domains": ["bct-ta-*"], "destinations": [roots["a"]]},
             {"namespaces": [ns_b], "tenant": TENANT_B, "destinations": [roots["b"]]}]
    release = f"tn{token}"
    namespaces = [ns_a, ns_b, ns_sys]
    try:
        with user_roles_turn():
            # crds/ skipped: the `api` fixture applied this checkout's CRD already.
            install_with_user_roles(cluster_helm, release, ns_sys, "--skip-crds",
                                    "--set-json", f"policy.rules={json.dumps(rules)}")
            docs = cluster_helm.manifest(release, ns_sys)
            yield {"token": token, "ns_a": ns_a, "ns_b": ns_b, "top": top, "roots": roots,
                   "configs": configs, "rules": rules, "release": release, "ns_sys": ns_sys,
                   "docs": docs, "namespaces": namespaces}
    finally:
        cluster_helm.run("uninstall", release, "--namespace", ns_sys, check=False)
        for ns in namespaces:
            release_namespace(api, kubectl, ns)
        shutil.rmtree(top, ignore_errors=True)


# ---------------------------------------------------------------- RBAC


def test_each_tenant_is_refused_in_the_other_namespace(tenancy):
    a, b = tenancy["ns_a"], tenancy["ns_b"]
    nowhere = unique_node("nowhere")  # no agent: the objects that get in stay unclaimed
    spec = copy_spec("bct-ta-none", node=nowhere, dest=f"{tenancy['roots']['a']}/x.qcow2")
    for sa, own, other in (("alice", a, b), ("bob", b, a)):
        config = tenancy["configs"][sa]
        exc = refused(lambda config=config, other=other: create_as(config, other, spec))
        assert exc.status == 403, exc.body
        assert f"system:serviceaccount:{own}:{sa}" in exc.body and other in exc.body
        # Nor can it read or change what is there.
        exc = refused(lambda config=config, other=other: custom_objects(
            config).list_namespaced_custom_object(GROUP, VERSION, other, PLURAL))
        assert exc.status == 403
        # In its own namespace, blockcopy-editor lets it create, read and delete.
        name = create_as(config, own, spec)
        api = custom_objects(config)
        assert api.get_namespaced_custom_object(GROUP, VERSION, own, PLURAL, name)
        api.delete_namespaced_custom_object(GROUP, VERSION, own, PLURAL, name)


def test_viewer_is_aggregated_into_view_and_edit_but_editor_is_not(tenancy, kubectl):
    """`view` (and `edit`) gain blockcopy-viewer's rules through the aggregation controller
    (kube-controller-manager), so they read BlockCopies; neither may create one: creating a
    BlockCopy copies a VM's disk, and blockcopy-editor is bound on purpose only."""
    a, b = tenancy["ns_a"], tenancy["ns_b"]
    roles = {r["metadata"]["name"]: r for r in by_kind(tenancy["docs"], "ClusterRole")}
    assert roles["blockcopy-viewer"]["metadata"]["labels"][
        "rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate-to")
                   for k in roles["blockcopy-editor"]["metadata"]["labels"])
    spec = copy_spec("bct-ta-none", node=unique_node("nowhere"),
                     dest=f"{tenancy['roots']['a']}/v.qcow2")
    for sa in ("viewer", "k8s-editor"):
        api = custom_objects(tenancy["configs"][sa])

        def can_list(api=api):
            try:
                return api.list_namespaced_custom_object(GROUP, VERSION, a, PLURAL) or True
            except ApiException as denied:
                assert denied.status == 403, denied
                return None
        wait_for(can_list, 60, interval=1, what=f"{sa} to list BlockCopies (aggregation)")
        exc = refused(lambda sa=sa: create_as(tenancy["configs"][sa], a, spec))
        assert exc.status == 403 and PLURAL in exc.body, exc.body
        # The binding is in A only.
        exc = refused(lambda api=api: api.list_namespaced_custom_object(GROUP, VERSION, b,
                                                                        PLURAL))
        assert exc.status == 403
    view = json.loads(kubectl("get", "clusterrole", "view", "-o", "json").stdout)
    assert any(PLURAL in r.get("resources", []) and "create" not in r["verbs"]
               for r in view["rules"]), view["rules"]


# ---------------------------------------------------------------- the agent's policy


@pytest.fixture
def tenant_vms(vms):
    vm_a = vms(name="ta")  # bct-ta-XXXXXX: A's by name
    vm_b = vms(name="tn", tenant=TENANT_B)  # B's by the tenant in its metadata
    assert vm_a.name.startswith("bct-ta-") and not vm_b.name.startswith("bct-ta-")
    return vm_a, vm_b


@pytest.fixture
def policy_agent(tenancy, agent_factory, node, tmp_path):
    """The agent with the chart's policy (the ConfigMap the DaemonSet mounts), watching A
    and B, its allowed root the parent of RA and RB."""
    config_map = one(tenancy["docs"], "ConfigMap")
    policy = tmp_path / "policy.yaml"
    policy.write_text(config_map["data"]["policy.yaml"])
    assert yaml.safe_load(policy.read_text()) == {"rules": tenancy["rules"]}
    return agent_factory(node, namespace=tenancy["ns_a"], extra_args=[
        "--namespace", tenancy["ns_b"], "--policy", str(policy),
        "--allowed-path", tenancy["top"]])


def assert_forbidden(blockcopies: BlockCopies, core, name: str, dest: str, *words: str):
    status = blockcopies.wait_phase(name, "Failed", "Copying", "Mirrored", "Pivoted",
                                    timeout=60)
    assert status["phase"] == "Failed", status
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "Forbidden", status
    assert "the agent's policy" in status["message"], status["message"]
    for word in words:
        assert word in status["message"], (word, status["message"])
    assert not status.get("startTime") and not status.get("createdFiles"), status
    events = wait_for(events_of(blockcopies, core, name, "Forbidden", type="Warning"), 15)
    assert status["message"] in events[0].message
    assert not os.path.lexists(dest)


def test_each_tenant_copies_its_own_vm_into_its_own_root_only(tenancy, policy_agent, node,
                                                              tenant_vms, api, kubectl, core):
    vm_a, vm_b = tenant_vms
    a, b, roots = tenancy["ns_a"], tenancy["ns_b"], tenancy["roots"]
    alice, bob = tenancy["configs"]["alice"], tenancy["configs"]["bob"]
    in_a, in_b = BlockCopies(api, a, kubectl), BlockCopies(api, b, kubectl)

    # Refused by the agent's policy, as each tenant's own identity (RBAC lets them create):
    # the other tenant's VM, or the other tenant's root. Nothing is created or started.
    forbidden = [
        (in_a, alice, vm_b, f"{roots['a']}/other-vm.qcow2", (f"domain {vm_b.name!r}",
                                                              f"tenant {TENANT_B!r}")),
        (in_a, alice, vm_a, f"{roots['b']}/other-root.qcow2", (roots["b"],)),
        (in_b, bob, vm_a, f"{roots['b']}/other-vm.qcow2", (f"domain {vm_a.name!r}",
                                                            "no tenant")),
        (in_b, bob, vm_b, f"{roots['a']}/other-root.qcow2", (roots["a"],)),
        # ..: resolved by the agent, and still the other root
        (in_a, alice, vm_a, f"{roots['a']}/../rb/dotted.qcow2", (roots["b"],)),
    ]
    names = [(bcs, create_as(config, bcs.namespace,
                             copy_spec(vm, node=node, dest=dest, pivot=True)), dest, words)
             for bcs, config, vm, dest, words in forbidden]
    for bcs, name, dest, words in names:
        assert_forbidden(bcs, core, name, os.path.normpath(dest), *words)
    for vm in (vm_a, vm_b):
        assert_untouched(vm)  # running on its source, no mirror, no block job
    assert sorted(os.listdir(roots["a"])) == sorted(os.listdir(roots["b"])) == []

    # Allowed: each tenant copies its own VM into its own root, and it pivots.
    dest_a, dest_b = f"{roots['a']}/a.qcow2", f"{roots['b']}/b.qcow2"
    ok_a = create_as(alice, a, copy_spec(vm_a, node=node, dest=dest_a, pivot=True))
    ok_b = create_as(bob, b, copy_spec(vm_b, node=node, dest=dest_b, pivot=True))
    for bcs, name, vm, dest in ((in_a, ok_a, vm_a, dest_a), (in_b, ok_b, vm_b, dest_b)):
        status = bcs.wait_phase(name, "Pivoted", "Failed", timeout=120)
        assert status["phase"] == "Pivoted", status
        assert status["nodeName"] == node
        assert live_disk_source(vm) == dest and live_mirror(vm) is None
        assert no_block_job(vm)
        assert_identical(vm.chain[0], dest)  # the copy has the guest's data
    assert os.listdir(roots["a"]) == ["a.qcow2"] and os.listdir(roots["b"]) == ["b.qcow2"]


def test_without_a_policy_the_same_copy_is_allowed(tenancy, agent_factory, node, tenant_vms,
                                                   api, kubectl):
    """The control: the default (no policy) lets A copy B's VM anywhere under the allowed
    roots; RBAC on BlockCopy is then the only control (docs/tenancy.md)."""
    vm_a, vm_b = tenant_vms
    agent_factory(node, namespace=tenancy["ns_a"],
                  extra_args=["--allowed-path", tenancy["top"]])
    dest = f"{tenancy['roots']['b']}/taken.qcow2"
    name = create_as(tenancy["configs"]["alice"], tenancy["ns_a"],
                     copy_spec(vm_b, node=node, dest=dest))
    status = BlockCopies(api, tenancy["ns_a"], kubectl).wait_phase(
        name, "Mirrored", "Failed", timeout=120)
    assert status["phase"] == "Mirrored", status
    assert live_mirror(vm_b)["source"] == dest
    custom_objects(tenancy["configs"]["alice"]).delete_namespaced_custom_object(
        GROUP, VERSION, tenancy["ns_a"], PLURAL, name)
    wait_for(lambda: no_block_job(vm_b), 60, what="the job cancelled by the deletion")
    assert_on_source(vm_b)
    assert_untouched(vm_a)


# ---------------------------------------------------------------- the admission policy


@pytest.fixture
def admission(tenancy, cluster_helm, kubectl):
    """The chart's ValidatingAdmissionPolicy for the same rules, applied as rendered, with
    its binding limited to this module's namespaces (and a third one, C, without a rule)."""
    token = tenancy["token"]
    ns_c = create_namespace(kubectl, "tc")
    tenancy["namespaces"].append(ns_c)  # released with the others
    label = f"blockcopy-test/tenants={token}"
    for ns in (tenancy["ns_a"], tenancy["ns_b"], ns_c):
        kubectl("label", "namespace", ns, label)
    docs = cluster_helm.render("--set-json", f"policy.rules={json.dumps(tenancy['rules'])}",
                               "--set", "admissionPolicy.enabled=true", *NO_USER_ROLES,
                               release=f"tv{token}", namespace=tenancy["ns_sys"])
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = next(d for d in by_kind(docs, "ValidatingAdmissionPolicyBinding")
                   if d["spec"]["policyName"] == policy["metadata"]["name"])
    assert "matchResources" not in binding["spec"]  # as the chart has it: every namespace
    binding["spec"]["matchResources"] = {
        "namespaceSelector": {"matchLabels": {"blockcopy-test/tenants": token}}}
    manifest = yaml.safe_dump_all([policy, binding])
    kubectl("apply", "-f", "-", input=manifest)
    try:
        yield {"ns_c": ns_c, "policy": policy}
    finally:
        kubectl("delete", "--ignore-not-found", "-f", "-", input=manifest)


def test_admission_policy_refuses_a_dest_outside_the_namespace_roots(tenancy, admission):
    a, b, c = tenancy["ns_a"], tenancy["ns_b"], admission["ns_c"]
    roots = tenancy["roots"]
    alice, bob = tenancy["configs"]["alice"], tenancy["configs"]["bob"]
    nowhere = unique_node("nowhere")  # no agent: admitted objects stay unclaimed

    def spec(dest: str) -> dict:
        return copy_spec("bct-ta-x", node=nowhere, dest=dest)

    # The binding takes effect a moment after it is created: until the first refusal.
    def first_refusal():
        try:
            name = create_as(alice, a, spec(f"{roots['b']}/probe.qcow2"))
        except ApiException as exc:
            return exc
        custom_objects(alice).delete_namespaced_custom_object(GROUP, VERSION, a, PLURAL, name)
        return None
    exc = wait_for(first_refusal, 60, interval=1, what="the admission policy to be active")
    outside = "is outside the destination roots of namespace"
    assert exc.status in (403, 422) and outside in exc.body and a in exc.body, exc.body
    assert "blockcopy-operator destination policy" in exc.body

    # Into the other tenant's root, either way round; with . or .. components (even ones
    # that stay inside the root: the API server cannot resolve symlinks); no rule at all.
    cases = [(alice, a, f"{roots['b']}/x.qcow2", outside),
             (bob, b, f"{roots['a']}/x.qcow2", outside),
             (alice, a, f"{roots['a']}/../rb/x.qcow2", "must not contain . or .."),
             (alice, a, f"{roots['a']}/sub/../x.qcow2", "must not contain . or .."),
             (alice, a, f"{roots['a']}/./x.qcow2", "must not contain . or .."),
             (alice, a, f"{roots['a']}-lookalike/x.qcow2", outside),
             (alice, a, roots["a"], outside),  # the root itself is no file under it
             (None, c, f"{roots['a']}/x.qcow2", f"{outside} {c}")]
    for who, ns, dest, message in cases:
        config = who or KUBECONFIG  # the admin: RBAC allows everything, the policy refuses
        exc = refused(lambda config=config, ns=ns, dest=dest: create_as(config, ns, spec(dest)))
        assert exc.status in (403, 422), (dest, exc.status, exc.body)
        assert message in exc.body, (dest, exc.body)

    # Allowed ones are admitted.
    ok_a = create_as(alice, a, spec(f"{roots['a']}/ok.qcow2"))
    ok_b = create_as(bob, b, spec(f"{roots['b']}/deeper/ok.qcow2"))
    # Changing dest is judged again: into the other root, refused; within its own, allowed.
    api_a = custom_objects(alice)
    exc = refused(lambda: api_a.patch_namespaced_custom_object(
        GROUP, VERSION, a, PLURAL, ok_a, {"spec": {"dest": f"{roots['b']}/moved.qcow2"}}))
    assert outside in exc.body, exc.body
    api_a.patch_namespaced_custom_object(GROUP, VERSION, a, PLURAL, ok_a,
                                         {"spec": {"dest": f"{roots['a']}/moved.qcow2"}})
    # A change that leaves dest alone is not judged (the agent's label and finalizer).
    api_a.patch_namespaced_custom_object(GROUP, VERSION, a, PLURAL, ok_a,
                                         {"metadata": {"labels": {"team": "a"}}})
    got = api_a.get_namespaced_custom_object(GROUP, VERSION, a, PLURAL, ok_a)
    assert got["spec"]["dest"] == f"{roots['a']}/moved.qcow2"
    assert custom_objects(bob).get_namespaced_custom_object(GROUP, VERSION, b, PLURAL, ok_b)
