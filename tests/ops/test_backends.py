"""Backend registry: forcing by context and environment, errors that name what went wrong,
nesting, "auto", thread isolation and ``backend_report``.

Written to hold as backends gain ops: where a test needs "a backend that lacks the op" it
empties a backend's op table with monkeypatch instead of relying on today's registry."""
from __future__ import annotations

import threading

import pytest
import torch
from tolerance import assert_close

import vpns_fast.ops as ops
from vpns_fast.ops import BACKEND_NAMES, BackendError, backend_report, forced_backend, resolve, use_backend
from vpns_fast.ops import backends as registry

OPS = ("prompt_normalize", "topk_threshold", "masked_conv2d", "masked_linear")


def call_op(op_name: str):
    """One small CPU call of each public op that dispatches."""
    if op_name == "prompt_normalize":
        return ops.pad_prompt(torch.rand(1, 3, 4, 4), torch.zeros(3, 6, 6), 1)
    if op_name == "topk_threshold":
        return ops.topk_threshold([torch.randn(10)], 0.5)
    if op_name == "masked_conv2d":
        w = torch.randn(2, 3, 1, 1)
        return ops.masked_conv2d(torch.randn(1, 3, 2, 2), w, torch.randn_like(w), 0.5)
    if op_name == "masked_linear":
        w = torch.randn(2, 3)
        return ops.masked_linear(torch.randn(1, 3), w, torch.randn_like(w), 0.5)
    raise AssertionError(op_name)


