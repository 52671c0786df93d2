"""The Helm chart: lint, render, offline validation against every Kubernetes minor version from
1.31 (the chart's kubeVersion) to the newest that kubernetes-validate ships, one source of
truth for the CRD, the values schema, and the multi-tenancy parts (the policy ConfigMap the
agent reads, the admission policy's CEL checked against the agent's own policy with
cel-python, the user ClusterRoles). No cluster needed."""

from __future__ import annotations

import filecmp
import json
import os
import re
import tarfile

import celpy
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from packaging.version import Version

from blockcopy.core import policy as agent_policy
from blockcopy.model.api import GROUP, PLURAL
from blockcopy.model.inventory import INVENTORY_PLURAL
from blockcopy.model.plan import PLAN_PLURAL
from support.helm import USER_ROLES, agent_part, by_kind, controller_part, one
from support.paths import CHART, CRD, CRDS, PLAN_CRD

TOP_CRD = CRD
# Every CRD of the API (crds/), each linked from the chart's crds/.
TOP_CRDS = sorted(CRDS.glob("*.yaml"))


def crd_name(crd: dict) -> str:
    return str(crd["metadata"]["name"])


EXPECTED_CRDS = sorted((yaml.safe_load(p.read_text()) for p in TOP_CRDS), key=crd_name)
CHART_CRD = CHART / "crds" / "blockcopy.yaml"

# A tenant policy (values policy.rules) with every kind of pattern the agent's globs know.
RULES = [
    {"namespaces": ["team-a", "team-a-*"], "domains": ["web-*", "db-1"],
     "destinations": ["/srv/bct-vm/team-a/", "/srv/bct-vm/shared"]},
    {"namespaces": ["team-[bc]", "lab?"], "tenant": "team-b",
     "destinations": ["/srv/bct-vm/team-b"]},
    {"namespaces": ["ops-[!x]*"], "domains": ["*"], "destinations": ["/srv/bct-vm/o'brien"]},
]
POLICY = ["--set-json", f"policy.rules={json.dumps(RULES)}"]

# The value sets rendered in the tests below: the defaults, and every optional part switched on.
ALL_ON = [*POLICY, "--set", "admissionPolicy.enabled=true",
          "--set", "metrics.serviceMonitor.enabled=true", "--set", "specGuard.enabled=true",
          "--set", "metrics.serviceMonitor.interval=30s",
          "--set-string", "nodeSelector.blockcopy\\.dev/hypervisor=true",
          "--set", "priorityClassName=system-node-critical",
          "--set", "podAnnotations.example\\.com/team=storage",
          "--set-json",
          'tolerations=[{"key":"hypervisor","operator":"Exists","effect":"NoSchedule"}]',
          "--set-json", 'allowedPaths=["/var/lib/libvirt/images","/srv/vm-storage"]',
          "--set-json", 'extraArgs=["--verbose"]', "--set", "logFormat=json",
          "--set", "image.digest=sha256:" + "0" * 64]

# Kinds that kubernetes-validate has no schema for, with the Kubernetes minor version from
# which the built-in ones exist. ServiceMonitor is a prometheus-operator CRD (checked by hand).
NOT_BUILT_IN = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SINCE = {("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"): Version("1.30"),
         ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding"): Version("1.30")}


OLDEST = Version(re.fullmatch(r">=(\d+\.\d+)\.0-0",
                              yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])[1])


def minor_versions() -> list[str]:
    """Every minor version the installed kubernetes-validate ships, from the oldest the chart
    supports (Chart.yaml's kubeVersion) on."""
    found = sorted({Version(".".join(v.split(".")[:2])) for v in
                    kubernetes_validate.utils.all_versions()})
    return [str(v) for v in found if v >= OLDEST]


VERSIONS = minor_versions()


