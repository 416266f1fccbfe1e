"""The output folder's lock under DDP: rank 0 alone takes it, and its refusal reaches every rank, which all
raise the same RunInUseError instead of the others waiting at a barrier for a rank 0 that has gone."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from vpns_fast.files import FileLockedError, file_lock
from vpns_fast.training import distributed
from vpns_fast.training.run_files import LOCK_NAME, run_folder_lock

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from vpns_fast.training import distributed
    from vpns_fast.training.run_files import RunInUseError
    from vpns_fast.training.trainer import TrainConfig, TwoStageTrainer

    torch.set_num_threads(1)
    share = sys.argv[1]
    config = TrainConfig(dataset="synthetic", limit=16, batch_size=8, search_epochs=1, finetune_epochs=1,
                         methods=("vpns",), densities=(0.5,), progress=False, deterministic=True, device="cpu",
                         out=os.path.join(share, "run"))
    trainer = TwoStageTrainer(config)
    try:
        trainer.run()
        outcome = {"rank": trainer.rank, "world_size": trainer.world_size, "error": None}
    except RunInUseError as error:
        outcome = {"rank": trainer.rank, "world_size": trainer.world_size, "error": str(error)}
    with open(os.path.join(share, f"outcome_rank{trainer.rank}.json"), "w") as f:
        json.dump(outcome, f)
    distributed.barrier()  # both ranks got here: neither waits for a partner that left
    distributed.shutdown()
""")


@pytest.mark.slow
def test_a_held_folder_is_refused_on_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path)]
    with file_lock(out / LOCK_NAME, wait=False):  # another job holds the folder
        try:
            done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired as expired:
            pytest.fail(f"the ranks hung on a refused lock: {expired}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"outcome_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(o["rank"], o["world_size"]) for o in outcomes] == [(0, 2), (1, 2)]
    expected = (f"{out} is in use by another vpns process (it holds {out / LOCK_NAME}.lock); wait for it to "
                f"finish, then `vpns resume {out}`")
    assert [o["error"] for o in outcomes] == [expected, expected]
    assert sorted(os.listdir(out)) == [LOCK_NAME + ".lock"]  # nothing written


def test_an_error_inside_the_job_is_not_reported_as_a_held_folder(tmp_path):
    # the old lock caught FileLockedError from the whole job body (e.g. another lock taken without
    # waiting) and misreported it as the run folder being in use
    with pytest.raises(FileLockedError, match="conv table"):
        with run_folder_lock(str(tmp_path), is_main=True):
            raise FileLockedError("conv table lock held")


def test_main_decides_without_ddp_is_the_flag():
    assert not distributed.active()
    assert distributed.main_decides(True) is True
    assert distributed.main_decides(False) is False
