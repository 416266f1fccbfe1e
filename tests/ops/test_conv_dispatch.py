"""The measured masked-conv dispatch (``vpns_fast.ops.conv_dispatch``): table keys, the on-disk
table (atomic, merged, damaged files kept and reported), the choice per call, and ``tune``.

Candidates and timers are replaced by fakes: what is tested is the bookkeeping; which
implementation is faster is a GPU measurement (``vpns tune``), not a test.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers import TRITON_DEVICE
from tolerance import assert_close
from torch import nn

from vpns_fast import ops
from vpns_fast.kernels._triton import HAS_TRITON
from vpns_fast.kernels.masked import masked_conv2d_ref
from vpns_fast.ops import conv_dispatch as cd
from vpns_fast.pruning.masking import set_density, sparsify
from vpns_fast.pruning.tuning import tune


@pytest.fixture
def table_path(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    monkeypatch.setenv("VPNS_FAST_CONV_TABLE", str(path))
    monkeypatch.delenv("VPNS_FAST_CONV_AUTOTUNE", raising=False)
    monkeypatch.setattr(cd, "_TABLES", {})
    return path


class FakeCandidates:
    """Two candidates that record their calls and compute the reference result."""

    def __init__(self, monkeypatch, refuse_igemm=False):
        self.calls = []

        def make(name):
            def run(x, weight, scores, threshold, bias, stride, padding, dilation, groups):
                self.calls.append((name, weight))
                if name == "igemm" and refuse_igemm:
                    raise ValueError("groups must be 1")
                return masked_conv2d_ref(x, weight, scores, threshold, bias, stride, padding, dilation, groups)
            return run

        monkeypatch.setattr(cd, "candidates", lambda: {"igemm": make("igemm"), "cudnn": make("cudnn")})


def conv_args(channels_last=False, dtype=torch.float32, device="cpu"):
    x = torch.randn(2, 3, 6, 6, dtype=dtype, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, dtype=dtype, device=device)
    return x, w, torch.randn_like(w), torch.tensor(0.5, device=device), None, 1, 1, 1, 1


def key_of(args, grads=(False, False, False)):
    x, w, s, _, bias, stride, padding, dilation, groups = args
    return cd.call_key(x, w, s, bias, stride, padding, dilation, groups, grads)


def test_keys_separate_what_changes_speed():
    base = key_of(conv_args())
    assert json.loads(base)["layout"] == "nchw" and json.loads(base)["mode"] == "infer"
    assert key_of(conv_args()) == base
    assert key_of(conv_args(channels_last=True)) != base
    assert key_of(conv_args(dtype=torch.float64)) != base
    assert key_of(conv_args(), grads=cd.GRADS["search"]) != key_of(conv_args(), grads=cd.GRADS["finetune"]) != base
    x, w, s, *rest = conv_args()
    assert key_of((x, w, s.double(), *rest)) != base  # the scores' dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert json.loads(key_of(conv_args()))["autocast"] == "bfloat16"


def test_keys_follow_tf32_set_through_the_fp32_precision_api():
    """TF32 changes the speed of both candidates, so it is in the key. Setting conv precision the
    new way makes torch's legacy ``cudnn.allow_tf32`` getter raise (conv and RNN flags differ); the
    key reads the conv flag itself. (Only the new API here: mixing both in one process is what
    makes the legacy getter raise.)"""
    conv = torch.backends.cudnn.conv
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API")
    previous = conv.fp32_precision
    try:
        conv.fp32_precision = "ieee"
        assert json.loads(key_of(conv_args()))["tf32"] is False
        conv.fp32_precision = "tf32"
        assert json.loads(key_of(conv_args()))["tf32"] is True
    finally:
        conv.fp32_precision = previous


def test_record_picks_the_faster_and_ignores_refusals(table_path):
    table = cd.DispatchTable(table_path)
    assert table.record("dev", "k1", {"igemm": 1.0, "cudnn": 2.0}) == "igemm"
    assert table.record("dev", "k2", {"igemm": 3.0, "cudnn": 2.0}) == "cudnn"
    assert table.record("dev", "k3", {"igemm": 2.0, "cudnn": 2.0}) == "cudnn"  # a tie keeps cudnn
    assert table.record("dev", "k4", {"igemm": float("inf"), "cudnn": 5.0}) == "cudnn"
    with pytest.raises(ValueError, match="no candidate ran"):
        table.record("dev", "k5", {"igemm": float("inf")})
    assert table.lookup("dev", "k1") == "igemm" and table.lookup("other", "k1") is None


def test_save_round_trips_and_merges(table_path):
    first = cd.DispatchTable(table_path)
    first.record("dev", "a", {"igemm": 1.0, "cudnn": 2.0})
    first.save()
    second = cd.DispatchTable(table_path)  # another process, say
    second.record("dev", "b", {"igemm": 3.0, "cudnn": 2.0})
    first.record("dev", "c", {"igemm": 1.0, "cudnn": 2.0})
    first.save()
    second.save()
    merged = cd.DispatchTable(table_path)
    assert {k: merged.lookup("dev", k) for k in "abc"} == {"a": "igemm", "b": "cudnn", "c": "igemm"}
    assert json.loads(table_path.read_text())["version"] == cd.TABLE_VERSION


def test_concurrent_saves_are_serialised_and_keep_both_entries(table_path, monkeypatch):
    """A second saver waits while the first is between reading and replacing the file (it holds
    ``<table>.lock``), so neither drops the other's entry."""
    import threading

    first, second = cd.DispatchTable(table_path), cd.DispatchTable(table_path)
    first.record("dev", "a", {"igemm": 1.0, "cudnn": 2.0})
    second.record("dev", "b", {"igemm": 3.0, "cudnn": 2.0})
    cd.DispatchTable(table_path).save()  # the file exists, so both savers read it
    first_is_reading, let_first_go = threading.Event(), threading.Event()
    read = cd.DispatchTable._read

    def slow_read(path):
        sections = read(path)
        if threading.current_thread().name == "first":
            first_is_reading.set()
            assert let_first_go.wait(10)
        return sections

    monkeypatch.setattr(cd.DispatchTable, "_read", staticmethod(slow_read))
    threads = [threading.Thread(target=first.save, name="first"), threading.Thread(target=second.save, name="second")]
    threads[0].start()
    assert first_is_reading.wait(10)
    threads[1].start()
    threads[1].join(0.5)
    second_waited = threads[1].is_alive()
    let_first_go.set()
    for thread in threads:
        thread.join(10)
    assert second_waited  # blocked on the lock while the first saver was mid-merge
    merged = cd.DispatchTable(table_path)
    assert (merged.lookup("dev", "a"), merged.lookup("dev", "b")) == ("igemm", "cudnn")


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable"),
    ('{"format": "something else"}', "not a vpns_fast conv dispatch table"),
    ('{"format": "vpns_fast.conv_dispatch", "version": 99, "sections": {}}', "version 99"),
    ('{"format": "vpns_fast.conv_dispatch", "version": 1, "sections": {"d": {"k": {"choice": "x"}}}}', "damaged"),
])
def test_a_bad_table_is_reported_kept_and_ignored(table_path, content, message):
    table_path.write_text(content)
    with pytest.warns(UserWarning, match=message):
        table = cd.DispatchTable(table_path)
    assert table.lookup("d", "k") is None
    table.record("d", "k", {"igemm": 1.0, "cudnn": 2.0})
    with pytest.raises(cd.DispatchTableError, match="not replacing"):
        table.save()
    assert table_path.read_text() == content


