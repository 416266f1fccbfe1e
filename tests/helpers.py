"""Helpers shared by several test files."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD, backend_report

# Interpreted Triton costs ~0.1 s a call on the CPU: those tests get a reduced matrix.
INTERPRETED = {"triton"} if not torch.cuda.is_available() else set()
# Tests of the Triton kernels on the default device (CUDA, else CPU through the interpreter).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    not backend_report()["triton"]["devices"][TRITON_DEVICE]["available"], reason="triton cannot run here")


def backends_for(op: str) -> list[str]:
    """Every backend that implements ``op`` and can run on CPU tensors here."""
    return [name for name, r in backend_report().items() if op in r["ops"] and r["devices"]["cpu"]["available"]]


def case_id(value) -> str:
    """Readable pytest id for one parameter: dtypes without ``torch.``, shapes joined by x, lists
    of shapes as their count and first shape."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, list):
        return f"{len(value)}tensors-" + "x".join(map(str, value[0]))
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def cases_on_backends(backends, full, reduced=None, ids=case_id):
    """``full`` cases on every backend, or ``reduced`` ones on interpreted backends; each case
    gets the backend name appended."""
    reduced = full if reduced is None else reduced
    return [pytest.param(*case, b, id="-".join(map(ids, case + (b,))))
            for b in backends for case in (reduced if b in INTERPRETED else full)]


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """BN statistics and affine far from identity, so pruned channels output constants of both signs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


# ----------------------------------------------------------- the visual prompt, as the release builds it
# An oracle independent of the library's reference (kernels/prompt.py): zero-pad with F.pad, a mask
# built by slicing (or by F.pad with value 1 for "expansive", as the release does), ``program * mask``
# or ``sigmoid(program) * mask``, clamp, then per-channel normalization.

def release_mask(kind, out_size, in_size, channels=3, pad=0, mask_size=0, row=0, col=0, dtype=torch.float64):
    """The (C, out, out) 0/1 prompt mask, built the way the release modules build it."""
    if kind == "pad":
        mask = torch.ones(channels, out_size, out_size, dtype=dtype)
        mask[:, pad:out_size - pad, pad:out_size - pad] = 0
    elif kind == "fix":
        mask = torch.zeros(channels, out_size, out_size, dtype=dtype)
        mask[:, :mask_size, :mask_size] = 1
    elif kind == "random":
        mask = torch.zeros(channels, out_size, out_size, dtype=dtype)
        mask[:, row:row + mask_size, col:col + mask_size] = 1
    elif kind == "expansive":
        left, right = int((out_size - in_size + 1) / 2), int((out_size - in_size) / 2)
        mask = F.pad(torch.zeros(channels, in_size, in_size, dtype=dtype), (left, right, left, right), value=1)
    else:
        raise AssertionError(kind)
    return mask


def release_prompt(images, program, kind, pad=0, mask_size=0, row=0, col=0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   dtype=torch.float64):
    """Release-style forward, computed in ``dtype`` (float64 by default), differentiable in program."""
    x = images.to(dtype) / 255 if images.dtype == torch.uint8 else images.to(dtype)
    out_size, in_size, channels = program.shape[-1], images.shape[-1], images.shape[1]
    left, right = int((out_size - in_size + 1) / 2), int((out_size - in_size) / 2)
    x = F.pad(x, (left, right, left, right), value=0)
    mask = release_mask(kind, out_size, in_size, channels, pad, mask_size, row, col, dtype)
    p = program.to(dtype)
    prompt = p * mask if kind == "pad" else torch.sigmoid(p) * mask
    x = torch.clamp(x + prompt, 0, 1)
    mean_t = torch.tensor(mean, dtype=dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


def tiny_config(out=None, **overrides):
    """32 synthetic 32x32 images per split, small_resnet, one epoch per stage, deterministic."""
    settings = dict(dataset="synthetic", limit=32, batch_size=32, model="small_resnet", search_epochs=1,
                    finetune_epochs=1, methods=("vpns",), densities=(0.5,), progress=False, deterministic=True,
                    device="cpu", out=None if out is None else str(out))
    settings.update(overrides)
    from vpns_fast.training.config import TrainConfig

    return TrainConfig(**settings)


def run_in_threads(work, count: int = 2) -> list:
    """Runs ``work(index)`` in ``count`` Python threads at once and returns the (index, exception) pairs
    of those that raised, so that a test reports a failure in a thread instead of losing it."""
    import threading

    errors = []

    def guarded(index):
        try:
            work(index)
        except Exception as exc:  # handed back to the test, with the thread's index
            errors.append((index, exc))

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def outputs_from_two_threads(call, inputs: list, rounds: int) -> list:
    """Two threads call ``call`` at once under no_grad, thread t on inputs[t], inputs[t + 2], ... for
    ``rounds`` rounds; returns the (input index, output) pairs, every call's. Fails the test if a thread
    raised."""
    import torch

    results = []

    def work(thread):
        for _ in range(rounds):
            for index in range(thread, len(inputs), 2):
                with torch.no_grad():
                    results.append((index, call(inputs[index])))

    errors = run_in_threads(work)
    assert not errors, errors
    assert len(results) == rounds * len(inputs)
    return results


def kernel_switch_runs(model: nn.Module, x: torch.Tensor, switch, method: str, step: str) -> dict:
    """``model`` converted for the CPU (policy "sparse") and called eagerly on ``x`` with an engine ``switch`` (a
    ``sparse_cpu.set_*`` function) off, then on, each call of ``SparseConv2d.<method>`` (the kernel's arguments, or
    None where it does not run) recorded; then deployed and called through its compiled call plan with the switch
    on. The outputs both ways and through the plan must be equal exactly (rtol = atol = 0), and the model's within
    float32 rounding.
    Returns {"taken": {False: calls that ran the kernel, True: ...}, "steps": the plan's steps whose name starts with
    ``step``}; the switch and the method are set back."""
    import vpns_fast as vf
    from vpns_fast.deploy import sparse_cpu

    converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse")
    original = getattr(sparse_cpu.SparseConv2d, method)
    runs = []

    def recorded(self, x, residual, activation):
        taken = original(self, x, residual, activation)
        runs.append(taken is not None)
        return taken

    found, outputs = {"taken": {}}, {}
    previous = switch(True)
    try:
        for enabled in (False, True):
            switch(enabled)
            setattr(sparse_cpu.SparseConv2d, method, recorded)
            runs.clear()
            with torch.inference_mode():
                outputs[enabled] = converted(x)
            setattr(sparse_cpu.SparseConv2d, method, original)
            found["taken"][enabled] = sum(runs)
        deployed = vf.deploy(model, "cpu", tuple(x.shape), policy="sparse", mean=(0.0,) * 3, std=(1.0,) * 3)
        with torch.inference_mode():
            deployed(x)  # the plan is made on a call, then runs
            planned, timing = deployed.timed_call(x)
        assert timing["steps"] is not None  # the compiled call plan ran
        found["steps"] = sum(name.startswith(step) for _, _, name, _ in timing["steps"])
    finally:
        setattr(sparse_cpu.SparseConv2d, method, original)
        switch(previous)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
    torch.testing.assert_close(planned, outputs[False], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(outputs[True], model(x), rtol=1e-4, atol=1e-4)
    return found
