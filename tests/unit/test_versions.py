"""One version everywhere: the package, its distribution metadata and the chart's appVersion
(the image tag a default `helm install` pulls) must agree, or a release ships an image tag
that was never built."""

from __future__ import annotations

import tomllib

import yaml

import blockcopy
from support.paths import ROOT


def test_package_pyproject_and_chart_app_version_agree():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts/blockcopy-operator/Chart.yaml").read_text())
    assert blockcopy.__version__ == pyproject == chart["appVersion"], (
        blockcopy.__version__, pyproject, chart["appVersion"])
    # A chart version below the app's would mean a chart release was skipped.
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert as_tuple(chart["version"]) >= as_tuple(chart["appVersion"])