def test_choose_uses_the_table_then_the_default(table_path, monkeypatch):
    args = conv_args()
    assert cd.choose(*args) == "cudnn"  # nothing measured
    table = cd.table()
    table.record(cd.device_section(args[0].device), key_of(args), {"igemm": 1.0, "cudnn": 2.0})
    assert cd.choose(*args) == "igemm"
    assert not table_path.exists()  # lookups never write


def test_autotune_measures_once_and_saves(table_path, monkeypatch):
    monkeypatch.setenv("VPNS_FAST_CONV_AUTOTUNE", "1")
    measured = []
    monkeypatch.setattr(cd, "measure", lambda *a, **k: measured.append(1) or {"igemm": 1.0, "cudnn": 4.0})
    args = conv_args()
    assert cd.choose(*args) == "igemm" and cd.choose(*args) == "igemm"
    assert len(measured) == 1
    saved = json.loads(table_path.read_text())["sections"]
    assert list(saved.values())[0][key_of(args)]["ms"] == {"igemm": 1.0, "cudnn": 4.0}


def test_measure_times_each_candidate_and_marks_refusals(monkeypatch):
    fakes = FakeCandidates(monkeypatch, refuse_igemm=True)
    ticks = iter([7.0])
    times = cd.measure(*conv_args(), grads=(True, True, True), timer=lambda fn: (fn(), next(ticks))[1],
                       premasked=False)
    assert times == {"igemm": float("inf"), "cudnn": 7.0}
    assert [name for name, _ in fakes.calls] == ["igemm", "cudnn", "cudnn"]  # try, try, timed run