def test_validator_ships_recent_versions():
    # Guards the parametrisation below: an empty or stale list would silently test nothing.
    assert VERSIONS[0] == "1.31" == str(OLDEST)
    assert Version(VERSIONS[-1]) >= Version("1.35"), VERSIONS


def test_helm_lint_strict_is_clean(helm):
    for extra in ([], ALL_ON):
        proc = helm.run("lint", "--strict", str(CHART), *extra)
        assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout, proc.stdout
        problems = [line for line in proc.stdout.splitlines()
                    if line.startswith(("[WARNING]", "[ERROR]"))]
        assert problems == [], proc.stdout


def test_template_renders_the_agent(helm):
    everything = helm.render()
    assert sorted(d["kind"] for d in controller_part(everything)) == [
        "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    docs = agent_part(everything)
    kinds = sorted(d["kind"] for d in docs)
    # The agent's ClusterRole, and blockcopy-viewer / -editor / -admin (userRoles.create).
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRole", "ClusterRole",
                     "ClusterRoleBinding", "DaemonSet", "Service", "ServiceAccount"]
    assert {r["metadata"]["name"] for r in by_kind(docs, "ClusterRole")} >= set(USER_ROLES)
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["BLOCKCOPY_ALLOWED_PATHS"]["value"] == "/var/lib/libvirt/images"
    assert env["BLOCKCOPY_METRICS_PORT"]["value"] == "8080"
    assert env["BLOCKCOPY_LIVENESS_PORT"]["value"] == "8081"
    assert env["LIBVIRT_URI"]["value"] == "qemu:///system"
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    sc = agent["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    # Reading images for the check at the switch (libvirt gives them to QEMU's user, 0600).
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["DAC_READ_SEARCH"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not sc.get("privileged")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert volumes["libvirt-run"]["hostPath"] == {"path": "/var/run/libvirt", "type": "Directory"}
    assert mounts["libvirt-run"]["mountPath"] == "/var/run/libvirt"
    assert volumes["allowed-path-0"]["hostPath"]["path"] == "/var/lib/libvirt/images"
    assert mounts["allowed-path-0"] == {"name": "allowed-path-0", "readOnly": True,
                                        "mountPath": "/var/lib/libvirt/images",
                                        "mountPropagation": "HostToContainer"}
    assert all(m.get("readOnly") for name, m in mounts.items() if name != "tmp")
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    svc = one(docs, "Service")
    assert svc["spec"]["clusterIP"] == "None"


def test_template_with_every_option(helm):
    docs = helm.render(*ALL_ON)
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["BLOCKCOPY_ALLOWED_PATHS"] == "/var/lib/libvirt/images:/srv/vm-storage"
    assert env["BLOCKCOPY_LOG_FORMAT"] == "json"
    assert agent["args"] == ["--status-interval=1", "--progress-budget=10", "--max-active-copies=0",
                             "--inventory-interval=300",
                             "--verbose"]
    assert agent["image"] == "ghcr.io/blockcopy/blockcopy-operator@sha256:" + "0" * 64
    assert pod["nodeSelector"] == {"blockcopy.dev/hypervisor": "true"}
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"][0]["key"] == "hypervisor"
    mounts = [m["mountPath"] for m in agent["volumeMounts"]]
    assert "/srv/vm-storage" in mounts
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["spec"]["endpoints"][0]["interval"] == "30s"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["blockcopy-system"]}
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "ValidatingAdmissionPolicy")}
    assert set(policies) == {"bc-blockcopy-operator-spec-guard",
                             "bc-blockcopy-operator-destinations"}
    (cond,) = policies["bc-blockcopy-operator-spec-guard"]["spec"]["matchConditions"]
    sa = one(agent_part(docs), "ServiceAccount")["metadata"]["name"]
    assert f"system:serviceaccount:blockcopy-system:{sa}" in cond["expression"]
    bindings = {b["spec"]["policyName"] for b in by_kind(docs, "ValidatingAdmissionPolicyBinding")}
    assert bindings == set(policies)
    assert one(docs, "ConfigMap")["metadata"]["name"] == "bc-blockcopy-operator-policy"


