"""What can be checked of the containers without running them: lint, and the wiring of the compose
stack (`make image-test` runs the image itself)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

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
    replicas = {name for name in compose["services"] if name.startswith("persona-server")}
    assert len(replicas) == 2 and "haproxy" in compose["services"]
    assert scrape["static_configs"][0]["targets"] == [f"{name}:8000" for name in sorted(replicas)]
    # One volume for every replica's data directory: the shared store.
    assert {tuple(compose["services"][name]["volumes"]) for name in replicas} == {("persona-data:/data",)}


def _bind_mounts(service: dict) -> dict[PurePosixPath, Path]:
    """A compose service's bind mounts: container path -> host path (relative to docker/)."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[PurePosixPath(target)] = (DOCKER / source).resolve()
    return mounts


def _host_path(path: PurePosixPath, mounts: dict[PurePosixPath, Path]) -> Path | None:
    """The host file a container path reaches through the innermost mount that holds it."""
    for target in sorted(mounts, key=lambda t: len(t.parts), reverse=True):
        if path == target or target in path.parents:
            return mounts[target] / path.relative_to(target)
    return None


def _image_env(dockerfile: Path) -> dict[str, str]:
    """ENV of a Dockerfile's final stage."""
    final = dockerfile.read_text().replace("\\\n", " ").split("\nFROM ")[-1]
    env = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def test_prometheus_in_the_stack_loads_its_rules_and_scrapes_the_server(tmp_path):
    services = yaml.safe_load((DOCKER / "compose.yml").read_text())["services"]
    prometheus = services["prometheus"]
    mounts = _bind_mounts(prometheus)
    config_path = PurePosixPath(next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")))
    config_file = _host_path(config_path, mounts)
    assert config_file is not None and config_file.is_file(), f"{config_path} is not mounted into prometheus"
    config = yaml.safe_load(config_file.read_text())

    # Rebuild the container's view under tmp_path and let promtool load config and rules from it.
    for target, source in mounts.items():
        copy = tmp_path / target.relative_to("/")
        copy.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    rules = [config_path.parent / r for r in config["rule_files"]]  # relative paths resolve beside the config
    for rule in rules:
        assert _host_path(rule, mounts) is not None, f"rule file {rule} is not mounted into prometheus"
    config["rule_files"] = [str(tmp_path / r.relative_to("/")) for r in rules]
    (tmp_path / "check.yml").write_text(yaml.safe_dump(config))
    checked = subprocess.run(["promtool", "check", "config", str(tmp_path / "check.yml")], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout + checked.stderr, checked.stdout + checked.stderr

    server = services["persona-server"]
    listens = int({**_image_env(DOCKER / "Dockerfile"), **server.get("environment", {})}["PERSONA_PORT"])
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, port = target.rsplit(":", 1)
            assert host in services and host.startswith("persona-server") and int(port) == listens, target
    assert any(p.split(":")[-1] == str(listens) for p in server.get("ports", []) + server.get("expose", []))


def test_grafana_in_the_stack_reaches_prometheus_and_its_dashboards():
    services = yaml.safe_load((DOCKER / "compose.yml").read_text())["services"]
    mounts = _bind_mounts(services["grafana"])
    provisioning = _host_path(PurePosixPath("/etc/grafana/provisioning"), mounts)
    assert provisioning is not None
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    command = services["prometheus"].get("command", [])
    assert not any(a.startswith("--web.listen-address") for a in command)  # so it listens on 9090
    provider = yaml.safe_load((provisioning / "dashboards" / "persona.yml").read_text())["providers"][0]
    dashboards = _host_path(PurePosixPath(provider["options"]["path"]), mounts)
    assert dashboards is not None and list(dashboards.glob("*.json"))


def test_compose_refuses_to_start_the_server_without_admin_keys():
    server = yaml.safe_load((DOCKER / "compose.yml").read_text())["services"]["persona-server"]
    assert server["environment"]["PERSONA_ADMIN_KEYS"].startswith("${PERSONA_ADMIN_KEYS:?")
    env = _image_env(DOCKER / "Dockerfile")
    assert env["PERSONA_HOST"] == "0.0.0.0" and "PERSONA_ALLOW_UNAUTHENTICATED_ADMIN" not in env
