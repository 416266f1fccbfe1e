"""Every Triton kernel compiles for real GPUs (sm_90 H100, sm_80 A100), checked without one.

``tests/triton_aot.py`` runs the launchers with triton's driver replaced by a compile-only one
(see its docstring); here it runs in a subprocess, since this process imported triton under the
interpreter. The interpreter tests check the arithmetic; this checks that the same code lowers
through ptxas, and a few properties of the PTX that a slip would silently lose.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from vpns_fast.kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARCHES = ("90", "80")
# Shared memory one block may use (opt-in maximum): H100 227 KiB, A100 163 KiB.
SHARED_MEMORY_LIMIT = {"90": 227 * 1024, "80": 163 * 1024}


def jit_kernels() -> set[str]:
    """Names of the launched Triton kernels in kernels/: ``@triton.jit`` functions named ``*_kernel``."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    ast.unparse(d) == "triton.jit" for d in node.decorator_list):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled():
    # every config of every kernel is compiled: not interpreted, and not pinned to one igemm config
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VPNS_FAST_IGEMM_AUTOTUNE")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), "--arch", *ARCHES],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)["targets"]


def test_kernel_list_is_found():
    assert {"_topk_threshold_hist_kernel", "_masked_weight_fwd_kernel", "_prompt_normalize_fwd_kernel"} \
        <= jit_kernels()


@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_compiles(compiled, arch):
    # A kernel missing here has no exercise in tests/triton_aot.py: add one.
    assert set(compiled[arch]) == jit_kernels()
    for name, entry in compiled[arch].items():
        assert entry["variants"] >= 1, name
        # A config over the arch's shared memory compiles but fails at launch.
        assert entry["shared_bytes_max"] <= SHARED_MEMORY_LIMIT[arch], (name, entry["shared_bytes_max"])


@pytest.mark.parametrize("arch", ARCHES)
def test_each_arch_gets_its_own_code(compiled, arch):
    for name, entry in compiled[arch].items():
        assert entry["ptx_targets"] == [f"sm_{arch}a" if arch == "90" else f"sm_{arch}"], name


@pytest.mark.parametrize("arch", ARCHES)
def test_no_accidental_fp64(compiled, arch):
    """fp64 runs at 1/2..1/64 of fp32 speed: only fp64 data or an explicit FP64 flag may use it
    (a Python float promoted in fp32 code would show up here)."""
    assert {name: e["unexpected_fp64"] for name, e in compiled[arch].items() if e["unexpected_fp64"]} == {}


@pytest.mark.parametrize("arch", ARCHES)
def test_threshold_histogram_lowering(compiled, arch):
    counts = compiled[arch]["_topk_threshold_hist_kernel"]["ptx_counts"]
    assert counts["atom_global_acq_rel"] == 0  # sem="relaxed" honoured: no fence per bin
    assert counts["atom_global_relaxed"] > 0
    assert counts["atom_shared"] > 0  # tl.histogram counts in shared memory