def test_metrics_off_renders_no_service(helm):
    docs = helm.render("--set", "metrics.enabled=false", "--set", "liveness.enabled=false")
    assert by_kind(docs, "Service") == []
    (agent,) = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["BLOCKCOPY_METRICS_PORT"] == "0" and env["BLOCKCOPY_LIVENESS_PORT"] == "0"
    assert "ports" not in agent and "livenessProbe" not in agent


def test_rendering_is_independent_of_the_cluster(helm):
    # GitOps tools render without a cluster: no .Capabilities / lookup anywhere in the chart,
    # and two renders with different claimed API versions are identical.
    for path in (CHART / "templates").iterdir():
        actions = " ".join(re.findall(r"{{.*?}}", path.read_text(), re.S))
        assert ".Capabilities" not in actions, path.name
        assert not re.search(r"\blookup\b", actions), path.name
    a = helm.template(*ALL_ON).stdout
    b = helm.template(*ALL_ON, "--kube-version", "1.31.0", "--api-versions",
                      "monitoring.coreos.com/v1").stdout
    assert a == b


@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_manifests_validate(helm, version):
    """Strict offline validation (unknown fields are errors) of every rendered object,
    CRD included, against the Kubernetes schemas of one minor version."""
    docs = helm.render("--include-crds", *ALL_ON)
    checked = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in NOT_BUILT_IN:
            continue
        if key in SINCE and Version(version) < SINCE[key]:
            with pytest.raises(SchemaNotFoundError):  # genuinely absent there: documented
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert {"CustomResourceDefinition", "DaemonSet", "ClusterRole", "ClusterRoleBinding",
            "ServiceAccount", "Service"} <= set(checked)


