"""ONNX export through the torch.export-based exporter (onnxscript), the TorchScript fallback with
its reason warned and recorded, and parity of the graph under onnxruntime with the deployed module."""
import json
import os
import sys
import warnings

import pytest
import torch
from test_export import MAPPING, assert_close, export_masked_vit, make_checkpoint

from vpns_fast.deploy.export import ONNX_OPSET, OnnxExporterFallbackWarning, export
from vpns_fast.deploy.runtime import deploy
from vpns_fast.nn.prompts import normalize

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install vpns_fast[onnx])")
needs_onnxscript = pytest.mark.skipif(__import__("importlib").util.find_spec("onnxscript") is None,
                                      reason="onnxscript not installed (pip install vpns_fast[onnx])")


def _onnxruntime():
    return pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install vpns_fast[test])")


def _run(ort, path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def _file_meta(path) -> dict:
    graph = onnx.load(str(path))
    return json.loads({p.key: p.value for p in graph.metadata_props}["vpns_fast.meta"])


@needs_onnxscript
def test_export_uses_torch_export_and_onnxruntime_matches_the_deployed_module(tmp_path):
    """Prompt + channel-pruned network + label mapping: the new exporter writes one self-contained
    opset-18 file (no external .data), and onnxruntime's logits equal deploy()'s at batch 1 and 3."""
    ort = _onnxruntime()
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", granularity="channel", prompt=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OnnxExporterFallbackWarning)
        meta = export(ckpt, "onnx", tmp_path / "m.onnx")
    assert meta["exporter"] == "torch.export" and meta["exporter_fallback_reason"] is None
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert {(o.domain, o.version) for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {("", ONNX_OPSET)}
    file_meta = _file_meta(tmp_path / "m.onnx")
    assert file_meta["exporter"] == "torch.export" and file_meta["label_mapping"] == MAPPING.tolist()
    deployed = deploy(ckpt, policy="dense")  # parity, not speed: no per-layer timing
    for batch in (1, 3):  # the batch axis is dynamic
        x = torch.rand(batch, 3, size, size)
        out = _run(ort, tmp_path / "m.onnx", x)
        assert out.shape == (batch, len(MAPPING))
        with torch.no_grad():
            assert_close(out, deployed(x))
            assert_close(out, reference(x))


@needs_onnxscript
def test_attention_model_goes_through_torch_export(tmp_path):
    """A ViT (nn.MultiheadAttention) exports through the new path with the MHA fast path off, and
    restored afterwards; onnxruntime matches the folded torch model."""
    ort = _onnxruntime()
    model, meta = export_masked_vit(tmp_path)
    assert meta["exporter"] == "torch.export"
    assert torch.backends.mha.get_fastpath_enabled()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(_run(ort, tmp_path / "vit.onnx", x), model(normalize(x)))


class _DynamoBroke(RuntimeError):
    pass


def _break_dynamo(monkeypatch):
    real = torch.onnx.export

    def export_without_dynamo(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise _DynamoBroke("no translation for aten::made_up\nsecond line of the message")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_without_dynamo)


@pytest.mark.parametrize("cause,reason", [
    ("dynamo fails", "_DynamoBroke: no translation for aten::made_up"),
    ("no onnxscript", "onnxscript is not installed"),
    ("opset 17", "opset 17 requested"),
])
def test_fallback_to_torchscript_warns_once_and_records_the_reason(tmp_path, monkeypatch, cause, reason):
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", granularity="channel", prompt=False)
    kwargs = {}
    if cause == "dynamo fails":
        _break_dynamo(monkeypatch)
    elif cause == "no onnxscript":
        monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript -> ImportError
    else:
        kwargs["opset"] = 17
    with pytest.warns(OnnxExporterFallbackWarning) as record:
        meta = export(ckpt, "onnx", tmp_path / "m.onnx", **kwargs)
    messages = [str(w.message) for w in record if issubclass(w.category, OnnxExporterFallbackWarning)]
    assert len(messages) == 1 and reason in messages[0] and "\n" not in messages[0], messages
    assert "second line" not in messages[0]
    assert meta["exporter"] == "torchscript" and reason in meta["exporter_fallback_reason"]
    file_meta = _file_meta(tmp_path / "m.onnx")
    assert file_meta["exporter"] == "torchscript" and reason in file_meta["exporter_fallback_reason"]
    graph = onnx.load(str(tmp_path / "m.onnx"))
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {kwargs.get("opset", ONNX_OPSET)}
    try:
        import onnxruntime as ort
    except ImportError:
        return
    x = torch.rand(3, 3, size, size)
    with torch.no_grad():
        assert_close(_run(ort, tmp_path / "m.onnx", x), reference(x))


def test_bad_opset_is_a_one_line_error(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "m.pt", prompt=False)
    for bad in ("18", 5, True):
        with pytest.raises(ValueError, match=r"opset must be an integer >= 7"):
            export(ckpt, "onnx", tmp_path / "m.onnx", opset=bad)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_prints_the_fallback_reason_on_stderr(tmp_path, monkeypatch, capsys):
    """`vpns export --format onnx` does not swallow the warning: displayed the way a plain Python
    process displays warnings (pytest records them instead), the reason is one line on stderr, and
    the file is still written. In process: a fresh interpreter would add ~4 s of CPU to the suite."""
    from vpns_fast.cli import main

    ckpt, _, _ = make_checkpoint(tmp_path / "m.pt", prompt=False)
    _break_dynamo(monkeypatch)
    out = tmp_path / "m.onnx"

    def show(message, category, filename, lineno, file=None, line=None):  # the default display, to stderr
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        monkeypatch.setattr(warnings, "showwarning", show)
        assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out} (onnx)" in captured.out
    lines = [line for line in captured.err.splitlines() if "OnnxExporterFallbackWarning" in line]
    assert len(lines) == 1, captured.err
    assert "fell back to the TorchScript exporter: _DynamoBroke: no translation for aten::made_up" in lines[0]
    assert "second line" not in captured.err and "Constant folding" not in captured.err  # not buried in chatter
    assert _file_meta(out)["exporter"] == "torchscript"
