"""Two CPU ranks (gloo, started by torchrun) train VPNs together: both end with the same masks,
the same model (BN statistics included), the same results, and rank 0 alone writes files."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from vpns_fast.training import distributed
    from vpns_fast.pruning.masking import masks
    from vpns_fast.training.trainer import TrainConfig, TwoStageTrainer

    torch.set_num_threads(1)
    share = sys.argv[1]


    class Recording(TwoStageTrainer):
        # every rank keeps what it ends each run with, for the test to compare
        def _result_row(self, run, wall):
            tag = f"{run.method.name}_rank{self.rank}"
            network = run.network
            torch.save({k: v.cpu() for k, v in masks(network.model).items()}, os.path.join(share, f"masks_{tag}.pt"))
            torch.save({k: v.cpu() for k, v in network.state_dict().items()}, os.path.join(share, f"state_{tag}.pt"))
            return super()._result_row(run, wall)


    config = TrainConfig(dataset="synthetic", limit=37, batch_size=8, search_epochs=1, finetune_epochs=1,
                         methods=("vpns",), densities=(0.3,), progress=False, deterministic=True, device="cpu",
                         out=os.path.join(share, "run"))
    trainer = Recording(config)
    results = trainer.run()
    with open(os.path.join(share, f"results_rank{trainer.rank}.json"), "w") as f:
        json.dump({"rank": trainer.rank, "world_size": trainer.world_size, "results": results}, f)
    distributed.shutdown()
""")


@pytest.mark.slow
def test_two_gloo_ranks_end_with_the_same_masks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reports = [json.loads((tmp_path / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    timing = ("wall_s", "train_s", "images_per_s")
    runs = [[{k: v for k, v in run.items() if k not in timing} for run in r["results"]] for r in reports]
    assert runs[0] == runs[1]
    (run,) = runs[0]
    masks = [torch.load(tmp_path / f"masks_vpns_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(masks[0]) == sorted(masks[1])
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    total = sum(m.numel() for m in masks[0].values())
    kept = sum(int(m.sum()) for m in masks[0].values())
    assert kept == total - int(0.7 * total) == run["params_kept"]
    # the whole model, BN running statistics and label mapping included, agrees across ranks
    states = [torch.load(tmp_path / f"state_vpns_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [k for k in states[0] if not torch.equal(states[0][k], states[1][k])] == []
    # accuracies count every test image once over both ranks (37 is odd: no padding duplicates)
    assert all(0 <= run[k] <= 100 for k in ("test_acc", "test_acc_prompt", "val_acc"))
    assert round(run["test_acc"] * 37 / 100, 6) == int(round(run["test_acc"] * 37 / 100))
    with open(tmp_path / "run" / "results.json") as f:
        written = json.load(f)
    assert written["env"]["world_size"] == 2
    assert os.path.isfile(tmp_path / "run" / "runs" / "vpns_d0.3" / "best.pt")