def test_validation_is_strict(helm):
    # Negative control: the validator does reject what the API server would.
    ds = one(helm.render(), "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)
    ds = one(helm.render(), "DaemonSet")
    ds["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["type"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[0], strict=True)


def test_servicemonitor_shape(helm):
    # No schema ships for this CRD; check the fields prometheus-operator reads.
    sm = one(helm.render(*ALL_ON), "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    (endpoint,) = sm["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings"}
    assert endpoint["path"] == "/metrics"


# ------------------------------------------------------------------ the CRD: one source of truth

def test_chart_crds_are_the_repository_crds():
    # Symlinks (helm lint/template/package follow them and package the files' content), so
    # the two cannot drift; the byte comparison also covers a checkout that made them copies.
    assert [p.name for p in TOP_CRDS] == ["blockcopy.yaml", "blockcopyplan.yaml",
                                          "diskinventory.yaml"]
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [p.name for p in TOP_CRDS]
    for top in TOP_CRDS:
        linked = CHART / "crds" / top.name
        assert linked.is_symlink(), f"charts/blockcopy-operator/crds/{top.name} must link"
        assert os.readlink(linked) == f"../../../crds/{top.name}"
        assert linked.resolve() == top.resolve()
        assert filecmp.cmp(linked, top, shallow=False)


def test_packaged_chart_carries_the_crd(helm, tmp_path):
    """Every CRD of crds/ (BlockCopy, BlockCopyPlan, DiskInventory...), as its content."""
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    (tgz,) = tmp_path.glob("blockcopy-operator-*.tgz")
    with tarfile.open(tgz) as tar:
        for crd in TOP_CRDS:
            member = tar.getmember(f"blockcopy-operator/crds/{crd.name}")
            assert member.isfile()  # the content, not a dangling link
            assert tar.extractfile(member).read() == crd.read_bytes()
    assert PLAN_CRD in TOP_CRDS and TOP_CRD in TOP_CRDS
    shown = helm.run("show", "crds", str(tgz)).stdout
    assert sorted((d for d in yaml.safe_load_all(shown) if d), key=crd_name) == EXPECTED_CRDS


def test_template_includes_the_crds_only_on_request(helm):
    assert by_kind(helm.render(), "CustomResourceDefinition") == []
    crds = by_kind(helm.render("--include-crds"), "CustomResourceDefinition")
    assert sorted(crds, key=crd_name) == EXPECTED_CRDS


# ------------------------------------------------------------------ values.schema.json

def schema_leaves(schema: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        if sub.get("properties"):
            out |= schema_leaves(sub, path + ".")
        else:
            out.add(path)
    return out


def value_leaves(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        # Free-form Kubernetes objects end the walk: they are single values of the chart.
        if isinstance(value, dict) and value and path not in FREE_FORM:
            out |= value_leaves(value, path + ".")
        else:
            out.add(path)
    return out


FREE_FORM = {"resources", "podSecurityContext", "securityContext", "updateStrategy",
             "affinity", "nodeSelector", "podAnnotations", "podLabels", "dashboard.labels"}


def test_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) - {"global"} == set(values)
    covered = schema_leaves(schema)
    missing = {leaf for leaf in value_leaves(values)
               if not any(leaf == c or leaf.startswith(c + ".") or c.startswith(leaf + ".")
                          for c in covered)}
    assert missing == set()
    # Every nested object of the chart's own values is closed too.
    for key in ("image", "serviceAccount", "rbac", "libvirt", "metrics", "liveness",
                "specGuard", "policy", "admissionPolicy", "userRoles"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    assert schema["properties"]["metrics"]["properties"]["serviceMonitor"][
        "additionalProperties"] is False


@pytest.mark.parametrize("args, message", [
    (["--set", "nodeSelectr.a=b"], "nodeSelectr"),                          # unknown value
    (["--set", "metrics.serviceMonitor.enabeld=true"], "enabeld"),          # unknown nested
    (["--set", "metrics.port=eighty"], "metrics"),                          # wrong type
    (["--set", "liveness.enabled=maybe"], "liveness"),                      # wrong type
    (["--set-json", "allowedPaths=\"/var/lib/libvirt/images\""], "allowedPaths"),
    (["--set-json", "allowedPaths=[\"relative/dir\"]"], "allowedPaths"),
    (["--set-json", "allowedPaths=[]"], "allowedPaths"),
    (["--set", "logFormat=xml"], "logFormat"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    # The tenant policy: what the agent would refuse at start, refused at install.
    (["--set-json", 'policy.rules={"namespaces":["a"]}'], "policy/rules"),
    (["--set-json", 'policy.rules=[{"namespaces":["a"],"domains":["x"]}]'], "destinations"),
    (["--set-json", 'policy.rules=[{"namespaces":["a"],"destinations":["/d"]}]'],
     "policy/rules/0"),  # neither domains nor a tenant
    (["--set-json", 'policy.rules=[{"namespaces":[],"domains":["x"],"destinations":["/d"]}]'],
     "namespaces"),
    (["--set-json", 'policy.rules=[{"namespaces":["a"],"tenant":"","destinations":["/d"]}]'],
     "tenant"),
    (["--set-json", 'policy.rules=[{"namespaces":["a"],"domains":["x"],"destinations":["d"]}]'],
     "destinations/0"),  # relative
    (["--set-json",
      'policy.rules=[{"namespaces":["a"],"domains":["x"],"destinations":["/d/../e"]}]'],
     "destinations/0"),  # the admission policy compares paths as written
    (["--set-json", 'policy.rules=[{"namespaces":["Team-A"],"domains":["x"],'
                    '"destinations":["/d"]}]'], "namespaces/0"),  # no such namespace name
    (["--set-json", 'policy.rules=[{"namespaces":["team-["],"domains":["x"],'
                    '"destinations":["/d"]}]'], "namespaces/0"),  # would not compile as CEL
    (["--set-json", 'policy.rules=[{"namespaces":["a"],"domains":["x"],"destinations":["/d"],'
                    '"dest":"/typo"}]'], "dest"),
    (["--set", "admissionPolicy.enabled=maybe"], "admissionPolicy"),
    (["--set-string", "userRoles.create=true"], "userRoles"),
])
def test_schema_rejects_bad_values(helm, args, message):
    stderr = helm.schema_refusal(*args)
    assert message in stderr, stderr


def test_inconsistent_values_fail(helm):
    proc = helm.template("--set", "metrics.enabled=false",
                         "--set", "metrics.serviceMonitor.enabled=true", check=False)
    assert proc.returncode != 0 and "needs metrics.enabled" in proc.stderr
    proc = helm.template("--set", "liveness.port=8080", check=False)
    assert proc.returncode != 0 and "must differ" in proc.stderr
    proc = helm.template("--set", "admissionPolicy.enabled=true", check=False)
    assert proc.returncode != 0 and "admissionPolicy.enabled needs policy.rules" in proc.stderr


def test_notes_render(helm):
    out = helm.run("install", "bc", str(CHART), "--dry-run=client", "--namespace", "vms").stdout
    assert "Destinations (spec.dest) must lie under: /var/lib/libvirt/images" in out
    assert "helm show crds" in out and "kubectl apply -f -" in out


def test_readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    table = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", readme, re.M)}
    assert value_leaves(values) <= table, value_leaves(values) - table


# ------------------------------------------------------------------ multi-tenancy


def test_multi_tenancy_parts_are_off_by_default_but_the_user_roles(helm):
    docs = agent_part(helm.render())
    assert by_kind(docs, "ConfigMap") == [] and by_kind(docs, "ValidatingAdmissionPolicy") == []
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert "BLOCKCOPY_POLICY" not in {e["name"] for e in agent["env"]}
    assert "policy" not in {v["name"] for v in pod["volumes"]}
    assert "checksum/policy" not in (one(docs, "DaemonSet")["spec"]["template"]["metadata"]
                                     .get("annotations") or {})
    roles = {r["metadata"]["name"] for r in by_kind(agent_part(docs), "ClusterRole")}
    assert set(USER_ROLES) <= roles
    assert roles - set(USER_ROLES) == {"bc-blockcopy-operator"}
    off = agent_part(helm.render("--set", "userRoles.create=false"))
    assert {r["metadata"]["name"] for r in by_kind(off, "ClusterRole")} == \
        {"bc-blockcopy-operator"}


def test_user_roles(helm):
    roles = {r["metadata"]["name"]: r for r in by_kind(helm.render(), "ClusterRole")}
    viewer, editor = roles["blockcopy-viewer"], roles["blockcopy-editor"]
    # The node inventories name every tenant's VMs: neither role reads them.
    for role in (viewer, editor):
        assert not any(r.startswith(INVENTORY_PLURAL) for rule in role["rules"]
                       for r in rule["resources"])
    labels = viewer["metadata"]["labels"]
    for role in ("view", "edit", "admin"):
        assert labels[f"rbac.authorization.k8s.io/aggregate-to-{role}"] == "true"
    verbs = {(r, v) for rule in viewer["rules"] for r in rule["resources"]
             for v in rule["verbs"] if rule["apiGroups"] == [GROUP]}
    assert verbs == {(r, v) for r in (PLURAL, f"{PLURAL}/status", PLAN_PLURAL,
                                      f"{PLAN_PLURAL}/status")
                     for v in ("get", "list", "watch")}
    # Creating a BlockCopy copies a VM's disk: never aggregated into the built-in roles.
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate")
                   for k in editor["metadata"]["labels"])
    for kind in (PLURAL, PLAN_PLURAL):  # a plan creates BlockCopies: the same privilege
        writes = {v for rule in editor["rules"] if kind in rule["resources"]
                  for v in rule["verbs"]}
        assert {"create", "update", "patch", "delete"} <= writes
        status = [rule for rule in editor["rules"] if f"{kind}/status" in rule["resources"]]
        assert [rule["verbs"] for rule in status] == [["get"]]  # status is the operator's


def test_the_admin_role_reads_the_inventories_and_owns_blockcopies(helm):
    admin = {r["metadata"]["name"]: r for r in by_kind(helm.render(), "ClusterRole")}[
        "blockcopy-admin"]
    # Never aggregated: bound on purpose (cluster-wide: the inventories are cluster-scoped).
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate")
                   for k in admin["metadata"]["labels"])
    verbs = {(r, v) for rule in admin["rules"] if rule["apiGroups"] == [GROUP]
             for r in rule["resources"] for v in rule["verbs"]}
    assert verbs == {
        *((kind, v) for kind in (PLURAL, PLAN_PLURAL)
          for v in ("get", "list", "watch", "create", "update", "patch", "delete",
                    "deletecollection")),
        (f"{PLURAL}/status", "get"), (f"{PLAN_PLURAL}/status", "get"),
        *((r, v) for r in (INVENTORY_PLURAL, f"{INVENTORY_PLURAL}/status")
          for v in ("get", "list", "watch"))}


def test_the_agent_may_publish_its_inventory_unless_it_is_off(helm):
    def inventory_rules(*args: str) -> list[dict]:
        (agent_role,) = [d for d in by_kind(helm.render(*args), "ClusterRole")
                         if d["metadata"]["name"] == "bc-blockcopy-operator"]
        return [r for r in agent_role["rules"]
                if any(x.startswith(INVENTORY_PLURAL) for x in r["resources"])]

    def args_of(*args: str) -> list[str]:
        (agent,) = one(helm.render(*args), "DaemonSet")["spec"]["template"]["spec"][
            "containers"]
        return [a for a in agent["args"] if a.startswith("--inventory-interval")]

    assert inventory_rules() == [
        {"apiGroups": [GROUP], "resources": [INVENTORY_PLURAL], "verbs": ["create"]},
        {"apiGroups": [GROUP], "resources": [f"{INVENTORY_PLURAL}/status"],
         "verbs": ["patch"]}]
    assert args_of() == ["--inventory-interval=300"]
    assert inventory_rules("--set", "inventoryInterval=0") == []
    assert args_of("--set", "inventoryInterval=0") == ["--inventory-interval=0"]
    assert args_of("--set", "inventoryInterval=60") == ["--inventory-interval=60"]


def test_policy_rules_become_the_agents_policy_file(helm):
    docs = helm.render(*POLICY)
    config_map = one(docs, "ConfigMap")
    assert config_map["metadata"]["namespace"] == "blockcopy-system"
    raw = yaml.safe_load(config_map["data"]["policy.yaml"])
    assert raw == {"rules": RULES}
    parsed = agent_policy.parse(raw)  # what the agent reads at start
    assert parsed.rules[1].tenant == "team-b" and parsed.rules[0].domains == ("web-*", "db-1")
    ds = one(docs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["BLOCKCOPY_POLICY"] == "/etc/blockcopy/policy.yaml"
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["policy"] == {"name": "policy", "mountPath": "/etc/blockcopy",
                                "readOnly": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == config_map["metadata"]["name"]
    # A change of the rules rolls the agent pods (it reads the file at start only).
    checksum = ds["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]
    changed = [{**RULES[0], "destinations": ["/srv/bct-vm/elsewhere"]}, *RULES[1:]]
    other = one(helm.render("--set-json", f"policy.rules={json.dumps(changed)}"), "DaemonSet")
    assert other["spec"]["template"]["metadata"]["annotations"]["checksum/policy"] != checksum
    assert by_kind(docs, "ValidatingAdmissionPolicy") == []  # admissionPolicy is separate


CEL = celpy.Environment()


def cel(expression: str, activation: dict) -> bool:
    program = CEL.program(CEL.compile(expression))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


@pytest.fixture(scope="module")
def destinations_policy(helm) -> dict:
    docs = helm.render(*POLICY, "--set", "admissionPolicy.enabled=true")
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}
    return policy


def admission(policy: dict, namespace: str, dest: str, old_dest: str | None = None
              ) -> tuple[bool, str | None]:
    """What the API server decides (admitted, message) for a create, or an update from
    ``old_dest``: matchConditions, then each validation in order."""
    activation = {"request": {"namespace": namespace,
                              "operation": "CREATE" if old_dest is None else "UPDATE"},
                  "object": {"spec": {"dest": dest}},
                  "oldObject": None if old_dest is None else {"spec": {"dest": old_dest}}}
    if not all(cel(c["expression"], activation) for c in policy["spec"]["matchConditions"]):
        return True, None
    for validation in policy["spec"]["validations"]:
        if not cel(validation["expression"], activation):
            message = validation.get("message") or str(
                CEL.program(CEL.compile(validation["messageExpression"])).evaluate(
                    {k: celpy.json_to_cel(v) for k, v in activation.items()}))
            return False, message
    return True, None


def test_admission_policy_shape(destinations_policy):
    spec = destinations_policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule == {"apiGroups": [GROUP], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": [PLURAL]}
    assert all(v["reason"] == "Forbidden" for v in spec["validations"])


NAMESPACES = ["team-a", "team-a-dev", "team-ab", "team-b", "team-c", "team-d", "lab1", "lab12",
              "ops-1", "ops-x1", "ops-", "other", "default"]
DESTS = ["/srv/bct-vm/team-a/x.qcow2", "/srv/bct-vm/team-a/deep/er.qcow2",
         "/srv/bct-vm/shared/x", "/srv/bct-vm/team-ab/x", "/srv/bct-vm/team-b/x.qcow2",
         "/srv/bct-vm/o'brien/x.raw", "/srv/bct-vm/x", "/etc/passwd",
         "/srv/bct-vm/team-a", "/srv/bct-vm/team-a//x"]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_admission_policy_agrees_with_the_agents_policy(destinations_policy, namespace):
    """For the sample rules, every namespace and destination: admitted at admission exactly
    when the agent's own policy (blockcopy.core.policy, fnmatch globs) lets the namespace write
    there; so the admission policy refuses early what the agent would refuse later, and
    nothing the agent would allow. (A dest equal to a root itself is no file under it: the
    agent lets it pass to its other checks, the admission policy refuses it.)"""
    rules = agent_policy.parse({"rules": RULES})
    roots = {d.rstrip("/") for rule in RULES for d in rule["destinations"]}
    for dest in DESTS:
        admitted, message = admission(destinations_policy, namespace, dest)
        agent_allows = rules.precheck(namespace=namespace, dest=dest,  # resolved as it does
                                      resolved=os.path.realpath(dest)) is None
        if dest in roots:
            assert not admitted, dest
            continue
        assert admitted == agent_allows, (namespace, dest, message)
        if not admitted:
            assert message == (f"spec.dest {dest} is outside the destination roots of "
                               f"namespace {namespace} (the blockcopy-operator destination "
                               "policy)")


@pytest.mark.parametrize("dest", ["/srv/bct-vm/team-a/../team-b/x", "/srv/bct-vm/team-a/..",
                                  "/srv/bct-vm/team-a/./x", "/srv/bct-vm/team-a/.",
                                  "/srv/bct-vm/team-a/sub/../x"])
def test_admission_policy_refuses_dot_components(destinations_policy, dest):
    admitted, message = admission(destinations_policy, "team-a", dest)
    assert not admitted and "must not contain . or .. components" in message


def test_admission_policy_judges_a_dest_when_it_is_chosen_only(destinations_policy):
    inside, outside = "/srv/bct-vm/team-a/x", "/srv/bct-vm/team-b/x"
    # An update that keeps dest (the agent's label and finalizer writes) is not judged,
    # even for an object admitted before the policy existed.
    assert admission(destinations_policy, "team-a", outside, old_dest=outside) == (True, None)
    assert not admission(destinations_policy, "team-a", outside, old_dest=inside)[0]
    assert admission(destinations_policy, "team-a", inside, old_dest=outside)[0]


def test_host_network_and_api_server_address(helm):
    """What a cluster whose pods cannot reach the `kubernetes` Service needs (the local
    one-node cluster: the API server listens on the node's loopback only)."""
    (agent_default,) = one(helm.render(), "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert not {"KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"} & {
        e["name"] for e in agent_default["env"]}
    pod = one(helm.render("--set", "hostNetwork=true", "--set", "apiServer.host=127.0.0.1",
                          "--set", "apiServer.port=16443"),
              "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "16443"
    proc = helm.template("--set", "apiServer.host=10.1.2.3", check=False)
    assert proc.returncode != 0 and "apiServer.host needs apiServer.port" in proc.stderr
    proc = helm.template("--set", "apiServer.host=https://10.1.2.3", check=False)
    assert proc.returncode != 0 and "apiServer" in proc.stderr


def test_watch_namespaces(helm):
    """The agent restricted to some namespaces: its --namespace arguments, and the namespace
    list/watch that kopf's namespaced mode needs (none without the value)."""
    def namespace_rules(docs):
        (agent_role,) = [d for d in by_kind(docs, "ClusterRole")
                         if d["metadata"]["name"].endswith("blockcopy-operator")]
        return [r for r in agent_role["rules"] if "namespaces" in r["resources"]]
    assert namespace_rules(helm.render()) == []
    docs = helm.render("--set", "watchNamespaces={team-a,team-b}")
    (agent,) = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert "--namespace=team-a" in agent["args"] and "--namespace=team-b" in agent["args"]
    assert namespace_rules(docs) == [{"apiGroups": [""], "resources": ["namespaces"],
                                      "verbs": ["list", "watch"]}]
    proc = helm.template("--set", "watchNamespaces={Team_A}", check=False)
    assert proc.returncode != 0 and "watchNamespaces" in proc.stderr


# ------------------------------------------------------------------ the plan controller


def test_the_plan_controller(helm):
    docs = controller_part(helm.render())
    deploy = one(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["--mode=controller", "--agent-timeout=900"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not pod.get("hostNetwork") and "volumes" in pod
    # Its pods are not the agents': neither the DaemonSet nor the metrics Service selects them.
    agents = agent_part(helm.render())
    selector = one(agents, "DaemonSet")["spec"]["selector"]["matchLabels"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()
    assert not one(agents, "Service")["spec"]["selector"].items() <= labels.items()
    # Its rights: plans (and their status), BlockCopies (create, patch, delete: its children),
    # inventories and nodes read only; bound to its ServiceAccount.
    role = one(docs, "ClusterRole")
    verbs = {(r["apiGroups"][0], res): set(r["verbs"]) for r in role["rules"]
             for res in r["resources"]}
    assert verbs[(GROUP, "blockcopyplans")] == {"list", "watch", "patch"}
    assert verbs[(GROUP, "blockcopyplans/status")] == {"patch"}
    assert verbs[(GROUP, PLURAL)] == {"list", "watch", "create", "patch", "delete"}
    assert verbs[(GROUP, "diskinventories")] == {"list"}
    assert verbs[("", "nodes")] == {"list"}
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    # Off: none of it.
    assert controller_part(helm.render("--set", "controller.enabled=false")) == []
    # Namespaced like the agents, with the namespace rule kopf needs.
    docs = controller_part(helm.render("--set", "watchNamespaces={team-a}"))
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--namespace=team-a" in container["args"]
    assert any("namespaces" in r["resources"] for r in one(docs, "ClusterRole")["rules"])
