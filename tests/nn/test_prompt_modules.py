"""Prompt modules reproduce the VPNs release modules (docs/method.md §2), written here independently."""
import pytest
import torch
from helpers import release_prompt
from tolerance import assert_close

import vpns_fast as V


@pytest.mark.parametrize("out,in_size", [(32, 32), (32, 24), (17, 10)])
@pytest.mark.parametrize("kind", ["pad", "fix", "random", "expansive"])
def test_module_matches_release(kind, out, in_size):
    prompt = V.build_prompt(kind, out, in_size, size=4)
    with torch.no_grad():
        prompt.program.normal_(0, 2)  # large values so the clamp matters
    x = torch.rand(3, 3, in_size, in_size)
    y = prompt(x)
    corner = prompt.last_offset if kind == "random" else (0, 0)
    ref = release_prompt(x, prompt.program.detach(), kind, pad=4, mask_size=4, row=corner[0], col=corner[1],
                         dtype=torch.float32)
    assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert y.shape == (3, 3, out, out)


def test_program_gradient_only_in_region():
    prompt = V.PadPrompt(32, 32, pad=4)
    prompt(torch.rand(2, 3, 32, 32)).square().sum().backward()
    grad = prompt.program.grad
    assert grad[:, 4:28, 4:28].abs().sum() == 0
    assert (grad[:, :4].abs() > 0).any()


def test_uint8_images_equal_float_images():
    prompt = V.PadPrompt(16, 12, pad=3)
    x8 = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    assert_close(prompt(x8), prompt(x8.float() / 255))


def test_learnable_entry_counts_match_spec():
    assert V.PadPrompt(224, 224, 16).num_learnable() == 39_936  # docs/method.md §2: 3(4p*out - 4p^2)
    assert V.FixPrompt(224, 224, 30).num_learnable() == 3 * 30 * 30
    assert V.ExpansivePrompt(224, 160).num_learnable() == 3 * (224 ** 2 - 160 ** 2)


def test_random_prompt_offsets_in_release_range_and_reproducible():
    prompt = V.RandomPrompt(12, 12, mask_size=4)
    x = torch.rand(1, 3, 12, 12)
    torch.manual_seed(5)
    first = [(prompt(x), prompt.last_offset)[1] for _ in range(50)]
    assert all(0 <= r < 8 and 0 <= c < 8 for r, c in first)
    assert len(set(first)) > 5  # it moves
    torch.manual_seed(5)
    assert [(prompt(x), prompt.last_offset)[1] for _ in range(50)] == first


@pytest.mark.parametrize("make,match", [
    (lambda: V.PadPrompt(32, 32, pad=16), "pad must be"),
    (lambda: V.PadPrompt(32, 32, pad=0), "pad must be"),
    (lambda: V.PadPrompt(32, 40, pad=4), "in_size"),
    (lambda: V.FixPrompt(32, 32, mask_size=33), "mask_size"),
    (lambda: V.RandomPrompt(32, 32, mask_size=32), "mask_size"),
    (lambda: V.build_prompt("nope", 32), "prompt kind"),
    (lambda: V.PadPrompt(32, 32, pad=4, mean=(0.5,)), "mean and std"),
])
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_image_size_must_match_prompt():
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 24, 24\)"):
        V.PadPrompt(32, 24, pad=4)(torch.rand(1, 3, 32, 32))
