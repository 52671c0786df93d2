"""The real Kube adapter's watch of unclaimed objects, against a stand-in for the client
library's list call (no API server): the selectors it asks for, and a 400 for the field
selector (an API server without CRD field selectors) turned into FieldSelectorUnsupported,
while every other error stays what it was."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from blockcopy.adapters.kube import KubeClient, node_field_selector
from blockcopy.model.kubeapi import FieldSelectorUnsupported


class Refusing:
    """list_*_custom_object that records its arguments and answers with an HTTP error."""

    def __init__(self, status: int, body: str | bytes = b"") -> None:
        self.status = status
        self.body = body or '{"message":"field label not supported: spec.nodeName"}'
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse(args, kwargs)

    def list_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> Any:
        return self._refuse(args, kwargs)

    def _refuse(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.calls.append((args, kwargs))
        exc = ApiException(status=self.status, reason="Bad Request")
        exc.body = self.body
        raise exc


async def _drain(client: KubeClient, namespace: str | None, node: str | None) -> None:
    async for _ in client.unclaimed(namespace, node_name=node, timeout=5):
        pass


@pytest.mark.asyncio
async def test_field_selector_refused_is_field_selector_unsupported():
    client = KubeClient()
    client._api = api = Refusing(400)  # type: ignore[assignment]
    with pytest.raises(FieldSelectorUnsupported, match="field label not supported"):
        await _drain(client, None, "n1")
    (args, kwargs), = api.calls
    assert args == ("blockcopy.dev", "v1alpha1", "blockcopies")
    assert kwargs["label_selector"] == "!blockcopy.dev/node"
    assert kwargs["field_selector"] == "spec.nodeName=n1"
    assert kwargs["watch"] is True and kwargs["timeout_seconds"] == 5
    refusal = b'{"message":"field label not supported: spec.nodeName"}'  # the body as bytes
    client._api = api = Refusing(400, refusal)  # type: ignore[assignment]
    with pytest.raises(FieldSelectorUnsupported, match=r"not supported: spec\.nodeName\"}$"):
        await _drain(client, "ns", "")
    assert api.calls[-1][0][2] == "ns" and api.calls[-1][1]["field_selector"] == "spec.nodeName="


@pytest.mark.asyncio
async def test_other_errors_stay_api_errors():
    client = KubeClient()
    client._api = api = Refusing(400)  # type: ignore[assignment]
    with pytest.raises(ApiException):  # no field selector asked: not the feature's absence
        await _drain(client, "ns", None)
    assert "field_selector" not in api.calls[0][1]
    client._api = Refusing(500)  # type: ignore[assignment]
    with pytest.raises(ApiException) as raised:
        await _drain(client, "ns", "n1")
    assert not isinstance(raised.value, FieldSelectorUnsupported)


def test_the_node_name_is_escaped_as_the_api_server_parses_it():
    assert node_field_selector("hv-07.example.com") == "spec.nodeName=hv-07.example.com"
    assert node_field_selector("") == "spec.nodeName="
    assert node_field_selector("a,b=c\\d") == "spec.nodeName=a\\,b\\=c\\\\d"
