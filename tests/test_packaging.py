"""The built wheel holds every module under the one import root, and nothing imports the
top-level folders by their bare names."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"mmfm": "mmfm", "moe": "mmfm/moe", "data": "mmfm/data", "encoders": "mmfm/encoders"}


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("mmfm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{installed}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, installed in FOLDERS.items()
        for path in (ROOT / folder).rglob("*.py")
    }
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert not any(n.startswith(("moe/", "data/", "encoders/")) for n in names)
    templates = {f"mmfm/report/templates/{p.name}"
                 for p in (ROOT / "mmfm" / "report" / "templates").glob("*.j2")}
    assert templates and templates <= names, f"report templates missing: {templates - names}"


def test_no_bare_imports_of_top_level_folders():
    bare = re.compile(r"^\s*(import|from)\s+(moe|data|encoders)(\s|\.|$)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.glob("*/**/*.py")
                 if ".venv" not in p.parts and bare.search(p.read_text())]
    assert not offenders, offenders
