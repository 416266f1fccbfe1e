"""Where a run stands: the typed state the trainer updates after every epoch and saves in ``last.pt``.

On disk (``meta["training"]["state"]`` of a checkpoint) it is a plain dict with the same keys as
the fields; ``done`` and ``result`` appear only once the run is complete, as they always have, so
run directories written by earlier versions still resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunState:
    phase: int = 0                  # index of the phase to run (or continue)
    epoch: int = 0                  # epochs of that phase already done
    history: list[dict] = field(default_factory=list)  # one record per epoch, all phases
    best: dict | None = None        # the selected epoch's record (final phase only)
    train_seconds: float = 0.0
    images: int = 0                 # training images seen (all ranks), for the throughput
    wall_seconds: float = 0.0       # so far, interruptions excluded
    done: bool = False
    result: dict | None = None      # the run's results row, once done

    def to_dict(self) -> dict:
        # shallow on purpose: the result row shares its history list with the state, as before
        data = {"phase": self.phase, "epoch": self.epoch, "history": self.history, "best": self.best,
                "train_seconds": self.train_seconds, "images": self.images, "wall_seconds": self.wall_seconds}
        if self.done:
            data.update(done=True, result=self.result)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunState:
        return cls(phase=data["phase"], epoch=data["epoch"], history=data["history"], best=data["best"],
                   train_seconds=data["train_seconds"], images=data["images"], wall_seconds=data["wall_seconds"],
                   done=data.get("done", False), result=data.get("result"))

    def finish_epoch(self, epochs_in_phase: int) -> None:
        """Count an epoch of the current phase; after its last one the next phase starts at epoch 0."""
        self.epoch += 1
        if self.epoch == epochs_in_phase:
            self.phase, self.epoch = self.phase + 1, 0
