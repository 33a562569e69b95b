"""One import name: the folders install as ``aigc``, ``aigc.schemas`` and ``aigc.workers``.

``producer``, ``schemas`` and ``workers`` are other projects' names on PyPI; nothing of ours may
import them, or a user's ``from producer import submit`` could load the wrong package.
"""

from __future__ import annotations

import email.parser
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

FOLDERS = {"producer": "aigc", "schemas": "aigc.schemas", "workers": "aigc.workers"}


def python(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the checkout's root, where the folders themselves
    would be importable under their own names if anything asked for them."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_module_imports_under_aigc_and_nothing_under_the_folder_names():
    out = python(
        "import importlib, pkgutil, sys, aigc, aigc.schemas, aigc.workers\n"
        "names = [m.name for p in (aigc, aigc.schemas, aigc.workers)\n"
        "         for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.') if not m.name.endswith('__main__')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(len(names))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('producer', 'schemas', 'workers')))\n")
    count, strays = out.splitlines()
    assert int(count) > 40  # the walk did reach the subpackages (api, schemas.*, workers.*, server.*)
    assert strays == "[]"


def test_public_api_is_from_aigc_import_submit_wait_results():
    out = python("from aigc import submit, wait, results, submit_file, status, cancel, resume\n"
                 "import aigc\n"
                 "print(submit.__module__, cancel.__module__, sorted(aigc.__all__)[:3])\n"
                 "try:\n    aigc.no_such_name\nexcept AttributeError as exc:\n    print(exc)\n")
    first, second = out.splitlines()
    assert first.split()[:2] == ["aigc.api", "aigc.control"]
    assert second == "module 'aigc' has no attribute 'no_such_name'"


def test_a_worker_process_never_loads_the_producer():
    out = python("import sys, aigc.workers.tasks, aigc.workers.runner, aigc.workers.__main__\n"
                 "print(sorted(m for m in sys.modules if m.startswith('aigc.') and not "
                 "m.startswith(('aigc.schemas', 'aigc.workers'))))\n")
    assert out.strip() == "[]"


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {v: k for k, v in config["package-dir"].items()} == FOLDERS
    found = set()
    for folder, package in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *parts)))
    assert found == set(config["packages"])


@pytest.mark.integration
def test_the_wheel_holds_aigc_only_with_its_migrations_and_model(tmp_path):
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("aigc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
        metadata = email.parser.Parser().parsestr(
            archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    assert {n.split("/")[0] for n in names} == {"aigc", f"aigc-{metadata['Version']}.dist-info"}
    assert "aigc/schemas/migrations/versions/0001_initial_tables.py" in names
    assert "aigc/schemas/migrations/env.py" in names
    assert "aigc/workers/models/text-small/config.json" in names
    assert "aigc/server/app.py" in names and "aigc/__main__.py" in names
    assert "aigc = aigc.cli:main" in entry_points
