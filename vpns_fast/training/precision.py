"""Mixed precision, chosen once per job: the autocast context and the gradient scaler.

As in nanoGPT's train.py, the scaler always exists and is simply disabled unless the job runs in
fp16: a disabled ``GradScaler`` passes the loss through, steps the optimizer directly and never
updates, so the training loop is the same code for every precision.
"""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``amp`` is "none", "bf16" or "fp16"; ``device_type`` the device the job trains on."""

    def __init__(self, amp: str, device_type: str):
        self.dtype = AUTOCAST_DTYPES[amp]
        self.device_type = device_type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A fresh scaler; one per phase, so its loss scale carries over that phase's epochs. Only
        fp16 needs one: bf16 has float32's exponent range."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype is torch.float16)
