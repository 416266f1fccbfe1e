"""The API reference builds from the docstrings without a warning, with a page for every public
module, and the docs link only files the repository has."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is in the test extras")
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "build_api.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import build_api
    finally:
        sys.path.remove(str(ROOT / "docs"))
    pages = {p.relative_to(tmp_path).with_suffix("").as_posix().replace("/", ".") for p in tmp_path.rglob("*.html")}
    missing = [name for name in build_api.public_modules() if name != "vpns_fast" and name not in pages]
    assert not missing, f"no API page for {missing}"


@pytest.mark.parametrize("doc", ["README.md", "docs/ARCHITECTURE.md", "docs/method.md", "docs/cpu-engine-runs.md",
                                 "bench/README.md"])
def test_docs_link_only_files_the_repository_has(doc):
    text = (ROOT / doc).read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    broken = [link for link in local if not ((ROOT / doc).parent / link).exists()]
    assert not broken, f"{doc} links to files that do not exist: {broken}"
    assert not re.search(r"SPEC\.md|PERFORMANCE\.md|shared folder", text)
