"""The installed package carries its data: a wheel installed into a fresh venv outside the
checkout serves assessment, built-in calibration and extraction by trait name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import CACHE_DIR, free_port, wait_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel as `pip install .` would build it, from a copy so the checkout gets no build/."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    for package in ("app", "steering", "vectors"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "dist"), str(src)], check=True, capture_output=True)
    return next((tmp / "dist").glob("persona_server-*.whl"))


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; the project venv's site-packages lends it the
    dependencies through a .pth entry (whose own .pth files, the editable install among them,
    are not run, so the checkout stays out of reach)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, env=_clean_env())
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PERSONA_")}
    return {**env, **extra}


def test_wheel_holds_every_module_and_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("app", "steering"):
        for path in (ROOT / package).rglob("*.py"):
            assert path.relative_to(ROOT).as_posix() in names, f"{path} is missing from the wheel"
    data = [p for p in (ROOT / "vectors").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".safetensors" for p in data) and any(p.parent.name == "traits" for p in data)
    for path in data:
        assert "persona_server_assets/" + path.relative_to(ROOT / "vectors").as_posix() in names, path


def test_installed_copy_imports_from_the_venv_not_the_checkout(venv, tmp_path):
    probe = ("import json, os, sys, app, steering; from app.settings import shipped_assets_dir; "
             "print(json.dumps([app.__file__, steering.__file__, str(shipped_assets_dir()), "
             "[os.path.abspath(p) for p in sys.path]]))")
    out = subprocess.run([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=_clean_env(),
                         check=True, capture_output=True, text=True).stdout
    app_file, steering_file, assets, path = json.loads(out)
    for located in (app_file, steering_file, assets):
        assert Path(located).is_relative_to(venv), located
    # The project venv may live inside the checkout (make install puts it in .venv); the checkout
    # itself must not be on the path.
    assert str(ROOT) not in path
    assert (Path(assets) / "inventories" / "mbti.json").is_file()


def test_installed_server_assesses_calibrates_and_extracts_by_trait_name(venv, tmp_path):
    port = free_port()
    env = _clean_env(PERSONA_DATA_DIR=str(tmp_path / "data"), PERSONA_CACHE_DIR=str(CACHE_DIR),
                     PERSONA_LOG_LEVEL="warning")
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([venv / "bin" / "persona-server", "serve", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            _wait_ready(client, proc, tmp_path / "server.log")
            assert "optimistic" in {v["id"] for v in client.get("/v1/vectors").json()["data"]}

            assessment = client.post("/v1/assess", json={"inventory": "mbti", "repetitions": 2})
            assert assessment.status_code == 200, assessment.text
            assert set(assessment.json()["dimensions"]) == {"E-I", "S-N", "T-F", "J-P"}

            calibration = client.post("/v1/monitors/optimistic/calibrate", json={})
            assert calibration.status_code == 200, calibration.text
            assert calibration.json()["source"] == "built-in neutral set" and calibration.json()["n_prompts"] == 120

            job = client.post("/v1/vectors/extract", json={"trait_name": "humorous", "name": "humorous-installed",
                                                            "sweep": False, "method": "contrastive_texts"})
            assert job.status_code == 202, job.text
            done = wait_job(client, job.json()["id"])
            assert done["status"] == "succeeded", done
            assert client.get("/v1/vectors/humorous-installed").status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the installed server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if client.get("/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the installed server was not ready in 180 s:\n{log.read_text()}")


def test_a_missing_asset_path_stops_serve_at_startup_naming_the_setting(tmp_path):
    env = {**os.environ, "PERSONA_DATA_DIR": str(tmp_path), "PERSONA_INVENTORIES_DIR": str(tmp_path / "nowhere")}
    out = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"PERSONA_INVENTORIES_DIR={tmp_path / 'nowhere'} does not exist" in out.stderr
