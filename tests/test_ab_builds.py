"""benchmarks/ab_builds.py renames every op registration of a copy of csrc/,
so that two builds load side by side (the timing itself is not tested)."""

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ab_builds  # noqa: E402


def registrations(folder: Path) -> list[str]:
    pattern = re.compile(r'TORCH_LIBRARY(?:_IMPL|_FRAGMENT)?\(\s*\w+\s*,|"\w+::batch_norm')
    return [m.group(0) for path in folder.rglob("*") if path.is_file()
            for m in pattern.finditer(path.read_text())]


def test_renames_every_registration_of_csrc(tmp_path):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    before = registrations(tmp_path / "csrc")
    assert any(r.startswith("TORCH_LIBRARY(") for r in before)
    assert any(r.startswith("TORCH_LIBRARY_FRAGMENT(") for r in before)
    assert any(r.startswith("TORCH_LIBRARY_IMPL(") for r in before)
    assert any(r.startswith('"') for r in before)
    ab_builds._rename_namespace(str(tmp_path), "abtest")
    after = registrations(tmp_path / "csrc")
    assert len(after) == len(before)
    assert all("abtest" in r and "normext" not in r for r in after), after


def test_source_from_an_archive_file(tmp_path):
    # gpu_check.sh's AB_BASE: a commit the device's copy of the repository lacks
    archive = tmp_path / "base.tar"
    archive.write_bytes(b"tar bytes")
    assert ab_builds._source_tar(str(archive)) == b"tar bytes"


def test_the_package_itself_is_build_normext():
    import torch

    import normext  # noqa: F401

    assert ab_builds.load("normext") is torch.ops.normext
