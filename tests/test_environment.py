"""The environment description and device resolution shared by the CLI, trainer, eval and deploy."""
import pytest
import torch

from vpns_fast.environment import describe, resolve_device, torch_threads


def test_auto_picks_cuda_only_when_available():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["mps", "xpu", "meta", "gpu", "cuda:x"])
def test_devices_the_package_cannot_run_on_are_refused_by_name(name):
    with pytest.raises(ValueError, match=f"device: expected auto, cpu, cuda or cuda:N, got '{name}'"):
        resolve_device(name)


def test_a_tensor_for_the_device_names_the_argument_and_the_likely_mistake():
    # vf.deploy(model, example) put the example where the device goes; torch.device's own TypeError listed overloads
    with pytest.raises(TypeError, match=r"device: expected .*got Tensor \(an example input\? pass its shape as "
                                        r"example_input_size="):
        resolve_device(torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="device: expected .*got NoneType$"):
        resolve_device(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda:1' was asked for but CUDA is not available"):
        resolve_device("cuda:1")


def test_describe_names_versions_and_backends():
    info = describe()
    assert info["torch"] == torch.__version__ and info["devices"][0] == "cpu"
    assert set(info["backends"]) == {"torch", "triton", "cpp"}


def test_torch_threads_sets_the_count_inside_and_gives_it_back_even_after_an_error():
    before = torch.get_num_threads()
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before


def test_a_missing_extension_in_a_source_checkout_is_told_as_such(monkeypatch):
    """An installed wheel is hidden by the checkout Python imports first; "reinstall without VPNS_FAST_BUILD_EXT=0"
    had sent a user whose installed copy had the extension the wrong way (an outside review)."""
    import sys

    import vpns_fast
    from vpns_fast import _extension

    monkeypatch.setitem(sys.modules, "vpns_fast._C", None)  # its import fails, as where it was never built
    monkeypatch.delattr(vpns_fast, "_C", raising=False)  # (once loaded, `from vpns_fast import _C` reads this)
    monkeypatch.setattr(_extension, "_tried", False)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_reason", "")
    monkeypatch.setattr(_extension, "_in_source_tree", lambda: True)  # as from this checkout, wherever tests run
    available, reason = _extension.status()
    assert not available
    assert "is not built in the source tree vpns_fast was imported from" in reason
    assert "build it there" in reason and "run from another folder" in reason
    monkeypatch.setattr(_extension, "_tried", False)
    monkeypatch.setattr(_extension, "_in_source_tree", lambda: False)
    assert "reinstall without VPNS_FAST_BUILD_EXT=0" in _extension.status()[1]
