"""Replicas that share one data directory: one registry, one monitor configuration, one audit log.

The first tests run the store's semantics with no model: two store objects (two "replicas") on
one directory in this process, and real processes racing on it. The last one (``make
test-replicas``) starts three real ``persona-server serve`` processes behind HAProxy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from steering.monitor import MonitorConfig, MonitorSet
from steering.registry import VectorRegistry
from steering.store import PreconditionFailedError, SharedStore, check_precondition
from steering.vector import ModelRef, PersonaVector
from tests.conftest import CACHE_DIR, free_port, make_server

DOCKER = Path(__file__).resolve().parents[1] / "docker"
MODEL = ModelRef("m", "f", 2, 3)
STATS = {"neutral_mean": torch.zeros(3), "neutral_std": torch.ones(3)}


def replica(data_dir: Path, poll_s: float = 0) -> tuple[VectorRegistry, MonitorSet]:
    """What one server process opens on ``data_dir`` (app.main.build_state, without the model)."""
    store = SharedStore(data_dir, poll_s=poll_s)
    registry = VectorRegistry(data_dir / "vectors", model_name="m", fingerprint="f", num_layers=2, hidden_size=3,
                              store=store)
    return registry, MonitorSet(data_dir / "monitors.json", registry, num_layers=2)


def vector(name: str = "v", scale: float = 1.0) -> PersonaVector:
    return PersonaVector(name=name, directions=torch.ones(3, 3) * scale, model=MODEL, stats=STATS)


def test_if_match_and_if_none_match_follow_rfc_9110():
    check_precondition("abc", if_match='"abc"')
    check_precondition("abc", if_match='"x", "abc"')
    check_precondition("abc", if_match="*")
    check_precondition(None, if_none_match="*")
    for current, kwargs in [("abc", {"if_match": '"x"'}), ("abc", {"if_match": 'W/"abc"'}), (None, {"if_match": "*"}),
                            ("abc", {"if_none_match": "*"}), ("abc", {"if_none_match": '"abc"'})]:
        with pytest.raises(PreconditionFailedError):
            check_precondition(current, **kwargs)


def test_a_write_on_one_replica_reaches_the_other_and_a_stale_write_is_refused(tmp_path):
    reg_a, mon_a = replica(tmp_path)
    reg_b, mon_b = replica(tmp_path)
    stored = reg_a.put(vector())
    assert stored.created and "v" not in reg_b
    assert reg_b.store.sync() and reg_b.etag("v") == stored.etag  # the same ETag on every replica

    mon_a.put(MonitorConfig("v", layer=2, mode="enforce", block_threshold=3.0), who="a")
    read_by_b = mon_a.etag("v")
    assert mon_b.get("v") is None and not mon_b.snapshot()
    mon_b.store.sync()
    assert mon_b.etag("v") == read_by_b and mon_b.snapshot().block_above[2].tolist() == [3.0]

    # A changes the monitor; B's write based on what it read before is refused, even before B's
    # poll: the check runs against the file under the lock.
    mon_a.put(MonitorConfig("v", layer=2, mode="enforce", block_threshold=5.0), who="a")
    with pytest.raises(PreconditionFailedError, match="If-Match"):
        mon_b.put(MonitorConfig("v", layer=2, mode="annotate"), who="b", if_match=f'"{read_by_b}"')
    assert mon_b.get("v").block_threshold == 5.0  # the refused write still brought B up to date
    mon_b.put(MonitorConfig("v", layer=2, mode="off"), who="b", if_match=f'"{mon_b.etag("v")}"')
    mon_a.store.sync()
    assert mon_a.get("v").mode == "off" and mon_a.list_etag() == mon_b.list_etag()

    # The write guard sees the other replica's monitor: deleting its vector is refused on A too.
    with pytest.raises(Exception, match="delete the monitor first"):
        reg_a.delete("v")
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["who"], e["new"]["mode"]) for e in audit] == [("a", "enforce"), ("a", "enforce"), ("b", "off")]


def test_each_replica_sees_a_change_within_the_poll_interval(tmp_path):
    _reg_a, mon_a = replica(tmp_path)
    reg_a = mon_a.registry
    reg_a.put(vector())
    reg_b, mon_b = replica(tmp_path, poll_s=0.2)
    seen = []
    mon_b.on_change(lambda configs: seen.append(dict(configs)))
    reg_b.store.watch()
    try:
        before = mon_b.snapshot()
        mon_a.put(MonitorConfig("v", layer=2, mode="enforce", block_threshold=1.0), who="a")
        deadline = time.monotonic() + 0.2 + 2.0  # the poll interval, and room for a loaded machine
        while mon_b.get("v") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mon_b.get("v") is not None and mon_b.get("v").block_threshold == 1.0
        assert seen and "v" in seen[-1]  # listeners (the threshold gauge) hear of it
        assert not before  # a snapshot taken before stays what it was
    finally:
        reg_b.store.close()


def test_seeding_replicas_on_an_empty_volume_do_not_clash(tmp_path):
    shipped = tmp_path / "shipped"
    vector("v").save(shipped / "v.safetensors")
    first, _ = replica(tmp_path / "data")
    second, _ = replica(tmp_path / "data")
    assert first.seed_from(shipped) == ["v"]
    assert second.seed_from(shipped) == []  # already there: the other replica's copy is kept
    assert second.etag("v") == first.etag("v")


RACER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from steering.monitor import MonitorConfig
    from steering.store import PreconditionFailedError
    from tests.test_replicas import replica

    _registry, monitors = replica(Path(sys.argv[1]))
    refused = 0
    for _ in range(int(sys.argv[2])):
        while True:  # read, modify, write back conditionally; on 412 read again
            monitors.store.sync()
            current, etag = monitors.get("v"), monitors.etag("v")
            bumped = MonitorConfig("v", layer=2, mode="annotate", flag_threshold=current.flag_threshold + 1)
            try:
                monitors.put(bumped, who=sys.argv[3], if_match=f'"{etag}"')
                break
            except PreconditionFailedError:
                refused += 1
    print(refused)
""")


