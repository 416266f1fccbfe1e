"""Export a pruned model, deploy it on the CPU and measure it against the dense network.

    python examples/export_and_deploy.py [OUT_DIR]

Prunes the small ResNet on scikit-learn's digits (shipped with scikit-learn, nothing is downloaded)
to 10% of its weights with a short VPNs run, exports the selected checkpoint in the sparse format,
loads it back as an inference module and times it. The run is tiny so that it finishes in seconds;
for a real model change ``model``, ``dataset`` and the epochs.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

import vpns_fast as vf
from vpns_fast.deploy.runtime import benchmark_inference
from vpns_fast.training import TrainConfig, TwoStageTrainer
from vpns_fast.training.run_files import run_dir


def main(out: str) -> int:
    config = TrainConfig(dataset="digits", model="small_resnet", input_size=16, prompt_size=2, pretrain_epochs=2,
                         methods=("vpns",), densities=(0.1,), search_epochs=1, finetune_epochs=1, batch_size=64,
                         seed=7, out=os.path.join(out, "run"), progress=False)
    result = TwoStageTrainer(config).run()[0]
    print(f"pruned: test accuracy {result['test_acc']:.2f}% at density {result['actual_density']:.3f}")

    checkpoint = os.path.join(run_dir(config.out, "vpns", 0.1), "best.pt")
    exported = os.path.join(out, "small_resnet.sparse.safetensors")
    vf.export(checkpoint, "sparse", exported)
    print(f"exported: {exported} ({os.path.getsize(exported) / 1024:.0f} KiB)")

    deployed = vf.deploy(exported, "cpu")  # picks sparse or dense per layer by timing both
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)  # uint8 in [0, 255] or float in [0, 1]
    print("predicted classes:", deployed(images).argmax(1).tolist())

    rows = benchmark_inference(exported, batch_sizes=(1, 32), iters=5, warmup=1)
    for batch in (1, 32):
        # an engine that is not installed (ONNX Runtime) comes back as a row with "skipped" and no timings
        speed = {row["backend"]: row["images_per_s"] for row in rows if row["batch"] == batch and "skipped" not in row}
        print(f"batch {batch:>2}: " + ", ".join(f"{name} {value:.0f} images/s" for name, value in speed.items())
              + f" ({speed['deploy'] / speed['dense-torch']:.2f}x dense; a tiny network, timings are noisy)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(sys.argv[1]))
    with tempfile.TemporaryDirectory() as folder:
        sys.exit(main(folder))
