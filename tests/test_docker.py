"""What can be checked of the containers without a Docker engine: lint and wiring."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile"), str(DOCKER / "Dockerfile.cuda")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_wires_server_prometheus_and_grafana():
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    assert {"persona-server", "prometheus", "grafana"} <= set(compose["services"])
    mounts = " ".join(compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"])
    for path in ("prometheus/alerts.yml", "prometheus/prometheus.yml", "grafana/dashboards", "grafana/provisioning"):
        assert path in mounts and (DOCKER / path).exists()
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["persona-server:8000"]
