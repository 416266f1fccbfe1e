"""The source distribution holds everything a build needs (the C++ headers included) and the
license; a wheel built from it is checked by hand as the README's Install section says (it compiles
the extension, about a minute here)."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory) -> set[str]:
    pytest.importorskip("build", reason="the build package is in the test extras")
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (archive,) = out.glob("vpns_fast-*.tar.gz")
    with tarfile.open(archive) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


def test_sdist_holds_every_file_the_build_needs(sdist_names):
    tracked = subprocess.run(["git", "ls-files", "csrc", "kernels", "vpns_fast"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    if not tracked:  # not a git checkout (e.g. an unpacked sdist): the folders themselves
        tracked = [str(p.relative_to(ROOT)) for d in ("csrc", "kernels", "vpns_fast") for p in (ROOT / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".cpp", ".h")]
    missing = sorted(set(tracked) - sdist_names)
    assert not missing, f"the sdist lacks {missing}"
    assert {"LICENSE", "setup.py", "pyproject.toml", "README.md", "csrc/vpns_ops.h"} <= sdist_names
    # its tests run the examples and the benchmarks (test_examples, test_bench): they come along (an outside review)
    assert {"examples/export_and_deploy.py", "bench/__main__.py", "bench/README.md"} <= sdist_names
    # and tests/test_docs.py builds the API pages with docs/build_api.py (missing, it failed in an unpacked sdist)
    assert "docs/build_api.py" in sdist_names


def test_sdist_carries_no_build_products(sdist_names):
    products = sorted(n for n in sdist_names if n.endswith((".so", ".pyc", ".o")) or n.startswith(".venv"))
    assert not products, f"build products in the sdist: {products}"


def test_the_clis_missing_package_advice_names_pyprojects_extras():
    """`vpns` tells a missing optional package by its extra (cli._EXTRAS, module -> extra): every extra of
    pyproject.toml but `test` is there, and each module's extra lists the distribution that provides it."""
    import tomllib

    from vpns_fast import cli

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(cli._EXTRAS.values()) == set(extras) - {"test"}
    distribution = {"yaml": "pyyaml"}  # the module names that are not their distribution's
    for module, extra in cli._EXTRAS.items():
        names = [re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower() for requirement in extras[extra]]
        assert distribution.get(module, module) in names, (module, extra)
