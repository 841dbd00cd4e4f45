"""Benchmarks share one model and print a Markdown row each; `make bench` runs them."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from app.bench import machine_kind

RESULTS = Path(os.environ.get("PERSONA_BENCH_OUT", "tests/bench/results.json"))
_rows: list[dict] = []


@pytest.fixture(scope="session")
def record():
    def add(row: dict) -> None:
        _rows.append(row)
        print("\n" + json.dumps(row))

    yield add
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), **machine_kind()}
    RESULTS.write_text(json.dumps({"meta": meta, "rows": _rows}, indent=2))
