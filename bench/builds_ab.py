"""Two builds of the engine on one network, in alternating processes: for a kernel replaced outright (no switch to
compare it with in one process, as ``bench.generated_code_ab`` has), against a checkout of the commit before it with
its extension built there.

Each round runs one process per build (``BASE`` first in odd rounds, this tree first in even ones), each deploying
the network afresh (``vpns_fast.deploy`` at the batch given: the per-layer choices are measured again, so they may
differ between processes) and timing ``--calls`` plain calls of its compiled call plan, then as many calls with the
plan's steps timed; it reports the medians, and the steps named by ``--steps``. Per-round ratios BASE / this tree
(above 1: this tree is faster), median and p20-p80 over the rounds. Processes, not calls, alternate: the ratios carry
the spread of the per-process choices, which in-process switches do not.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py -q build_ext --inplace)
    .venv/bin/python -m bench.builds_ab /tmp/base resnet50 0.1 [--batch 1] [--rounds 6] [--calls 20]
        [--steps avgpool,fc] > report.txt
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.runner import round_ratio_line


def child(argv: list[str]) -> None:
    """One process's work, printed as one JSON line: argv = arch density batch calls steps(comma-separated) threads.
    Run as a script in the tree measured (its vpns_fast and bench first on the path); the calls are timed by that
    tree's bench.ort_layers.our_layer_ms (there since 2026-12-05)."""
    import torch

    import vpns_fast as vf
    from bench.cases.infer import pruned_model
    from bench.ort_layers import our_layer_ms

    arch, density, batch, calls, wanted, threads = argv
    torch.set_num_threads(int(threads))
    x = torch.randn(int(batch), 3, 224, 224)
    network = vf.deploy(pruned_model(arch, float(density), "uniform")).network
    layers_ms, _timed_ms, plain_ms, _how = our_layer_ms(network, x, int(calls))
    steps_ms = {name: layers_ms[name] for name in wanted.split(",") if name in layers_ms}
    print(json.dumps({"tree": vf.__file__, "plain_ms": plain_ms, "steps_ms": steps_ms}))


def one_process(tree: str, args) -> dict:
    # this file run as a script: its own folder first on sys.path (no package of that name), then the tree's
    environment = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", args.arch, str(args.density),
                           str(args.batch), str(args.calls), args.steps, str(args.threads)],
                          env=environment, cwd=tree, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["tree"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"the process for {tree} imported vpns_fast from {result['tree']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a source tree with its extension built (the build compared against)")
    parser.add_argument("arch")
    parser.add_argument("density", type=float)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--steps", default="avgpool,fc", help="modules whose plan steps are reported")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(args.base, "vpns_fast")):
        parser.error(f"base: expected a source tree with vpns_fast/ in it, got {args.base!r}")
    print(f"# {args.arch} at {args.density} kept, batch {args.batch}, {args.threads} threads; base {args.base} "
          f"against {here}; {args.rounds} rounds of one process each, {args.calls} calls each way a process")
    plain = {"base": [], "this tree": []}
    for round_index in range(args.rounds):
        if round_index % 2 == 0:  # the order alternates: a build that always ran second might gain or lose by it
            base, new = one_process(args.base, args), one_process(here, args)
        else:
            new, base = one_process(here, args), one_process(args.base, args)
        plain["base"].append(base["plain_ms"])
        plain["this tree"].append(new["plain_ms"])
        steps = "  ".join(f"{name} {base['steps_ms'].get(name, float('nan')):.3f} -> {ms:.3f}"
                          for name, ms in new["steps_ms"].items())
        print(f"round {round_index + 1}: {base['plain_ms']:.2f} -> {new['plain_ms']:.2f} ms "
              f"({base['plain_ms'] / new['plain_ms']:.3f}x)  {steps}", flush=True)
    print(round_ratio_line("the whole call", plain["base"], plain["this tree"], ("base", "this tree")))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        raise SystemExit(0)
    raise SystemExit(main())