def test_processes_racing_read_modify_write_lose_no_update(tmp_path):
    """Three processes each add 1 to one monitor's threshold 25 times through conditional writes:
    the total is exact, and the losers of each race were told (412), not silently overwritten."""
    registry, monitors = replica(tmp_path)
    registry.put(vector())
    monitors.put(MonitorConfig("v", layer=2, mode="annotate", flag_threshold=0.0), who="setup")
    root = Path(__file__).resolve().parents[1]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), "25", f"p{i}"], cwd=root,
                               stdout=subprocess.PIPE, text=True) for i in range(3)]
    refused = [int(p.communicate(timeout=300)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    monitors.store.sync()
    assert monitors.get("v").flag_threshold == 75.0
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 75 and all(json.loads(line) for line in lines)  # no torn or lost audit lines
    print(f"conditional-write retries across 3 processes x 25 updates: {sum(refused)}")


ADMIN = {"Authorization": "Bearer admin-secret"}
BLOCK_ALL = {"mode": "enforce", "score": "projection", "block_threshold": -1e6}  # every prompt is above it


def ask(url: str) -> httpx.Response:
    body = {"model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def wait_until(condition, within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_servers_on_one_data_dir_share_monitors_and_settle_a_race_with_412(lm, tmp_path):
    """Two real servers (one process, one model) on one data directory, as replicas on a volume."""
    with make_server(lm, tmp_path, admin_keys=["admin-secret"], store_poll_s=0.2) as a, \
            make_server(lm, tmp_path, admin_keys=["admin-secret"], store_poll_s=0.2) as b:
        created = httpx.put(f"{a.url}/v1/monitors/optimistic", json={**BLOCK_ALL, "mode": "annotate"}, headers=ADMIN,
                            timeout=30)
        assert created.status_code == 200 and created.headers["etag"]
        read = httpx.get(f"{b.url}/v1/monitors/optimistic", headers=ADMIN)  # no wait: reads look first
        assert read.headers["etag"] == created.headers["etag"]  # the same ETag on both replicas

        # Both admins read the same version and write back; one wins, the other is told (412).
        race = [httpx.put(f"{url}/v1/monitors/optimistic", json=BLOCK_ALL, timeout=30,
                          headers={**ADMIN, "If-Match": read.headers["etag"]}) for url in (a.url, b.url)]
        assert [r.status_code for r in race] == [200, 412]
        error = race[1].json()["error"]
        assert error["code"] == "precondition_failed" and error["param"] == "If-Match"

        # The winner's enforce blocks on the other server within the poll interval.
        assert wait_until(lambda: ask(b.url).status_code == 400, 2.2)
        assert ask(b.url).json()["error"]["code"] == "persona_blocked"
        listed = httpx.get(f"{a.url}/v1/monitors", headers=ADMIN)
        assert listed.headers["etag"] == httpx.get(f"{b.url}/v1/monitors", headers=ADMIN).headers["etag"]

        # Vectors too: an upload on A is served by B with the same ETag; a stale delete is refused.
        vec = httpx.get(f"{a.url}/v1/vectors/optimistic", params={"format": "safetensors"}, headers=ADMIN)
        put = httpx.put(f"{a.url}/v1/vectors/optimistic-copy", content=vec.content, headers=ADMIN, timeout=30)
        assert put.status_code == 201
        assert httpx.get(f"{b.url}/v1/vectors/optimistic-copy").headers["etag"] == put.headers["etag"]
        stale = httpx.delete(f"{b.url}/v1/vectors/optimistic-copy", headers={**ADMIN, "If-Match": '"0"'})
        assert stale.status_code == 412 and stale.json()["error"]["code"] == "precondition_failed"
        assert httpx.delete(f"{b.url}/v1/vectors/optimistic-copy",
                            headers={**ADMIN, "If-Match": put.headers["etag"]}).status_code == 200
        assert httpx.delete(f"{a.url}/v1/monitors/optimistic", headers=ADMIN).status_code == 200
        assert wait_until(lambda: ask(b.url).status_code == 200, 2.2)


# ---- three server processes behind HAProxy (`make test-replicas`) ----

def haproxy_config(port: int, stats_port: int, replicas: list[int], check: bool = True) -> str:
    """docker/haproxy/haproxy.cfg, pointed at local replicas: the shipped settings under test.
    ``check=False`` leaves out the health checks, so a draining replica stays in the rotation as
    it does until its checks fail."""
    shipped = (DOCKER / "haproxy" / "haproxy.cfg").read_text()
    kept = [line for line in shipped.splitlines()
            if not line.strip().startswith(("server ", "resolvers", "nameserver"))]
    cfg = "\n".join(kept).replace("bind :8000", f"bind 127.0.0.1:{port}").replace(" resolvers docker", "")
    servers = [f"    server r{i} 127.0.0.1:{p}{' check' if check else ''}" for i, p in enumerate(replicas)]
    backend = cfg.index("backend replicas")
    head, tail = cfg[:backend], cfg[backend:]
    stats = f"listen stats\n    bind 127.0.0.1:{stats_port}\n    stats enable\n    stats uri /stats\n"
    return head + tail.rstrip() + "\n" + "\n".join(servers) + "\n" + stats


class Replica:
    """One ``persona-server serve`` process on a fixed port, restartable on it."""

    def __init__(self, data_dir: Path, port: int, env: dict[str, str]):
        self.data_dir, self.port, self.env = data_dir, port, env
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PERSONA_DATA_DIR": str(self.data_dir), "PERSONA_CACHE_DIR": str(CACHE_DIR), **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 300) -> None:
        if not wait_until(lambda: self.proc.poll() is not None or _ready(self.url), timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"replica on :{self.port} did not become ready")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _haproxy_up(stats_url: str) -> set[str]:
    rows = httpx.get(f"{stats_url};csv", timeout=5).text.splitlines()
    header = rows[0].lstrip("# ").split(",")
    cells = [r.split(",") for r in rows[1:]]
    return {c[header.index("svname")] for c in cells
            if c[0] == "replicas" and c[header.index("svname")] != "BACKEND" and c[header.index("status")] == "UP"}


def _start_prometheus(directory: Path, ports: list[int]) -> subprocess.Popen:
    """Debian's Prometheus scraping every replica each second, with the shipped alert rules."""
    port = free_port()
    shutil.copy(DOCKER / "prometheus" / "alerts.yml", directory / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(directory / "alerts.yml")],
        "scrape_configs": [{"job_name": "persona-server",
                            "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(["prometheus", f"--config.file={directory / 'prometheus.yml'}",
                             f"--storage.tsdb.path={directory / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def _query(prom, expr: str) -> list[dict]:
    try:
        return httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=5).json()["data"]["result"]
    except (httpx.HTTPError, KeyError, ValueError):
        return []


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if found is None:
        pytest.skip("haproxy is not installed (`make install` installs Debian's package)")
    return found


def _refused_while_draining(url: str) -> float:
    """What a replica's own /metrics counts of the 503s it answered."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    return sum(s.value for f in families if f.name == "persona_requests" for s in f.samples
               if s.name == "persona_requests_total" and s.labels["status"] == "503")


def test_a_draining_replicas_503_is_retried_even_when_the_body_comes_after_the_headers(lm, tmp_path):
    """The request a rolling restart lost (1 of 223): a client whose body reached HAProxy after
    its headers. HAProxy forwarded the headers at once, and a request not wholly received when
    it is first sent is never retried on a status (L7 retries need the whole request buffered),
    so the draining replica's 503 went to the client. The shipped config buffers the request
    first (``option http-buffer-request``); this client sends its body 0.2 s after its headers,
    to a replica that drains while HAProxy still routes to it (before its checks fail)."""
    haproxy = _haproxy()
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "temperature": 0}).encode()

    def late_body():
        yield body[:10]
        time.sleep(0.2)
        yield body[10:]

    with make_server(lm, tmp_path / "a") as draining, make_server(lm, tmp_path / "b") as serving:
        port, stats_port = free_port(), free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, stats_port, [draining.port, serving.port], check=False))
        lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: _ready(f"http://127.0.0.1:{port}"), 10)
            draining.state.engine.drain()
            with httpx.Client(timeout=60) as client:
                answers = [client.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=late_body(),
                                       headers={"Content-Type": "application/json"}) for _ in range(4)]
        finally:
            lb.terminate()
            lb.wait(30)
        assert [r.status_code for r in answers] == [200] * 4, [r.text[:120] for r in answers]
        assert all(r.json()["usage"]["completion_tokens"] == 2 for r in answers)
        assert _refused_while_draining(draining.url) >= 1  # round robin did send some to the draining one


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if os.environ.get("PERSONA_TEST_REPLICAS") != "1":
        pytest.skip("three server processes behind HAProxy take minutes to start: `make test-replicas` runs them")
    haproxy = _haproxy()
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (`make install` installs Debian's package)")
    data_dir = tmp_path_factory.mktemp("shared-volume")
    env = {"PERSONA_ADMIN_KEYS": "admin-secret", "PERSONA_LOG_LEVEL": "warning", "PERSONA_STORE_POLL_S": "1",
           "PERSONA_DRAIN_NOTICE_S": "3", "PERSONA_DRAIN_TIMEOUT_S": "60", "PERSONA_KV_CACHE_GIB": "0.25",
           "PERSONA_MAX_BATCH_SIZE": "4"}
    replicas = [Replica(data_dir, free_port(), env) for _ in range(3)]
    port, stats_port = free_port(), free_port()
    cfg = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, stats_port, [r.port for r in replicas]))
    lb = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prom = None
    try:
        # One at a time: three model loads at once on a small machine would only slow each other.
        for r in replicas:
            r.start()
            r.wait_ready()
        stats = f"http://127.0.0.1:{stats_port}/stats"
        assert wait_until(lambda: _haproxy_up(stats) == {"r0", "r1", "r2"}, 30), _haproxy_up(stats)
        prom = _start_prometheus(tmp_path_factory.mktemp("prometheus"), [r.port for r in replicas])
        yield replicas, f"http://127.0.0.1:{port}", stats, prom
    finally:
        for proc in (lb, prom):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
        for r in replicas:
            if r.proc and r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(30)


def test_a_monitor_enforced_through_one_replica_blocks_on_all_three(fleet):
    replicas, lb, _stats, _prom = fleet
    assert ask(lb).status_code == 200
    put = httpx.put(f"{replicas[0].url}/v1/monitors/optimistic", json=BLOCK_ALL, headers=ADMIN, timeout=30)
    assert put.status_code == 200, put.text
    # The documented bound: PERSONA_STORE_POLL_S (1 s here) plus a reload; the margin is for a
    # loaded 2-core machine, not for the mechanism.
    assert all(wait_until(lambda r=r: ask(r.url).status_code == 400, 1 + 3) for r in replicas)
    assert all(ask(lb).json()["error"]["code"] == "persona_blocked" for _ in range(3))
    assert httpx.delete(f"{replicas[1].url}/v1/monitors/optimistic", headers=ADMIN, timeout=30).status_code == 200
    assert all(wait_until(lambda r=r: ask(r.url).status_code == 200, 1 + 3) for r in replicas)


def test_prometheus_scrapes_every_replica_and_the_rules_sum_over_them(fleet):
    replicas, _lb, _stats, prom = fleet
    instances = {f"127.0.0.1:{r.port}" for r in replicas}
    assert wait_until(lambda: {s["metric"]["instance"] for s in _query(prom, 'up{job="persona-server"} == 1')}
                      == instances, 60)
    # The enforce test blocked at least one request on each replica; Prometheus holds each
    # replica's counter under its instance label, and the alert's expression sums them by vector.
    blocks = 'persona_monitor_decisions_total{vector="optimistic",action="block",mode="enforce"}'
    assert wait_until(lambda: {s["metric"]["instance"] for s in _query(prom, blocks)} == instances, 30)
    per_replica = {s["metric"]["instance"]: float(s["value"][1]) for s in _query(prom, blocks)}
    assert all(v >= 1 for v in per_replica.values())
    fleet_total = _query(prom, f"sum by (vector) ({blocks})")
    assert [s["metric"] for s in fleet_total] == [{"vector": "optimistic"}]
    assert float(fleet_total[0]["value"][1]) == sum(per_replica.values())
    rules = httpx.get(f"{prom.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert {g["name"] for g in rules} >= {"persona-monitor", "persona-serving", "persona-fleet"}
    assert all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"])
    up_share = _query(prom, 'sum(up{job="persona-server"}) / count(up{job="persona-server"})')  # PersonaReplicasDown's
    assert [float(s["value"][1]) for s in up_share] == [1.0]


def test_two_replicas_racing_on_one_monitor_leave_one_winner_and_one_412(fleet):
    replicas, lb, _stats, _prom = fleet
    assert httpx.put(f"{lb}/v1/monitors/optimistic", json={"mode": "annotate", "score": "projection"},
                     headers=ADMIN, timeout=30).status_code == 200
    # Read back through the balancer, likely from another replica: configuration reads see every
    # completed write at once (requests being scored, within the poll interval).
    etag = httpx.get(f"{lb}/v1/monitors/optimistic", headers=ADMIN).headers["etag"]
    with ThreadPoolExecutor(2) as pool:
        race = list(pool.map(
            lambda args: httpx.put(f"{args[0].url}/v1/monitors/optimistic", timeout=30,
                                   json={"mode": "annotate", "score": "projection", "flag_threshold": args[1]},
                                   headers={**ADMIN, "If-Match": etag}),
            [(replicas[1], 1.0), (replicas[2], 2.0)]))
    assert sorted(r.status_code for r in race) == [200, 412], [r.text for r in race]
    winner = next(r for r in race if r.status_code == 200)
    loser = next(r for r in race if r.status_code == 412)
    assert loser.json()["error"]["code"] == "precondition_failed"
    # Every replica settles on the winner's version.
    assert all(wait_until(lambda r=r: httpx.get(f"{r.url}/v1/monitors/optimistic", headers=ADMIN)
                          .headers.get("etag") == winner.headers["etag"], 1 + 3) for r in replicas)
    audit = [json.loads(line) for line in (replicas[0].data_dir / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["new"]["flag_threshold"] == winner.json()["flag_threshold"]
    assert httpx.delete(f"{lb}/v1/monitors/optimistic", headers=ADMIN, timeout=30).status_code == 200


def test_a_rolling_restart_fails_no_request(fleet):
    replicas, lb, stats, _prom = fleet
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120) as client:
            body = {"model": "default", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4,
                    "temperature": 0}
            while not stop.is_set():
                try:
                    response = client.post(f"{lb}/v1/chat/completions", json=body)
                    statuses.append(response.status_code if response.status_code == 200 else
                                    f"{response.status_code} {response.text[:120]}")
                except httpx.HTTPError as exc:
                    statuses.append(repr(exc))

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for i, r in enumerate(replicas):
            served_before = len(statuses)
            assert r.stop() in (0, -signal.SIGTERM)
            r.start()
            r.wait_ready()
            assert wait_until(lambda: f"r{i}" in _haproxy_up(stats), 30)
            assert wait_until(lambda: len(statuses) > served_before + 2, 120)  # traffic kept flowing meanwhile
    finally:
        stop.set()
        for w in workers:
            w.join(180)
    failed = [s for s in statuses if s != 200]
    assert statuses and not failed, f"{len(failed)} of {len(statuses)} requests failed: {failed[:5]}"
    print(f"rolling restart of 3 replicas: {len(statuses)} requests through HAProxy, none failed")


# ---- deployment files ----

def test_kubernetes_manifests_validate_and_wire_the_shared_store():
    """docker/k8s/ against Kubernetes' API schemas (kubernetes-validate, strict: unknown fields
    fail), and the wiring this page promises: a ReadWriteMany claim mounted as the data dir,
    /ready and /health probes, an HPA on the queue metric the server exports."""
    import kubernetes_validate

    k8s = DOCKER / "k8s"
    listed = yaml.safe_load((k8s / "kustomization.yaml").read_text())["resources"]
    docs = {}
    for name in listed:
        for doc in yaml.safe_load_all((k8s / name).read_text()):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            docs[doc["kind"]] = doc
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == env["PERSONA_DATA_DIR"])
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # Endpoints drop a draining pod before its listener closes, and the pod gets to finish.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < float(env["PERSONA_DRAIN_NOTICE_S"])
    assert pod["terminationGracePeriodSeconds"] >= float(env["PERSONA_DRAIN_NOTICE_S"]) + float(env["PERSONA_DRAIN_TIMEOUT_S"])
    metric = docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    assert metric in {rule["name"]["as"] for rule in adapter["rules"]}
    from app.metrics import Metrics
    from prometheus_client import generate_latest

    assert f"\n{metric} " in generate_latest(Metrics().registry).decode()  # the server exports it
