"""`vpns --help` and `vpns CMD --help` answer without importing torch, and the lazy package still gives every
public name, the same objects as their modules, with the custom ops there as soon as a layer is loaded.
Each check runs in a fresh interpreter: this one has torch loaded already."""
from __future__ import annotations

import json
import subprocess
import sys

import vpns_fast
from vpns_fast import cli

HEAVY = ("torch", "numpy", "torchvision", "triton", "vpns_fast.ops", "vpns_fast.nn", "vpns_fast.training",
         "vpns_fast.deploy", "vpns_fast.data")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_every_help_answers_without_importing_torch():
    code = f"""
import json, sys
from vpns_fast import cli
commands = [[]] + [[name] for name in cli.build_parser()._subparsers._group_actions[0].choices]
for argv in commands:
    try:
        cli.main(argv + ["--help"])
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
print(json.dumps({{"commands": commands, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    done = run_python(code)
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["loaded"] == []
    assert ["prune"] in report["commands"] and ["bench-infer"] in report["commands"]
    assert "--config FILE" in done.stdout and "usage: vpns prune" in done.stdout


def test_python_m_vpns_fast_help_imports_no_torch():
    """The real entry point, with -X importtime listing every module the process imported."""
    done = run_python("", "-X", "importtime", "-m", "vpns_fast", "--help")
    assert "usage: vpns" in done.stdout and "prune" in done.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "vpns_fast.cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_the_lazy_package_gives_every_public_name():
    code = """
import importlib, json, sys
import vpns_fast
before = 'torch' in sys.modules
names = list(vpns_fast.__all__) + ['TrainConfig', 'TwoStageTrainer', 'export']
same = {}
for name in names:
    value = getattr(vpns_fast, name)
    source = vpns_fast._LAZY.get(name)
    same[name] = source is None or value is getattr(importlib.import_module(source), name)
ns = {}
exec('from vpns_fast import sparsify, deploy, ops, TrainConfig', ns)
star = {}
exec('from vpns_fast import *', star)
import vpns_fast.deploy.export  # a submodule of the deploy subpackage: vpns_fast.deploy stays the function
import vpns_fast.deploy.sparse_cpu as engine  # the "as" form walks attributes through the function (was ImportError)
assert engine is sys.modules["vpns_fast.deploy.sparse_cpu"]
for name in ("no_such_name", "_private", "bench", "tests"):  # the lazy lookup invents nothing
    try:
        getattr(vpns_fast, name)
    except AttributeError as exc:
        assert name in str(exc), exc
    else:
        raise SystemExit(f"vpns_fast.{name} resolved")
print(json.dumps({"torch_before": before, "same": same, "missing_in_dir": sorted(set(names) - set(dir(vpns_fast))),
                  "deploy": vpns_fast.deploy.__module__, "from_deploy": ns['deploy'].__module__,
                  "ops": vpns_fast.ops.__name__, "star": sorted(set(vpns_fast.__all__) - set(star))}))
"""
    report = json.loads(run_python(code).stdout.splitlines()[-1])
    assert report["torch_before"] is False
    assert all(report["same"].values()) and len(report["same"]) == len(vpns_fast.__all__) + 3
    assert report["missing_in_dir"] == [] and report["star"] == []
    assert report["deploy"] == report["from_deploy"] == "vpns_fast.deploy.runtime"
    assert report["ops"] == "vpns_fast.ops"


def test_custom_ops_are_registered_by_the_layer_that_uses_them():
    """Nothing relies on `import vpns_fast` registering torch.ops.vpns_fast: loading a masked layer does."""
    code = """
import torch, vpns_fast
def registered():
    names = ("masked_weights", "topk_threshold", "prompt_normalize")
    return sorted(n for n in names if hasattr(torch.ops.vpns_fast, n))
print(registered())
vpns_fast.MaskedConv2d
print(registered())
"""
    lines = run_python(code).stdout.splitlines()[-2:]
    assert lines == ["[]", "['masked_weights', 'prompt_normalize', 'topk_threshold']"]


def test_help_names_match_the_modules_that_define_them():
    from vpns_fast.data import DATASETS
    from vpns_fast.pruning.methods import METHODS

    assert cli.HELP_DATASETS == DATASETS
    assert cli.HELP_METHODS == tuple(name for name, m in METHODS.items() if m.mask != "fixed")


def test_version_answers_without_importing_torch():
    """`vpns --version` had been an error ("the following arguments are required: COMMAND"): an outside review."""
    code = f"""
import sys
from vpns_fast import cli
try:
    cli.main(["--version"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print([m for m in {HEAVY!r} if m in sys.modules])
"""
    from vpns_fast._version import __version__

    done = run_python(code)
    assert done.stdout.splitlines()[0] == f"vpns_fast {__version__}" and done.stdout.splitlines()[-1] == "[]"
