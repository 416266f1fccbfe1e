"""The typed run state against the dict stored in checkpoints, and the precision object."""
import pytest
import torch

from vpns_fast.training.precision import Precision
from vpns_fast.training.state import RunState

# meta["training"]["state"] of a last.pt written before RunState existed, mid-run and complete
STORED_MID_RUN = {"phase": 1, "epoch": 2, "history": [{"phase": "search", "epoch": 1, "val_acc": 50.0}],
                  "best": None, "train_seconds": 1.5, "images": 64, "wall_seconds": 2.0}
STORED_DONE = dict(STORED_MID_RUN, done=True, result={"method": "vpns", "test_acc": 60.0})


@pytest.mark.parametrize("stored", [STORED_MID_RUN, STORED_DONE], ids=["mid-run", "done"])
def test_run_state_reads_and_writes_the_stored_keys(stored):
    state = RunState.from_dict(stored)
    assert state.done == ("done" in stored) and state.phase == 1 and state.epoch == 2
    assert state.to_dict() == stored
    assert list(state.to_dict()) == list(stored)  # same keys, same order


def test_finish_epoch_moves_to_the_next_phase_after_the_last_epoch():
    state = RunState(phase=1, epoch=0)
    state.finish_epoch(2)
    assert (state.phase, state.epoch) == (1, 1)
    state.finish_epoch(2)
    assert (state.phase, state.epoch) == (2, 0)


def test_only_fp16_scales_and_a_disabled_scaler_is_a_pass_through():
    for amp in ("none", "bf16"):
        scaler = Precision(amp, "cpu").grad_scaler()
        assert not scaler.is_enabled() and scaler.state_dict() == {}
    assert Precision("fp16", "cpu").grad_scaler().is_enabled()
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scaler = Precision("none", "cpu").grad_scaler()
    loss = (weight * 2).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.zeros(3))


def test_autocast_follows_the_amp_mode():
    with Precision("bf16", "cpu").autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with Precision("none", "cpu").autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