def test_measure_times_cudnn_on_a_premasked_weight_by_default(monkeypatch):
    """Under model-level mask batching cuDNN convolves an already masked weight: the mask launch
    and the STE are shared by all layers, so the cudnn candidate is timed without them."""
    fakes = FakeCandidates(monkeypatch)
    times = cd.measure(*conv_args(), grads=cd.GRADS["search"], timer=lambda fn: (fn(), 3.0)[1])
    assert times == {"igemm": 3.0, "cudnn": 3.0}
    assert {name for name, _ in fakes.calls} == {"igemm"}  # the fake cudnn (mask + conv) never ran


def test_dispatch_runs_the_chosen_candidate(table_path, monkeypatch):
    fakes = FakeCandidates(monkeypatch)
    args = conv_args()
    cd.masked_conv2d_dispatch(*args)
    cd.table().record(cd.device_section(args[0].device), key_of(args), {"igemm": 1.0, "cudnn": 2.0})
    cd.masked_conv2d_dispatch(*args)
    assert [name for name, _ in fakes.calls] == ["cudnn", "igemm"]


def test_precomputed_masked_weight_is_used_unless_igemm_is_chosen(table_path, monkeypatch):
    fakes = FakeCandidates(monkeypatch)
    x, w, s, t, *_ = conv_args(device=TRITON_DEVICE)  # the triton backend: CUDA, else the interpreter
    w_eff = w * (s.abs() > t)
    with ops.use_backend("triton"):
        out = ops.masked_conv2d(x, w, s, t, None, 1, 1, masked_weight=w_eff)
        assert fakes.calls == []  # convolved directly: no second masking
        assert_close(out, torch.nn.functional.conv2d(x, w_eff, None, 1, 1))
        cd.table().record(cd.device_section(x.device), key_of((x, w, s, t, None, 1, 1, 1, 1)),
                          {"igemm": 1.0, "cudnn": 2.0})
        original_choose, choices = cd.choose, []
        monkeypatch.setattr(cd, "choose", lambda *a: choices.append(original_choose(*a)) or choices[-1])
        ops.masked_conv2d(x, w, s, t, None, 1, 1, masked_weight=w_eff)
    assert [name for name, _ in fakes.calls] == ["igemm"] and fakes.calls[0][1] is w
    assert choices == ["igemm"]  # one decision per call on the hot path


def test_tune_records_every_distinct_conv(table_path, monkeypatch):
    FakeCandidates(monkeypatch)
    model = sparsify(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                   nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 36, 2)))
    set_density(model, 0.5)
    rows = tune(model, torch.randn(2, 3, 6, 6), "search", timer=lambda fn: (fn(), 1.0)[1])
    assert [r["layer"] for r in rows] == ["0", "2"]  # layer 4 has layer 2's shape
    assert all(r["choice"] == "cudnn" for r in rows)  # a tie keeps cudnn
    saved = json.loads(table_path.read_text())["sections"]
    assert len(list(saved.values())[0]) == 2
    with pytest.raises(ValueError, match="no MaskedConv2d"):
        tune(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))


