"""The README and the docs site cannot drift: every command in their shell blocks that calls the
local server, and every Python block that talks to it, runs as written against a live server (only
the address is rewritten) and must exit 0 with a non-error HTTP status. The pages are README.md,
then docs/ in the order of the site's nav (mkdocs.yml), then any page outside the nav; a command or
block that appears word for word on an earlier page runs once. The README's links must resolve,
and its benchmark rows must be those of the benchmarks page.

What is not run, and why:

- commands that start their own server process or load their own model (``make serve``,
  ``persona-server screen|assess|extract``): they do not call the local server;
- nothing else. The test server serves the shipped LoRA adapters (as the README's
  ``PERSONA_LORA_MODULES=... make serve`` does), ``$ADMIN`` is set to the test server's admin key, ``@data.jsonl`` holds the
  first two samples of ``tests/data/screen_mixed.jsonl``, and ``JOB_ID`` is the id the job-creating command
  before it on the same page returned (its job is waited for before its output is read).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from app.cli import shipped_lora_modules
from app.settings import shipped_adapters
from tests.conftest import make_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SERVER_ADDRESS = re.compile(r"(?:localhost|127\.0\.0\.1):8000")
ADMIN_KEY = "readme-admin-key"
# curl exits 22 on an HTTP status >= 400 with --fail-with-body, so exit 0 means a non-error status.
CURL = 'curl() { command curl -sS --fail-with-body --max-time 900 "$@"; }'


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, including blocks indented inside list items."""
    blocks = []
    for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        indent = len(match.group(1))
        body = "\n".join(line[indent:] for line in match.group(3).splitlines())
        blocks.append((match.group(2), body))
    return blocks


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block: lines joined across backslash continuations and across
    quoted strings that span lines (a JSON body written over several lines)."""
    commands, current = [], ""
    for line in body.splitlines():
        current += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(current, comments=True)
        except ValueError:  # a quote is still open
            continue
        if current.strip():
            commands.append(current.strip())
        current = ""
    return commands


def server_commands(text: str) -> list[str]:
    commands = []
    for lang, body in fenced_blocks(text):
        if lang in ("sh", "bash", "shell"):
            commands += [c for c in shell_commands(body) if c.startswith("curl") and SERVER_ADDRESS.search(c)]
    return commands


def python_blocks(text: str) -> list[str]:
    return [body for lang, body in fenced_blocks(text) if lang == "python" and SERVER_ADDRESS.search(body)]


def nav_pages(nav: list) -> list[str]:
    """The docs pages of a mkdocs nav, in order (entries are {title: page} or {title: [entries]})."""
    pages = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def pages() -> list[Path]:
    """README.md, the docs pages in the nav's order, then the docs pages outside the nav."""
    docs = ROOT / "docs"
    in_nav = [docs / page for page in nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])]
    return [README] + in_nav + sorted(set(docs.rglob("*.md")) - set(in_nav))


def distinct(per_page: list[list[str]]) -> list[list[str]]:
    """Each page's items, less those an earlier page (or the same page) already has; a command that
    reads its page's job (``JOB_ID``) always stays."""
    seen, out = set(), []
    for items in per_page:
        out.append([item for item in items if "JOB_ID" in item or not (item in seen or seen.add(item))])
    return out


def test_the_readme_and_the_docs_have_examples_to_run():
    texts = [page.read_text() for page in pages()]
    commands = [c for text in texts for c in server_commands(text)]
    assert len(commands) >= 8, commands
    assert any("/v1/chat/completions" in c for c in commands)
    assert any("-X PUT" in c and "/v1/monitors/" in c for c in commands)
    assert any("/v1/chat/completions" in c for c in server_commands(texts[0])), "the README shows no request"
    assert python_blocks(texts[0]), "the README shows no SDK call"


def heading_anchors(text: str) -> set[str]:
    """The anchors mkdocs gives a page's headings (its default slugify; code spans lose their backticks)."""
    anchors, in_fence = set(), False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,6} ", line):
            title = re.sub(r"[^\w\s-]", "", line.lstrip("#").replace("`", "").strip()).strip().lower()
            anchors.add(re.sub(r"[-\s]+", "-", title))
    return anchors


def test_the_readme_links_resolve():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local), "the README sends no reader to the docs"
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), link
        if anchor:
            assert anchor in heading_anchors(target.read_text()), link


def test_the_readme_benchmark_rows_are_the_latest_bench_peers_rows():
    readme = README.read_text()
    start, end = "<!-- bench-headline:start -->", "<!-- bench-headline:end -->"
    assert start in readme and end in readme
    rows = [line for line in readme.split(start, 1)[1].split(end, 1)[0].splitlines() if line.startswith("|")]
    assert len(rows) >= 3, rows
    block = (ROOT / "docs" / "benchmarks.md").read_text().split("<!-- bench-peers:start -->", 1)[1]
    block = block.split("<!-- bench-peers:end -->", 1)[0].splitlines()
    for row in rows:
        assert row in block, f"not in the bench-peers block of docs/benchmarks.md: {row}"


@pytest.fixture(scope="module")
def readme_server(lm, tmp_path_factory):
    # The shipped adapters are served, as the README's `PERSONA_LORA_MODULES=... make serve` serves one.
    with make_server(lm, tmp_path_factory.mktemp("readme"), admin_keys=[ADMIN_KEY],
                     lora_modules=shipped_lora_modules(sorted(shipped_adapters()))) as live:
        yield live


def _wait_for_job(url: str, job_id: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed"):
            assert job["status"] == "succeeded", job
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


# Before the shell examples, whose background assessment would share the engine with these.
@pytest.mark.timeout(1200)
def test_every_python_example_that_calls_the_server_runs(readme_server, tmp_path):
    address = readme_server.url.removeprefix("http://")
    for block in (b for blocks in distinct([python_blocks(p.read_text()) for p in pages()]) for b in blocks):
        script = tmp_path / "example.py"
        script.write_text(SERVER_ADDRESS.sub(address, block))
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                              env={**os.environ, "ADMIN": ADMIN_KEY})
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), "the example printed no answer"


@pytest.mark.timeout(1800)  # the assessment examples run about a thousand prefills
def test_every_command_that_calls_the_server_succeeds(readme_server, tmp_path):
    samples = (Path(__file__).parent / "data" / "screen_mixed.jsonl").read_text().splitlines()[:2]
    (tmp_path / "data.jsonl").write_text("\n".join(samples) + "\n")
    env = {**os.environ, "ADMIN": ADMIN_KEY}
    address = readme_server.url.removeprefix("http://")
    ran = []
    for commands in distinct([server_commands(page.read_text()) for page in pages()]):
        ran += _run_page(commands, readme_server.url, address, tmp_path, env)
    assert len(ran) >= 8


def _run_page(commands: list[str], url: str, address: str, cwd: Path, env: dict) -> list[str]:
    job_id = None
    ran = []
    for command in commands:
        command = SERVER_ADDRESS.sub(address, command)
        if "JOB_ID" in command:
            assert job_id, f"no job was created before: {command}"
            if "/output" in command:
                _wait_for_job(url, job_id)
            command = command.replace("JOB_ID", job_id)
        started = time.monotonic()
        done = subprocess.run(["bash", "-c", f"set -eo pipefail; {CURL}; {command}"], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=1200)
        print(f"{time.monotonic() - started:6.1f} s  {command.splitlines()[0][:100]}")
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        try:
            reply = json.loads(done.stdout)
        except ValueError:
            reply = None
        if isinstance(reply, dict) and reply.get("object") == "job" and reply.get("status") != "succeeded":
            job_id = reply["id"]
        ran.append(command)
    return ran
