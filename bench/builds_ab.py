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
import statistics
import subprocess
import sys

# What one process runs: argv = arch density batch calls steps(comma-separated)
_ONE_PROCESS = r"""
import json, statistics, sys, time
import torch
from bench.cases.infer import pruned_model
import vpns_fast as vf
from vpns_fast.deploy import call_plan
arch, density, batch, calls, wanted = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(int(sys.argv[6]))
x = torch.randn(batch, 3, 224, 224)
network = vf.deploy(pruned_model(arch, density, "uniform")).network
plans = call_plan.NetworkPlans()
with torch.inference_mode():
    for _ in range(3):
        plans.output(network, x)
    plain, steps = [], {}
    for _ in range(calls):
        start = time.perf_counter()
        plans.output(network, x)
        plain.append(time.perf_counter() - start)
        _, timed = plans.timed_output(network, x)
        if timed is None:
            raise SystemExit("the compiled call plan was not run")
        for _kind, module, _step, seconds in timed:
            if module in wanted.split(","):
                steps.setdefault(module, []).append(seconds)
print(json.dumps({"tree": vf.__file__, "plain_ms": 1e3 * statistics.median(plain),
                  "steps_ms": {name: 1e3 * statistics.median(s) for name, s in steps.items()}}))
"""


def one_process(tree: str, args) -> dict:
    # run in the tree: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH
    environment = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, "-c", _ONE_PROCESS, args.arch, str(args.density), str(args.batch),
                           str(args.calls), args.steps, str(args.threads)],
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
    ratios = []
    for round_index in range(args.rounds):
        if round_index % 2 == 0:  # the order alternates: a build that always ran second might gain or lose by it
            base, new = one_process(args.base, args), one_process(here, args)
        else:
            new, base = one_process(here, args), one_process(args.base, args)
        ratios.append(base["plain_ms"] / new["plain_ms"])
        steps = "  ".join(f"{name} {base['steps_ms'].get(name, float('nan')):.3f} -> {ms:.3f}"
                          for name, ms in new["steps_ms"].items())
        print(f"round {round_index + 1}: {base['plain_ms']:.2f} -> {new['plain_ms']:.2f} ms "
              f"({ratios[-1]:.3f}x)  {steps}", flush=True)
    ordered = sorted(ratios)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    print(f"base / this tree: median {statistics.median(ratios):.3f}x (p20-p80 {pick(0.2):.3f}-{pick(0.8):.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
