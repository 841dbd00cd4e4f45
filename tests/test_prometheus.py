"""The monitoring stack against the real thing: promtool on the config and alert rules, a real
Prometheus scraping a live server, and every metric the dashboard and alerts use exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port

DOCKER = Path(__file__).resolve().parents[1] / "docker"
PROMQL_FUNCTIONS = {"up"}

if shutil.which("promtool") is None or shutil.which("prometheus") is None:
    if os.environ.get("CI"):
        raise RuntimeError("promtool / prometheus missing: `make install` installs Debian's prometheus package")
    pytest.skip("Debian's prometheus package is not installed (make install adds it)", allow_module_level=True)


def test_promtool_checks_config_and_rules(tmp_path):
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config["rule_files"] = [str(tmp_path / "alerts.yml")]  # the container path, made local
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], check=True)
    subprocess.run(["promtool", "check", "rules", str(DOCKER / "prometheus" / "alerts.yml")], check=True)


def test_alert_rules_unit_tests_pass():
    out = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=DOCKER / "prometheus",
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(persona_[a-zA-Z0-9_:]+)", expr))
    return names | ({"up"} if re.search(r"\bup\{", expr) else set())


def _exposed(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_dashboard_and_alerts_use_only_metrics_the_server_exports(client):
    # One request of each kind so every labelled family has samples.
    client.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 3, "steering": {"optimistic": 0.5}})
    exported = _exposed(client.get("/metrics").text) | {"up"}
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "persona-server.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = set().union(*map(_metric_names, exprs))
    # Families that only appear once a monitor exists are checked in the monitored scrape test.
    monitor_only = {n for n in used if n.startswith("persona_monitor_")}
    assert used - monitor_only <= exported, sorted(used - monitor_only - exported)
    assert len(exprs) >= 15


def test_real_prometheus_scrapes_the_decision_counter(lm, tmp_path):
    from tests.conftest import make_server

    with make_server(lm, tmp_path / "data") as live:
        httpx.put(f"{live.url}/v1/monitors/optimistic", json={"mode": "annotate", "flag_threshold": -1e9}).raise_for_status()
        for _ in range(3):
            r = httpx.post(f"{live.url}/v1/chat/completions", timeout=60, json={
                "model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
            assert r.status_code == 200 and r.headers["X-Persona-Flagged"] == "optimistic"
        exported = _exposed(httpx.get(f"{live.url}/metrics").text)
        dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "persona-server.json").read_text())
        used = set().union(*(_metric_names(t["expr"]) for p in dashboard["panels"] for t in p["targets"]))
        missing = {n for n in used if n.startswith("persona_monitor_")} - exported
        assert not missing, sorted(missing)

        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "persona-server", "static_configs": [{"targets": [f"127.0.0.1:{live.port}"]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            query = 'sum(persona_monitor_decisions_total{vector="optimistic",action="flag",mode="annotate"})'
            deadline = time.monotonic() + 60
            value = None
            while time.monotonic() < deadline:
                try:
                    data = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
                    result = data["data"]["result"]
                    if result:
                        value = float(result[0]["value"][1])
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.5)
            assert value == 3.0
            up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": 'up{job="persona-server"}'}).json()
            assert up["data"]["result"][0]["value"][1] == "1"
        finally:
            prom.terminate()
            prom.wait(30)

