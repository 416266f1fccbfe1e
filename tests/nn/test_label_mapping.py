"""Label mapping: counts, greedy assignment (ties included), LabelMapping fit / FLM / ILM."""
import pytest
import torch
from torch import nn

from vpns_fast.nn.label_mapping import LabelMapping, greedy_label_mapping, prediction_counts


def test_prediction_counts():
    predictions = torch.tensor([0, 2, 2, 1, 2])
    targets = torch.tensor([1, 1, 0, 0, 1])
    counts = prediction_counts(predictions, targets, num_source=3, num_target=2)
    expected = torch.tensor([[0, 1], [1, 0], [1, 2]])
    assert counts.dtype == torch.long and torch.equal(counts, expected)
    with pytest.raises(ValueError):
        prediction_counts(torch.tensor([3]), torch.tensor([0]), 3, 2)
    with pytest.raises(ValueError):
        prediction_counts(torch.tensor([0]), torch.tensor([2]), 3, 2)


def test_greedy_hand_computed():
    counts = torch.tensor(
        [
            [5, 1, 0],
            [6, 4, 0],
            [0, 4, 3],
            [0, 0, 3],
        ]
    )
    # 6 -> (1,0); rows 1 and column 0 gone. Remaining max 4 at (2,1); then column 2: rows 0 and 3
    # hold 0 and 3 -> (3,2).
    assert greedy_label_mapping(counts).tolist() == [1, 2, 3]


def test_greedy_ties_take_first_in_row_major_order():
    counts = torch.tensor(
        [
            [0, 2, 2],
            [2, 0, 0],
            [2, 2, 0],
        ]
    )
    # All 2s tie: (0,1) first; then remaining rows 1,2 x cols 0,2: (1,0) before (2,0); then (2,2).
    assert greedy_label_mapping(counts).tolist() == [1, 0, 2]
    # All zero: identity by row-major order.
    assert greedy_label_mapping(torch.zeros(4, 3, dtype=torch.long)).tolist() == [0, 1, 2]


def _greedy_brute_force(counts):
    """Straightforward reimplementation: scan for the maximum with explicit loops."""
    rows, cols = len(counts), len(counts[0])
    used_rows, used_cols, mapping = set(), set(), [None] * cols
    for _ in range(cols):
        best = None
        for i in range(rows):
            if i in used_rows:
                continue
            for j in range(cols):
                if j in used_cols:
                    continue
                if best is None or counts[i][j] > counts[best[0]][best[1]]:
                    best = (i, j)
        mapping[best[1]] = best[0]
        used_rows.add(best[0])
        used_cols.add(best[1])
    return mapping


def test_greedy_matches_brute_force_on_random_matrices():
    generator = torch.Generator().manual_seed(123)
    for _ in range(200):
        num_target = int(torch.randint(1, 7, (1,), generator=generator))
        num_source = num_target + int(torch.randint(0, 5, (1,), generator=generator))
        # Few distinct values so ties are common.
        counts = torch.randint(0, 4, (num_source, num_target), generator=generator)
        mapping = greedy_label_mapping(counts)
        assert mapping.tolist() == _greedy_brute_force(counts.tolist()), counts
        assert len(set(mapping.tolist())) == num_target


def test_greedy_needs_enough_source_classes():
    with pytest.raises(ValueError, match="at least as many source classes"):
        greedy_label_mapping(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        LabelMapping(num_target=3, num_source=2)


def test_forward_indexing_and_modes():
    logits = torch.arange(12.0).reshape(2, 6)
    mapping = LabelMapping(num_target=3)
    assert torch.equal(mapping(logits), logits[:, :3])  # identity until fitted
    mapping.set_mapping(torch.tensor([5, 0, 2]))
    assert torch.equal(mapping(logits), logits[:, [5, 0, 2]])
    assert list(mapping.state_dict()) == ["mapping", "fitted"]

    passthrough = LabelMapping(num_target=3, mode="none")
    assert passthrough(logits) is logits
    with pytest.raises(ValueError):
        LabelMapping(num_target=3, mode="blm")


class PermutationModel(nn.Module):
    """Reads the target class written in pixel (0,0,0) and predicts source class perm[class]."""

    def __init__(self, permutation, num_source):
        super().__init__()
        self.permutation = torch.as_tensor(permutation)
        self.num_source = num_source
        self.seen_training = []
        self.seen_dtypes = []

    def forward(self, x):
        self.seen_training.append(self.training)
        self.seen_dtypes.append(x.dtype)
        classes = x[:, 0, 0, 0].round().long()
        return nn.functional.one_hot(self.permutation[classes], self.num_source).float()


def _loader(num_target=4, per_class=3, batch_size=5):
    labels = torch.arange(num_target).repeat_interleave(per_class)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()
    starts = range(0, len(labels), batch_size)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in starts]


def test_fit_recovers_permutation_and_restores_mode():
    model = PermutationModel([7, 2, 9, 0], num_source=10).train()
    mapping = LabelMapping(num_target=4)
    prompt_calls = []

    def prompt(images):
        prompt_calls.append(images.shape[0])
        return images

    mapping.fit(model, _loader(), prompt=prompt)
    assert mapping.mapping.tolist() == [7, 2, 9, 0]
    assert bool(mapping.fitted) and int(mapping.counts.sum()) == 12
    assert sum(prompt_calls) == 12
    assert model.seen_training and not any(model.seen_training)  # eval during fit
    assert model.training  # restored afterwards


def test_fit_converts_uint8_without_prompt():
    labels = torch.tensor([0, 1, 2, 3])
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)

    class FirstPixelIsFloat(nn.Module):
        def forward(self, x):
            assert x.dtype == torch.float32 and float(x.max()) <= 1.0
            return torch.eye(6)[: x.shape[0]]

    mapping = LabelMapping(num_target=4).fit(FirstPixelIsFloat(), [(images, labels)])
    assert mapping.mapping.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="expected 8"):
        LabelMapping(num_target=4, num_source=8).fit(FirstPixelIsFloat(), [(images, labels)])


def test_ilm_recomputes_and_flm_keeps_first_mapping():
    loader = _loader()
    model = PermutationModel([7, 2, 9, 0], num_source=10)
    flm, ilm, none = (LabelMapping(4, mode=mode) for mode in ("flm", "ilm", "none"))
    for label_mapping in (flm, ilm, none):
        label_mapping.on_epoch_start(model, loader, None, "cpu")
    assert flm.mapping.tolist() == ilm.mapping.tolist() == [7, 2, 9, 0]
    assert not bool(none.fitted)

    model.permutation = torch.tensor([1, 3, 5, 8])  # the network's predictions drift
    assert flm.on_epoch_start(model, loader, None, "cpu") is False
    assert ilm.on_epoch_start(model, loader, None, "cpu") is True
    assert flm.mapping.tolist() == [7, 2, 9, 0]
    assert ilm.mapping.tolist() == [1, 3, 5, 8]

    # A restored FLM mapping counts as fitted and is not recomputed.
    restored = LabelMapping(4, mode="flm")
    restored.load_state_dict(flm.state_dict())
    assert restored.on_epoch_start(model, loader, None, "cpu") is False
    assert restored.mapping.tolist() == [7, 2, 9, 0]