def test_vpns_tune_writes_the_table(table_path, monkeypatch, capsys):
    from vpns_fast.cli import main

    FakeCandidates(monkeypatch)
    monkeypatch.setattr(cd, "_wall_timer", lambda fn: (fn(), 1.0)[1])
    with pytest.warns(UserWarning, match="Triton interpreter"):
        assert main(["tune", "--model", "small_resnet", "--input-size", "16", "--batch", "2", "--stage", "all",
                     "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["table"] == str(table_path) and {json.loads(r["key"])["mode"] for r in out["rows"]} == {"train", "infer"}
    saved = list(json.loads(table_path.read_text())["sections"].values())[0]
    assert len(saved) == len(out["rows"]) > 0


def test_vpns_tune_says_why_a_candidate_has_no_time(table_path, monkeypatch, capsys):
    """A candidate that refuses the call is printed as refused, with the reasons, not as inf."""
    from vpns_fast.cli import main

    FakeCandidates(monkeypatch, refuse_igemm=True)
    monkeypatch.setattr(cd, "_wall_timer", lambda fn: (fn(), 1.0)[1])
    with pytest.warns(UserWarning, match="Triton interpreter"):
        assert main(["tune", "--model", "small_resnet", "--input-size", "16", "--batch", "2", "--stage", "infer",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert " inf " not in out and "  refused" in out and "refused: the candidate does not take this call" in out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_igemm_candidate_matches_the_reference_and_follows_autocast(ieee_fp32):
    """The real igemm candidate (on CUDA, else interpreted on a CPU): plain, and under bf16 autocast
    where the Triton op needs x and weight cast to one dtype as autocast casts F.conv2d's operands.
    float32 at float32 precision: TF32 (cuDNN's default for convs, which the kernel follows) rounds
    differently in the two and differed by 3e-3 relative on the H200."""
    igemm = cd.candidates()["igemm"]
    x, w, s, t, *rest = conv_args(device=TRITON_DEVICE)
    assert_close(igemm(x, w, s, t, *rest), masked_conv2d_ref(x, w, s, t, *rest), rtol=1e-4, atol=1e-4)
    with torch.autocast(TRITON_DEVICE, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="needs torch.bfloat16 weights"):  # fp32 master weights
            igemm(x, w, s, t, *rest)
        w16 = w.to(torch.bfloat16).requires_grad_()
        out = igemm(x, w16, s, t, *rest)  # x is cast as autocast casts F.conv2d's input
        expected = masked_conv2d_ref(x, w16, s, t, *rest)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert w16.grad is not None and w16.grad.dtype == torch.bfloat16


def test_choose_is_fixed_in_deterministic_mode_and_survives_an_unwritable_table(table_path, monkeypatch):
    args = conv_args()
    cd.table().record(cd.device_section(args[0].device), key_of(args), {"igemm": 1.0, "cudnn": 2.0})
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert cd.choose(*args) == "cudnn"
    monkeypatch.undo()
    monkeypatch.setenv("VPNS_FAST_CONV_TABLE", "/proc/no_such_folder/table.json")
    monkeypatch.setenv("VPNS_FAST_CONV_AUTOTUNE", "1")
    monkeypatch.setattr(cd, "_TABLES", {})
    monkeypatch.setattr(cd, "measure", lambda *a, **k: {"igemm": 1.0, "cudnn": 4.0})
    with pytest.warns(UserWarning, match="not saved"):
        assert cd.choose(*args) == "igemm"  # the forward goes on; the entry lives in memory


def test_a_file_system_without_locks_still_gets_the_table(table_path, monkeypatch):
    """flock failing (ENOLCK on NFS without a lock daemon) costs the lock, with a warning, never
    the measured entries."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    table = cd.DispatchTable(table_path)
    table.record("dev", "a", {"igemm": 1.0, "cudnn": 2.0})
    with pytest.warns(UserWarning, match="no lock .* writing it unlocked"):
        table.save()
    assert cd.DispatchTable(table_path).lookup("dev", "a") == "igemm"


def test_default_table_is_per_user_and_follows_home(monkeypatch, tmp_path):
    """The per-user default path is cached (it is looked up on every conv call), by $HOME."""
    monkeypatch.delenv("VPNS_FAST_CONV_TABLE")
    for home in (tmp_path / "a", tmp_path / "b"):
        monkeypatch.setenv("HOME", str(home))
        assert cd.default_table_path() == str(home / ".cache" / "vpns_fast" / "conv_dispatch.json")
