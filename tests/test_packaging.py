"""The wheel installs into a fresh venv with only the `knexa` package and a working CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGE_FOLDERS = ("node", "net", "crdt", "dht", "cli")
RUN_HELP = (
    "import knexa.node.daemon, knexa.cli.main as m, sys; print(m.__file__); "
    "sys.argv = ['knexa-node', '--help']; m.main()"
)


def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=300,
    )
    wheel = next(dist.glob("knexa_node-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"knexa", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    # Every package folder of the source tree ships (a subpackage missing from
    # pyproject's explicit list would otherwise vanish from the wheel silently).
    for folder in SUBPACKAGE_FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.relative_to(ROOT).as_posix()
            assert f"knexa/{relative}" in names, f"{relative} is not in the wheel"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    venv_python = venv / "bin" / "python"
    site = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # Install the wheel alone into the fresh venv; its dependencies come from
    # this test environment through PYTHONPATH (that path's .pth files, the
    # editable install among them, are not processed there).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site, str(wheel)],
        check=True,
        timeout=120,
    )
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    script = Path(site) / "bin" / "knexa-node"
    assert script.exists()
    result = subprocess.run(
        [venv_python, "-c", RUN_HELP],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(site)
    assert "start" in result.stdout and "peers" in result.stdout


def test_a_node_without_a_model_never_imports_torch():
    # A bootstrap or relay node (model = none) and every CLI command start in under a second without torch
    # and transformers, which take seconds and hundreds of MiB per process to import.
    code = (
        "import sys, knexa.node.daemon, knexa.cli.main; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]"
