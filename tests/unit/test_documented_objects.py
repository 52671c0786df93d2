"""Every object a user copies from this repository is one the API server stores as written and
the operator acts on: each manifest of examples/ and each YAML block of the README, docs/ and
the chart's README that is an object of this API (or, in docs/api.md, a BlockCopy's `spec:`)
passes its CRD's schema without a field pruned and its CEL rules (support.admission), and
the agent's (or the plan controller's) own parser."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from blockcopy.model.api import GROUP, KIND, parse_spec
from blockcopy.model.plan import PLAN_KIND, parse_plan
from support.admission import refusals
from support.paths import CHART, EXAMPLES, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), CHART / "README.md",
        EXAMPLES / "README.md"]
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)


def _objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            found.append((f"examples/{path.name}#{i}", doc))
    for doc_path in DOCS:
        for i, block in enumerate(BLOCK.findall(doc_path.read_text())):
            name = f"{doc_path.relative_to(ROOT)}#{i}"
            for j, doc in enumerate(d for d in yaml.safe_load_all(block) if d):
                if not isinstance(doc, dict):
                    continue
                if str(doc.get("apiVersion", "")).startswith(GROUP + "/"):
                    found.append((f"{name}.{j}", doc))
                elif set(doc) == {"spec"} and doc_path.name == "api.md":
                    found.append((f"{name}.{j}", {"apiVersion": f"{GROUP}/v1alpha1",
                                                  "kind": KIND, "metadata": {"name": "x"},
                                                  **doc}))
    return found


OBJECTS = _objects()


def test_the_documented_objects_are_found():
    names = {n.split("#")[0] for n, _ in OBJECTS}
    assert {"README.md", "docs/api.md", "docs/plans.md", "examples/full-copy.yaml"} <= names
    assert {o["kind"] for _, o in OBJECTS} >= {KIND, PLAN_KIND}


@pytest.mark.parametrize(("where", "obj"), OBJECTS, ids=[n for n, _ in OBJECTS])
def test_the_api_server_stores_it_as_written(where, obj):
    assert refusals(obj) == [], where


@pytest.mark.parametrize(("where", "obj"), OBJECTS, ids=[n for n, _ in OBJECTS])
def test_the_operator_acts_on_it(where, obj):
    if obj["kind"] == KIND:
        parse_spec(obj["spec"])
    elif obj["kind"] == PLAN_KIND:
        parse_plan(obj["spec"])


@pytest.mark.parametrize(("obj", "expected"), [
    ({"kind": KIND, "apiVersion": f"{GROUP}/v1alpha1", "metadata": {"name": "x"},
      "spec": {"domain": "d", "disk": "vda", "dest": "/i/c.qcow2", "pivott": True}},
     ["pruned: .spec.pivott"]),
    ({"kind": KIND, "apiVersion": f"{GROUP}/v1alpha1", "metadata": {"name": "x"},
      "spec": {"domain": "d", "disk": "vda", "dest": "relative.qcow2"}},
     ["CEL: .spec.dest: spec.dest must be an absolute path or an NBD URI "
      "(nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=/PATH)"]),
    ({"kind": KIND, "apiVersion": f"{GROUP}/v1alpha1", "metadata": {"name": "x"},
      "spec": {"domain": "d", "disk": "vda"}},
     ["schema: spec: 'dest' is a required property"]),
    ({"kind": PLAN_KIND, "apiVersion": f"{GROUP}/v1alpha1", "metadata": {"name": "p"},
      "spec": {"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/a/b"},
               "maxActive": 0}},
     ["schema: spec.maxActive: 0 is less than the minimum of 1"]),
    ({"kind": PLAN_KIND, "apiVersion": f"{GROUP}/v1alpha1", "metadata": {"name": "p"},
      "spec": {"source": {"pathPrefix": "/a"}, "destination": {"pathPrefix": "/a/b"}}},
     ["CEL: .: spec.destination.pathPrefix must not lie inside spec.source.pathPrefix"]),
    ({"kind": "Pod", "apiVersion": "v1"}, ["kind 'Pod' is none of this API's "
                                           "(BlockCopy, BlockCopyPlan, DiskInventory)"]),
])
def test_the_check_sees_what_the_server_would_refuse(obj, expected):
    assert refusals(obj) == expected


def test_every_block_is_read():
    assert len(BLOCK.findall("```yaml\na: 1\n```\ntext\n```yml\nb: 2\n```\n```sh\nc\n```\n")) == 2
