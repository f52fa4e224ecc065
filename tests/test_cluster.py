"""cluster.yaml: parses, pins the same Ray as pyproject, and describes the three node types."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray")]
    m = re.fullmatch(r"ray\[[a-z,]+\]==(\d+\.\d+\.\d+)", pin)
    assert m, f"Ray must be pinned to one version in pyproject.toml; got {pin!r}"
    return m.group(1)


def test_cluster_yaml_pins_the_project_ray():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    version = ray_pin()
    images = [cfg["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in cfg["available_node_types"].values() if "docker" in t
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{version}-"), image
    import ray

    assert ray.__version__ == version  # the environment the tests ran in, too


def test_node_types_head_rtx_gb200():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = cfg["available_node_types"]
    assert set(types) == {"head", "rtx", "gb200"} and cfg["head_node_type"] == "head"
    assert types["head"]["max_workers"] == 0
    for name in ("rtx", "gb200"):
        assert types[name]["min_workers"] <= types[name]["max_workers"]
        assert f"accel_{name}" in types[name]["resources"]  # resources.accelerator pins to it
    assert types["gb200"]["docker"]["worker_image"].endswith("-aarch64")  # Grace hosts
    assert cfg["idle_timeout_minutes"] > 0
    assert any("pid-batch" in c for c in cfg["setup_commands"])


def test_no_secrets_in_cluster_yaml():
    text = (REPO / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|BEGIN .*PRIVATE KEY", text, re.I)
