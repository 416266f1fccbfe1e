"""The runnable examples in examples/ run as a user would run them, on the embedded digits."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script, expected, without_onnxruntime", [
    ("prune_your_model.py", ["vpns at density 0.20: test accuracy", "hydra at density 0.20", "total"], False),
    ("export_and_deploy.py", ["pruned: test accuracy", "exported:", "predicted classes:", "batch 32:"], False),
    # ONNX Runtime is optional: the example ended in a KeyError on a default install (an outside review)
    ("export_and_deploy.py", ["predicted classes:", "batch 32:"], True),
])
def test_example_runs(tmp_path, script, expected, without_onnxruntime):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    if without_onnxruntime:  # a module of that name that fails to import, first on the path
        hidden = tmp_path / "hide"
        hidden.mkdir()
        (hidden / "onnxruntime.py").write_text("raise ImportError('onnxruntime hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(hidden), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in expected:
        assert line in done.stdout, f"{script}: {line!r} not in its output:\n{done.stdout}"
