"""`make demo`: the main job on the embedded default (scikit-learn's digits, the small ResNet).

A dense model is trained first (no published weights exist for it), then dense fine-tuning,
VPNs and HYDRA are compared at density 0.1 and along a short sweep. Output: a results table,
``runs/demo/results.json`` and the plots in ``runs/demo/plots/``.
"""
from __future__ import annotations

import os
import sys

import torch

from vpns_fast.cli import main

DEMO_OUT = os.path.join("runs", "demo")


def demo_args(out: str = DEMO_OUT) -> list[str]:
    # The digits are 8x8: a 16x16 network input keeps their detail at a quarter of 32x32's cost.
    return ["prune", "--dataset", "digits", "--model", "small_resnet", "--input-size", "16", "--prompt-size", "2",
            "--pretrain-epochs", "12", "--method", "dense,vpns,hydra", "--density", "0.3,0.1,0.05", "--epochs", "3",
            "--batch-size", "64", "--seed", "7", "--out", out, "--force"]


if __name__ == "__main__":
    # 2 threads fit the 2-core machines this demo is sized for; more threads oversubscribe them.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if os.path.exists(os.path.join(DEMO_OUT, "config.json")):
        print(f"demo: replacing the previous demo output in {DEMO_OUT}/", flush=True)
    sys.exit(main(demo_args() + sys.argv[1:]))