@pytest.fixture(autouse=True)
def _no_env_forcing(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


def test_names():
    assert BACKEND_NAMES == ("torch", "triton", "cpp")
    assert issubclass(BackendError, RuntimeError)


@pytest.mark.parametrize("op_name", OPS)
def test_torch_backend_serves_every_op(op_name):
    with use_backend("torch"):
        assert forced_backend() == "torch"
        assert resolve(op_name, "cpu")[0] == "torch"
        call_op(op_name)
    assert forced_backend() is None


@pytest.mark.parametrize("op_name", OPS)
def test_auto_choice_on_cpu_follows_preference(op_name):
    name, _ = resolve(op_name, "cpu")
    report = backend_report()
    first = next(b for b in registry.PREFERENCE["cpu"] if op_name in report[b]["ops"] and
                 report[b]["devices"]["cpu"]["available"])
    assert name == first
    # Interpreted triton on the CPU is never picked automatically.
    assert name != "triton"
    call_op(op_name)


def test_unknown_backend_in_use_backend():
    with pytest.raises(BackendError, match="nope") as info:
        with use_backend("nope"):
            pass  # pragma: no cover
    for name in BACKEND_NAMES:
        assert name in str(info.value)
    assert forced_backend() is None  # nothing was pushed


@pytest.mark.parametrize("op_name", OPS)
def test_unknown_backend_in_environment(monkeypatch, op_name):
    monkeypatch.setenv(registry.ENV_VAR, "nope")
    with pytest.raises(BackendError, match=registry.ENV_VAR) as info:
        call_op(op_name)
    assert "nope" in str(info.value)
    for name in BACKEND_NAMES:
        assert name in str(info.value)


def test_environment_forcing(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert forced_backend() == "torch"
    monkeypatch.setenv(registry.ENV_VAR, " auto ")
    assert forced_backend() is None
    monkeypatch.setenv(registry.ENV_VAR, "")
    assert forced_backend() is None


def test_use_backend_overrides_environment(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "nope")
    with use_backend("torch"):
        call_op("masked_linear")
    with use_backend("auto"):  # "auto" lifts the environment's forcing too
        assert forced_backend() is None
        call_op("masked_linear")


@pytest.mark.parametrize("op_name", OPS)
def test_forcing_a_backend_that_lacks_the_op(monkeypatch, op_name):
    monkeypatch.setattr(registry._BACKENDS["torch"], "ops", {})
    with use_backend("torch"):
        with pytest.raises(BackendError) as info:
            call_op(op_name)
    message = str(info.value)
    assert "'torch'" in message and repr(op_name) in message and "does not implement" in message


@pytest.mark.parametrize("op_name", OPS)
def test_forcing_via_environment_a_backend_that_lacks_the_op(monkeypatch, op_name):
    monkeypatch.setattr(registry._BACKENDS["torch"], "ops", {})
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    with pytest.raises(BackendError, match=op_name):
        call_op(op_name)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("op_name", OPS)
def test_forcing_each_backend_either_works_or_says_why(backend, op_name):
    """Today's registry, whatever it holds: a forced backend serves the op (and agrees with the
    torch reference) or raises a BackendError naming the backend and the op - never a silent
    fallback to another backend."""
    report = backend_report()[backend]
    serves = op_name in report["ops"] and report["devices"]["cpu"]["available"]
    if serves:
        torch.manual_seed(1)
        with use_backend(backend):
            assert resolve(op_name, "cpu")[0] == backend
            out = call_op(op_name)
        torch.manual_seed(1)
        with use_backend("torch"):
            ref = call_op(op_name)
        assert_close(out, ref)
    else:
        with use_backend(backend):
            with pytest.raises(BackendError) as info:
                call_op(op_name)
        assert repr(backend) in str(info.value) and repr(op_name) in str(info.value)


@pytest.mark.parametrize("op_name", OPS)
def test_forcing_triton_on_cpu_without_interpreter(monkeypatch, op_name):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # Availability is cached per device type; start from an empty cache for this test only.
    monkeypatch.setattr(registry._BACKENDS["triton"], "_cache", {})
    # Give triton the op, so the error can only come from availability.
    monkeypatch.setitem(registry._BACKENDS["triton"].ops, op_name, lambda *a, **k: pytest.fail("ran"))
    with use_backend("triton"):
        with pytest.raises(BackendError) as info:
            call_op(op_name)
    message = str(info.value)
    assert "'triton'" in message and repr(op_name) in message and "unavailable" in message
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - the reason is then the failed import
        assert "importable" in message
    else:
        assert "TRITON_INTERPRET" in message
    # Without forcing, the CPU call still works (triton is never an automatic CPU choice).
    call_op(op_name)


def test_triton_probe_reasons(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry._probe_triton("cpu") == (True, "")
    assert registry._probe_triton("cuda")[0] is False
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = registry._probe_triton("cpu")
    assert not ok and "TRITON_INTERPRET" in reason
    ok, reason = registry._probe_triton("mps")
    assert not ok and "mps" in reason


def test_nested_use_backend_restores():
    assert forced_backend() is None
    with use_backend("torch"):
        assert forced_backend() == "torch"
        with use_backend("triton"):
            assert forced_backend() == "triton"
            with use_backend("auto"):
                assert forced_backend() is None
                with use_backend("cpp"):
                    assert forced_backend() == "cpp"
                assert forced_backend() is None
            assert forced_backend() == "triton"
        assert forced_backend() == "torch"
    assert forced_backend() is None


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with use_backend("triton"):
            with use_backend("cpp"):
                raise KeyError("boom")
    assert forced_backend() is None


@pytest.mark.parametrize("op_name", OPS)
def test_auto_inside_a_forced_block_lifts_forcing(monkeypatch, op_name):
    monkeypatch.setattr(registry._BACKENDS["triton"], "ops", {})  # triton can serve nothing
    with use_backend("triton"):
        with pytest.raises(BackendError):
            call_op(op_name)
        with use_backend("auto"):
            call_op(op_name)
            assert resolve(op_name, "cpu")[0] != "triton"
        with pytest.raises(BackendError):
            call_op(op_name)


def test_forcing_is_per_thread():
    seen = {}

    def worker():
        seen["forced"] = forced_backend()
        seen["result"] = call_op("masked_linear")

    with use_backend("triton"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert seen["forced"] is None and seen["result"] is not None


def test_no_backend_for_unknown_op():
    with pytest.raises(BackendError, match="no_such_op"):
        resolve("no_such_op", "cpu")


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="nope"):
        registry.register("nope", "masked_linear", lambda: None)


def test_backend_report_structure():
    report = backend_report()
    assert set(report) == set(BACKEND_NAMES)
    for entry in report.values():
        assert set(entry) == {"ops", "devices"}
        assert entry["ops"] == sorted(entry["ops"]) and all(isinstance(op, str) for op in entry["ops"])
        assert set(entry["devices"]) == {"cpu", "cuda"}
        for device in entry["devices"].values():
            assert set(device) == {"available", "reason"}
            assert isinstance(device["available"], bool) and isinstance(device["reason"], str)
            assert device["available"] or device["reason"]  # unavailable always says why
    assert set(OPS) <= set(report["torch"]["ops"])
    assert report["torch"]["devices"]["cpu"] == {"available": True, "reason": ""}
    assert report["cpp"]["devices"]["cuda"]["available"] is False
