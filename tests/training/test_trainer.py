"""The two-stage trainer end to end on tiny data: results schema, resume exactness, what each
stage may change, every method's density, ILM, the output-directory rules, evaluation of a
saved checkpoint, transfer, protocols, AMP / channels_last, and the `vpns` CLI paths."""
import json
import os
import re

import numpy as np
import pytest
import torch
from helpers import tiny_config as tiny
from torch import nn

from vpns_fast import cli
from vpns_fast.errors import SettingError
from vpns_fast.models import build_model
from vpns_fast.nn.label_mapping import LabelMapping, greedy_label_mapping
from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint
from vpns_fast.pruning.masking import masked_layers, masks, sparsify
from vpns_fast.pruning.methods import METHODS, imp_densities
from vpns_fast.training import trainer as trainer_module
from vpns_fast.training.config import TrainConfig
from vpns_fast.training.evaluation import evaluate_checkpoint
from vpns_fast.training.phases import fresh_model, plan_phases
from vpns_fast.training.results import headline_acc, results_table
from vpns_fast.training.run_files import refuse_existing_run
from vpns_fast.training.trainer import TwoStageTrainer, resume

RUN_KEYS = ("method", "density", "actual_density", "test_acc", "test_acc_prompt", "selected_epoch",
            "last_test_acc", "params_kept", "flops_kept", "wall_s", "images_per_s")
TIMING_KEYS = ("wall_s", "train_s", "images_per_s")




def run_dir(out, method, density):
    return os.path.join(str(out), "runs", f"{method}_d{density:g}")


def read_results(out) -> dict:
    with open(os.path.join(str(out), "results.json")) as f:
        return json.load(f)


def without_timings(runs):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in runs]


def score_masks(state_dict) -> dict[str, torch.Tensor]:
    return {k[: -len(".scores")]: state_dict[k].abs() > state_dict[k[: -len("scores")] + "threshold"]
            for k in state_dict if k.endswith(".scores")}


def assert_same_tensors(a: dict, b: dict, keys=None):
    if keys is None:
        assert sorted(a) == sorted(b)
        keys = sorted(a)
    different = [k for k in keys if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


@pytest.fixture(scope="module")
def vpns_run(tmp_path_factory):
    """One finished VPNs run (release protocol) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("vpns_run")
    trainer = TwoStageTrainer(tiny(out))
    results = trainer.run()
    return out, trainer, results


# ----------------------------------------------------------------------------- end to end, schema

def test_end_to_end_writes_results_checkpoints_and_plots(vpns_run):
    out, _, results = vpns_run
    data = read_results(out)
    assert set(data) >= {"config", "env", "runs"}
    assert data["config"]["methods"] == ["vpns"] and data["config"]["dataset"] == "synthetic"
    assert data["env"]["torch"] == torch.__version__ and data["env"]["world_size"] == 1
    assert len(data["runs"]) == 1 and without_timings(data["runs"]) == without_timings(json.loads(json.dumps(results)))
    run = data["runs"][0]
    for key in RUN_KEYS:
        assert key in run, key
    assert run["method"] == "vpns" and run["density"] == 0.5
    assert run["limit"] == 32  # a capped run says so in every row and under the table
    assert "--limit: every split capped at 32 images" in results_table(data["runs"])
    for key in ("test_acc", "test_acc_prompt", "last_test_acc", "val_acc", "val_acc_prompt"):
        assert isinstance(run[key], float) and 0.0 <= run[key] <= 100.0, key
    assert 0 < run["actual_density"] <= 1 and 0 < run["params_kept"] < run["params_total"]
    assert 0 < run["flops_kept"] < run["flops_dense"]
    assert run["wall_s"] > 0 and run["images_per_s"] > 0
    assert run["selected_by"] == "val_acc" and run["selected_epoch"] == 1
    assert [h["phase"] for h in run["history"]] == ["search", "finetune"]
    assert "test_acc" not in run["history"][0]  # the test set is only looked at in the last phase
    assert run["epochs"] == {"search": 1, "finetune": 1}
    folder = run_dir(out, "vpns", 0.5)
    for name in ("last.pt", "best.pt", "mask.pt"):
        assert os.path.isfile(os.path.join(folder, name)), name
    for name in ("accuracy_vs_sparsity.png", "curves.png", "prompt.png"):
        assert os.path.isfile(os.path.join(str(out), "plots", name)), name
    assert os.path.isfile(os.path.join(str(out), "config.json"))


def test_checkpoints_load_with_weights_only(vpns_run):
    out, _, results = vpns_run
    folder = run_dir(out, "vpns", 0.5)
    for name in ("last.pt", "best.pt", "mask.pt"):
        raw = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
        payload = load_checkpoint(os.path.join(folder, name))
        assert raw["format"] == payload["format"] == "vpns_fast.checkpoint"
        assert payload["prompt"] is not None and payload["label_mapping"] is None  # 10-class head: no mapping
        model = model_from_checkpoint(payload)
        assert len(masked_layers(model)) > 0
    last = load_checkpoint(os.path.join(folder, "last.pt"))
    assert last["meta"]["training"]["state"]["done"] is True
    assert last["meta"]["training"]["state"]["result"]["test_acc"] == results[0]["test_acc"]


# ----------------------------------------------------------------------------- the two stages

def test_stage1_changes_only_scores_and_prompt_and_stage2_keeps_the_mask(vpns_run):
    out, trainer, _ = vpns_run
    dense = trainer.dense.state
    after_search = load_checkpoint(os.path.join(run_dir(out, "vpns", 0.5), "mask.pt"))
    after_finetune = load_checkpoint(os.path.join(run_dir(out, "vpns", 0.5), "last.pt"))
    search_state, final_state = after_search["state_dict"], after_finetune["state_dict"]
    # stage 1: weights, biases and BN affine bit-identical to the dense start (running stats may move)
    frozen = [k for k in dense if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert any(k.endswith("bn1.weight") for k in frozen)
    assert_same_tensors(dense, search_state, frozen)
    dense_model = build_model("small_resnet", num_classes=10)
    dense_model.load_state_dict(dense)
    initial = sparsify(dense_model)  # the scores stage 1 starts from
    score_keys = [k for k in search_state if k.endswith(".scores")]
    assert all(not torch.equal(search_state[k], initial.state_dict()[k]) for k in score_keys)
    assert after_search["prompt"]["program"].abs().sum() > 0
    # stage 2: the mask is the one stage 1 ended with; the weights did train
    assert_same_tensors(score_masks(search_state), score_masks(final_state))
    assert_same_tensors(search_state, final_state, score_keys)
    assert any(not torch.equal(search_state[k], final_state[k]) for k in frozen)
    assert not torch.equal(after_search["prompt"]["program"], after_finetune["prompt"]["program"])


def test_imp_rounds_rewind_weights_and_keep_masks(tmp_path, monkeypatch):
    """Each IMP round after the first starts from the dense weights (rewind) with a mask that
    only removes weights from the previous round's mask, down to that round's density."""
    seen = []
    original = trainer_module.start_phase

    def spy(model, prompt, phase, dense_state, device):
        before = {k: v.clone() for k, v in masks(model).items()}
        original(model, prompt, phase, dense_state, device)
        seen.append((phase, before, {k: v.clone() for k, v in masks(model).items()},
                     {k: v.detach().clone() for k, v in model.state_dict().items()},
                     None if prompt is None else prompt.program.detach().clone(), dense_state))

    monkeypatch.setattr(trainer_module, "start_phase", spy)
    (run,) = TwoStageTrainer(tiny(tmp_path, methods=("imp+vp",), densities=(0.6,))).run()
    assert [p.density for p, *_ in seen] == imp_densities(0.6) == pytest.approx([1.0, 0.8, 0.64, 0.6])
    total = sum(m.numel() for m in seen[0][2].values())
    for index, (phase, before, after, state, program, dense) in enumerate(seen):
        kept = sum(int(m.sum()) for m in after.values())
        assert kept == total - int((1 - phase.density) * total)
        if index == 0:
            continue
        assert all(bool((after[k] <= before[k]).all()) for k in after)  # pruned weights stay pruned
        assert_same_tensors(dense, state, sorted(dense))  # weights, BN affine and statistics rewound
        assert program is not None and not program.any()  # the prompt restarts too
    assert run["actual_density"] == pytest.approx((total - int(0.4 * total)) / total, abs=0)


# ----------------------------------------------------------------------------- densities of every method

def _layer_sizes():
    return [layer.weight.numel() for _, layer in masked_layers(sparsify(build_model("small_resnet", num_classes=10)))]


@pytest.mark.slow
def test_every_method_reaches_its_density(tmp_path):
    density = 0.5
    methods = tuple(m for m in METHODS if not m.startswith("transfer"))
    runs = TwoStageTrainer(tiny(tmp_path / "all", methods=methods, densities=(density,))).run()
    sizes = _layer_sizes()
    total = sum(sizes)
    global_kept = total - int((1 - density) * total)
    layer_kept = sum(n - int((1 - density) * n) for n in sizes)  # HYDRA's default per-layer scope
    by_method = {r["method"]: r for r in runs}
    assert sorted(by_method) == sorted(methods)
    for name, run in by_method.items():
        expected = {"dense": total, "hydra": layer_kept}.get(name, global_kept)
        assert run["params_total"] == total
        assert run["params_kept"] == expected, name
        assert run["actual_density"] == expected / total, name
        assert run["density"] == (1.0 if name == "dense" else density)
        assert (run["test_acc_prompt"] is not None) == (name in ("vpns", "omp+vp", "random+vp", "imp+vp")), name
    # transfer / transfer+vp impose the masks of a finished run, exactly
    source = os.path.join(run_dir(tmp_path / "all", "vpns", density), "mask.pt")
    transferred = TwoStageTrainer(tiny(tmp_path / "transfer", methods=("transfer", "transfer+vp"), mask_from=source,
                                       finetune_epochs=1)).run()
    source_masks = score_masks(load_checkpoint(source)["state_dict"])
    for run in transferred:
        assert run["params_kept"] == global_kept and run["density"] == round(global_kept / total, 6)
        final = load_checkpoint(os.path.join(run_dir(tmp_path / "transfer", run["method"], run["density"]),
                                             "last.pt"))["state_dict"]
        assert_same_tensors(source_masks, score_masks(final))
    assert [r["test_acc_prompt"] is not None for r in transferred] == [False, True]


def test_transfer_needs_mask_from():
    with pytest.raises(ValueError, match="mask_from"):
        tiny(methods=("transfer",))


# ----------------------------------------------------------------------------- resume exactness

class Interrupted(Exception):
    pass


RESUME_SETTINGS = dict(methods=("vpns", "imp+vp"), densities=(0.7,), search_epochs=2, finetune_epochs=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, TwoStageTrainer(tiny(out, **RESUME_SETTINGS)).run()


# epochs: vpns search 1-2, finetune 3-4; imp+vp rounds (1.0, 0.8, 0.7) at 5-6, 7-8, 9-10.
# Interrupting epoch 2 resumes inside a phase (optimizer and scheduler state restored), 3 at the
# search -> finetune boundary, 7 at an IMP round boundary (prune + rewind replayed), 10 inside
# the last IMP round after the vpns run finished (that run is skipped on resume).
@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [2, 3, 7, 10])
def test_resume_after_interruption_is_bitwise_identical(tmp_path, monkeypatch, uninterrupted, fail_at):
    reference_out, reference = uninterrupted
    calls = {"n": 0}
    original = trainer_module.train_epoch

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_epoch", interrupt)
    with pytest.raises(Interrupted):
        TwoStageTrainer(tiny(tmp_path, **RESUME_SETTINGS)).run()
    monkeypatch.setattr(trainer_module, "train_epoch", original)
    torch.manual_seed(12345)  # the resumed process's RNG state must not matter
    resumed = resume(str(tmp_path), progress=False)
    assert without_timings(resumed) == without_timings(reference)
    assert without_timings(read_results(tmp_path)["runs"]) == without_timings(read_results(reference_out)["runs"])
    for method in RESUME_SETTINGS["methods"]:
        for name in ("last.pt", "best.pt", "mask.pt") if method == "vpns" else ("last.pt", "best.pt"):
            a = load_checkpoint(os.path.join(run_dir(reference_out, method, 0.7), name))
            b = load_checkpoint(os.path.join(run_dir(tmp_path, method, 0.7), name))
            assert_same_tensors(a["state_dict"], b["state_dict"])
            assert torch.equal(a["prompt"]["program"], b["prompt"]["program"])


def test_resume_of_a_finished_run_changes_nothing(vpns_run, capsys):
    out, _, results = vpns_run
    before = os.path.getmtime(os.path.join(run_dir(out, "vpns", 0.5), "last.pt"))
    capsys.readouterr()
    again = resume(str(out), progress=False)
    assert "already complete, skipped" in capsys.readouterr().out  # without bars too (it printed nothing)
    assert without_timings(again) == without_timings(results)
    assert os.path.getmtime(os.path.join(run_dir(out, "vpns", 0.5), "last.pt")) == before


def test_resume_keeps_the_recorded_progress_unless_told(vpns_run, monkeypatch):
    """A run started with --no-progress (recorded in config.json) resumes without bars; --progress / progress=True
    turn them on again."""
    out, trainer, _ = vpns_run
    recorded = trainer.config.progress
    seen = []
    monkeypatch.setattr(trainer_module.TwoStageTrainer, "run", lambda self: seen.append(self.config.progress) or [])
    resume(str(out))
    resume(str(out), progress=not recorded)
    assert cli.main(["resume", str(out)]) == 0
    assert cli.main(["resume", str(out), "--progress"]) == 0
    assert cli.main(["resume", str(out), "--no-progress"]) == 0
    assert seen == [recorded, not recorded, recorded, True, False]


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resume(str(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="nothing: no such folder"):  # it had said "has no config.json"
        resume(str(tmp_path / "nothing"))
    (tmp_path / "out.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="out.txt: is a file; expected the folder"):
        resume(str(tmp_path / "out.txt"))


# ----------------------------------------------------------------------------- output directory rules

def test_out_dir_is_refused_unless_forced(tmp_path):
    config = tiny(tmp_path, methods=("dense",), finetune_epochs=1)
    TwoStageTrainer(config).run()
    with pytest.raises(FileExistsError, match="vpns resume"):
        TwoStageTrainer(tiny(tmp_path, methods=("dense",), finetune_epochs=1)).run()
    with pytest.raises(FileExistsError, match="different config"):
        TwoStageTrainer(tiny(tmp_path, methods=("omp",))).run()
    assert read_results(tmp_path)["config"]["methods"] == ["dense"]  # nothing was touched
    runs = TwoStageTrainer(tiny(tmp_path, methods=("omp",)), force=True).run()
    assert [r["method"] for r in runs] == ["omp"]
    assert os.listdir(os.path.join(str(tmp_path), "runs")) == ["omp_d0.5"]  # the old runs are gone
    assert read_results(tmp_path)["config"]["methods"] == ["omp"]


# ----------------------------------------------------------------------------- evaluation, transfer, CLI

def test_eval_of_best_checkpoint_matches_results(vpns_run, capsys):
    out, _, (run,) = vpns_run
    best = os.path.join(run_dir(out, "vpns", 0.5), "best.pt")
    assert load_checkpoint(best)["meta"]["selected"]["epoch"] == run["selected_epoch"]
    result = evaluate_checkpoint(best, "synthetic", batch_size=32, device="cpu", limit=32)
    assert result["samples"] == 32
    assert result["accuracy"] == run["test_acc"]
    assert result["accuracy_prompt"] == run["test_acc_prompt"]
    assert result["density"] == run["actual_density"]
    assert cli.main(["eval", best, "--dataset", "synthetic", "--limit", "32", "--batch-size", "32",
                     "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == run["test_acc"] and printed["accuracy_prompt"] == run["test_acc_prompt"]
    # the run's own splits whatever the dataset's spelling, and its --limit said (an outside review: "Synthetic"
    # had drawn other splits, and the run's limit was applied without a word)
    again = evaluate_checkpoint(best, "Synthetic", batch_size=32, device="cpu")
    assert again["limit"] == 32 and again["samples"] == 32 and again["accuracy"] == run["test_acc"]
    # the checkpoint names the classes it learned, in label order; data of other classes is refused, not scored
    # by position (a folder without one class counted right answers for the next class as wrong)
    assert load_checkpoint(best)["meta"]["class_names"] == [f"class_{i}" for i in range(10)]
    with pytest.raises(ValueError, match=r"its network was trained on the classes 'class_0', 'class_1'.* the "
                                         r"digits data has '0', '1', .*so its labels mean other classes"):
        evaluate_checkpoint(best, "digits", batch_size=32, device="cpu", limit=32)


def test_cli_prune_then_resume(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["prune", "--dataset", "synthetic", "--limit", "32", "--batch-size", "32", "--epochs", "1",
            "--method", "vpns,omp", "--density", "0.5", "--deterministic", "--device", "cpu", "--no-progress",
            "--out", out]
    assert cli.main(args) == 0
    runs = read_results(out)["runs"]
    assert [r["method"] for r in runs] == ["vpns", "omp"]
    assert all(0 <= r["test_acc"] <= 100 for r in runs)
    assert cli.main(args) == 2  # the same --out again: refused, pointing to `vpns resume`
    assert "vpns resume" in capsys.readouterr().err
    assert cli.main(["resume", out, "--no-progress"]) == 0
    assert without_timings(read_results(out)["runs"]) == without_timings(runs)


def test_cli_transfer_from_mask_checkpoint(vpns_run, tmp_path):
    out, _, (run,) = vpns_run
    mask = os.path.join(run_dir(out, "vpns", 0.5), "mask.pt")
    target = str(tmp_path / "transfer")
    assert cli.main(["transfer", mask, "--with-prompt", "--dataset", "synthetic", "--limit", "32", "--batch-size",
                     "32", "--epochs", "1", "--device", "cpu", "--no-progress", "--out", target]) == 0
    (transferred,) = read_results(target)["runs"]
    assert transferred["method"] == "transfer+vp"
    assert transferred["params_kept"] == run["params_kept"]
    assert transferred["test_acc_prompt"] is not None
    final = load_checkpoint(os.path.join(run_dir(target, "transfer+vp", transferred["density"]), "last.pt"))
    assert_same_tensors(score_masks(load_checkpoint(mask)["state_dict"]), score_masks(final["state_dict"]))


# ----------------------------------------------------------------------------- protocols, label mapping

def test_prompted_protocol_selects_and_evaluates_with_the_prompt(tmp_path):
    (run,) = TwoStageTrainer(tiny(tmp_path, protocol="prompted")).run()
    assert run["selected_by"] == "val_acc_prompt"
    assert run["last_test_acc_prompt"] == run["history"][-1]["test_acc_prompt"] is not None
    assert run["last_test_acc"] == run["history"][-1]["test_acc"]  # every accuracy has its no-prompt twin
    assert headline_acc(run, last=True) == run["last_test_acc_prompt"]  # the protocol's headline
    selected = load_checkpoint(os.path.join(run_dir(tmp_path, "vpns", 0.5), "best.pt"))["meta"]["selected"]
    assert selected["val_acc_prompt"] == run["val_acc_prompt"]


def test_release_protocol_selects_without_the_prompt(vpns_run):
    _, _, (run,) = vpns_run
    assert run["selected_by"] == "val_acc"
    assert run["last_test_acc"] == run["history"][-1]["test_acc"]
    assert headline_acc(run) == run["test_acc"]


def test_empty_val_split_selects_the_last_epoch(tmp_path):
    (run,) = TwoStageTrainer(tiny(tmp_path, val_fraction=0.0, finetune_epochs=2)).run()
    assert run["val_acc"] is None and run["selected_by"] == "last_epoch"
    assert run["selected_epoch"] == 2 and run["test_acc"] == run["last_test_acc"]
    assert all("val_acc" not in h for h in run["history"])


@pytest.fixture
def twenty_class_weights(tmp_path_factory):
    """A small_resnet with a 20-class source head: a 10-class dataset needs a label mapping. Outside
    tmp_path, which the tests use as --out (a folder of other files is refused)."""
    path = tmp_path_factory.mktemp("weights") / "source20.pt"
    torch.manual_seed(3)
    torch.save(build_model("small_resnet", num_classes=20).state_dict(), path)
    return str(path)


def _record_fits(monkeypatch):
    fits = []
    original = LabelMapping.fit

    def fit(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        fits.append((self.counts.clone(), self.mapping.clone()))
        return result

    monkeypatch.setattr(LabelMapping, "fit", fit)
    return fits


def _predict_last_source_class_after_first_epoch(monkeypatch):
    """After the first epoch every image is predicted as source class 19 (weights are frozen in
    stage 1, so this holds until the next epoch starts): the predictions change."""
    original = trainer_module.train_epoch
    calls = {"n": 0}

    def train_epoch(network, *args, **kwargs):  # one process: the network itself, not a DDP wrapper
        result = original(network, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            with torch.no_grad():
                network.model.fc.weight.zero_()
                network.model.fc.bias.copy_(torch.arange(20.0) * 10)
        return result

    monkeypatch.setattr(trainer_module, "train_epoch", train_epoch)


def test_ilm_refits_the_mapping_every_epoch(tmp_path, monkeypatch, twenty_class_weights):
    fits = _record_fits(monkeypatch)
    _predict_last_source_class_after_first_epoch(monkeypatch)
    (run,) = TwoStageTrainer(tiny(tmp_path, weights=twenty_class_weights, label_mapping="ilm",
                                  search_epochs=2)).run()
    assert len(fits) == 3  # one at the start of each of the 3 epochs, the first being the initial mapping
    for counts, mapping in fits:
        assert counts.shape == (20, 10) and int(counts.sum()) == 32  # every training image, once
        assert torch.equal(mapping, greedy_label_mapping(counts))
        assert mapping.unique().numel() == 10 and int(mapping.max()) < 20
    assert int(fits[1][0][19].sum()) == 32  # the refit saw the new predictions...
    assert not torch.equal(fits[0][1], fits[1][1])  # ...and changed the mapping
    saved = load_checkpoint(os.path.join(run_dir(tmp_path, "vpns", 0.5), "last.pt"))["label_mapping"]
    assert torch.equal(saved, fits[-1][1])
    assert 0 <= run["test_acc"] <= 100


def test_auto_mapping_is_flm_fitted_once(tmp_path, monkeypatch, twenty_class_weights):
    fits = _record_fits(monkeypatch)
    _predict_last_source_class_after_first_epoch(monkeypatch)
    TwoStageTrainer(tiny(tmp_path, weights=twenty_class_weights, search_epochs=2)).run()
    assert len(fits) == 1
    saved = load_checkpoint(os.path.join(run_dir(tmp_path, "vpns", 0.5), "best.pt"))
    assert torch.equal(saved["label_mapping"], fits[0][1])
    assert saved["model"]["kwargs"] == {"num_classes": 20}


# ----------------------------------------------------------------------------- precision and layout

# bf16 convolutions are slow on CPU: one fine-tuning epoch (omp+vp still trains a prompt)
@pytest.mark.parametrize("options", [{"amp": "bf16", "deterministic": False, "methods": ("omp+vp",)},
                                     # release protocol: the unprompted step leaves the prompt's
                                     # optimizer without gradients, which the fp16 scaler must skip
                                     {"amp": "fp16", "deterministic": False, "methods": ("vpns",)},
                                     {"channels_last": True, "methods": ("vpns",)}],
                         ids=["bf16", "fp16", "channels_last"])
def test_amp_and_channels_last_run_on_cpu(tmp_path, options):
    (run,) = TwoStageTrainer(tiny(tmp_path, **options)).run()
    assert 0 <= run["test_acc"] <= 100 and run["test_acc_prompt"] is not None
    assert run["params_kept"] == sum(_layer_sizes()) - int(0.5 * sum(_layer_sizes()))
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in run["history"])


def test_in_memory_run_without_out_dir():
    (run,) = TwoStageTrainer(tiny(None, methods=("omp",))).run()
    assert 0 <= run["test_acc"] <= 100


def test_zero_epoch_final_phase_still_reports_test_accuracy(tmp_path):
    """Mask search only (--finetune-epochs 0): the found subnetwork is evaluated once at the end."""
    (run,) = TwoStageTrainer(tiny(tmp_path, finetune_epochs=0)).run()
    assert run["test_acc"] is not None and run["test_acc_prompt"] is not None
    assert run["selected_epoch"] == 0


def test_channels_last_keeps_scores_contiguous():
    dense = build_model("small_resnet", num_classes=10)
    model = fresh_model(dense, dense.state_dict(), tiny(None, channels_last=True), torch.device("cpu"))
    conv = model.layer1[0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.scores.is_contiguous()


@pytest.mark.parametrize("overrides,match", [
    ({"image_size": 24}, "protocol: 'release' feeds"),
    ({"prompt": "expansive"}, "expansive prompt"),
    ({"prompt": "expansive", "image_size": 24, "protocol": "prompted", "input_size": 16}, "must not exceed"),
    ({"prompt_size": 16}, "prompt_size: pad must be"),
    ({"hydra_epochs": -1}, "hydra_epochs"),
    ({"model": "resnet99"}, "resnet99"),
])
def test_bad_geometry_is_refused_before_anything_runs(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **overrides)
    assert not os.path.exists(os.path.join(str(tmp_path), "config.json"))


def test_hydra_epochs_give_hydra_its_own_budget():
    config = tiny(None, methods=("vpns", "hydra"), hydra_epochs=2)
    vpns, hydra = (plan_phases(config, METHODS[m], 0.5) for m in ("vpns", "hydra"))
    assert [p.epochs for p in vpns] == [1, 1] and [p.epochs for p in hydra] == [2, 2]


def test_the_method_table_sets_scope_and_optimizers():
    """HYDRA's own settings (scope, score optimizer) come from its Method entry, VPNs' from the defaults."""
    config = tiny(None, methods=("vpns", "hydra"), scope="global", hydra_scope="layer")
    vpns, hydra = (plan_phases(config, METHODS[m], 0.5) for m in ("vpns", "hydra"))
    assert [(p.scope, p.optimizer, p.use_prompt) for p in vpns] == [("global", "search_scores", True),
                                                                    ("global", "finetune_weights", True)]
    assert [(p.scope, p.optimizer, p.use_prompt) for p in hydra] == [("layer", "hydra_scores", False),
                                                                     ("layer", "finetune_weights", False)]
    imp = plan_phases(config, METHODS["imp"], 0.6)
    assert [p.rewinds for p in imp] == [False, True, True, True] and {p.scope for p in imp} == {"global"}


def test_a_run_whose_mask_empties_a_layer_says_so():
    """OMP at 30% kept emptied MobileNetV3's classifier (a threshold shared by all layers), so every prediction was
    the same, and no row said why (an outside review). The row names such layers and a warning says it."""
    import warnings

    from vpns_fast.nn.prompted_network import PromptedNetwork
    from vpns_fast.training.config import TrainConfig
    from vpns_fast.training.results import result_row
    from vpns_fast.training.state import RunState

    model = sparsify(build_model("small_resnet", num_classes=10), "unstructured")
    network = PromptedNetwork(model, None, LabelMapping(10), (0.5,) * 3, (0.5,) * 3)
    config = TrainConfig(model="small_resnet", dataset="digits", input_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert result_row(config, "omp", 0.3, network, RunState(), {}, 1.0)["emptied_layers"] == []
    with torch.no_grad():
        model.fc.threshold.fill_(float("inf"))
    with pytest.warns(UserWarning, match=r"omp at density 0.3: 1 layer\(s\) kept no weight \(fc\)"):
        assert result_row(config, "omp", 0.3, network, RunState(), {}, 1.0)["emptied_layers"] == ["fc"]


class _WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = build_model("small_resnet", num_classes=10)
        self.aux_head = nn.Linear(128, 128)  # never called by forward

    def forward(self, x):
        return self.body(x)


def test_a_run_with_a_layer_its_forward_never_calls_says_so():
    """An unused 128x128 Linear beside a small conv net absorbed the global threshold: at density 0.1 the layers that
    ran kept 0.61 of their weights, while actual_density said 0.1 and nothing warned (an outside review)."""
    from vpns_fast.nn.prompted_network import PromptedNetwork
    from vpns_fast.pruning.masking import density_report, set_density
    from vpns_fast.training.config import TrainConfig
    from vpns_fast.training.results import result_row
    from vpns_fast.training.state import RunState

    model = sparsify(_WithUnusedHead(), "unstructured")
    set_density(model, 0.5)
    network = PromptedNetwork(model, None, LabelMapping(10), (0.5,) * 3, (0.5,) * 3)
    config = TrainConfig(model="small_resnet", dataset="digits", input_size=32)
    from vpns_fast.pruning.masking import IdleLayerWarning

    with pytest.warns(IdleLayerWarning, match=r"omp at density 0.5: 1 masked layer\(s\) did no work in the eval-mode "
                                         r"forward \(aux_head\); their weights count in the density"):
        assert result_row(config, "omp", 0.5, network, RunState(), {}, 1.0)["unused_layers"] == ["aux_head"]
    report = density_report(model, (3, 32, 32))
    assert report.unused_layers == ["aux_head"] and report.to_dict()["unused_layers"] == ["aux_head"]
    assert density_report(model).unused_layers is None  # FLOPs not counted: not known


def _class_folders(root, counts: dict):
    from PIL import Image

    for split, per_class in counts.items():
        for index, (name, count) in enumerate(per_class.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (80 * index, 4 * i, 0)).save(root / split / name / f"{i}.png")


def test_force_keeps_the_old_run_where_the_new_jobs_data_is_refused(tmp_path, capsys):
    """An outside review: `--force` deleted the finished run before the new job read its data, so a mistyped
    --data-dir, an undecodable image or a val fraction holding out every image lost it. The data is read first."""
    _class_folders(tmp_path / "data", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    out = str(tmp_path / "run")
    common = ["--model", "small_resnet", "--input-size", "8", "--epochs", "1", "--batch-size", "8", "--method",
              "omp", "--density", "0.5", "--device", "cpu", "--no-progress", "--out", out]
    assert cli.main(["prune", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), *common]) == 0
    before = sorted(os.listdir(out)), read_results(out)
    for argv, pattern in [(["--data-dir", str(tmp_path / "nothing")],
                           "error: --data-dir: ImageFolder dataset not found"),
                          (["--data-dir", str(tmp_path / "data"), "--val-fraction", "0.95"],
                           r"error: --val-fraction: nothing to train on: 0.95 held out every training image \(8\) "
                           r"for val")]:
        assert cli.main(["prune", "--dataset", "imagefolder", *argv, *common, "--force"]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err) and err.count("\n") == 1, err
        assert (sorted(os.listdir(out)), read_results(out)) == before
    assert cli.main(["prune", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--val-fraction",
                     "0.95", *common[:-1], str(tmp_path / "fresh")]) == 2
    assert not os.path.exists(tmp_path / "fresh" / "config.json")  # nothing that blocks the corrected rerun
    capsys.readouterr()


def test_a_job_that_fails_before_writing_leaves_no_folder_behind(tmp_path, capsys):
    """A mistyped --data-dir left the new --out (and the parents it made) behind holding only .vpns.lock, and the
    lock file in a folder of the user's; a folder the job wrote into stays."""
    common = ["prune", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "none"), "--epochs", "1",
              "--device", "cpu", "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "new" / "run")]) == 2
    assert os.listdir(tmp_path) == []  # the folders it made, parents included, are gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert cli.main([*common, "--out", str(tmp_path / "mine"), "--force"]) == 2
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # no lock file left in the user's folder
    assert "ImageFolder dataset not found" in capsys.readouterr().err


def test_a_val_fraction_that_rounds_to_no_image_is_refused(tmp_path, capsys):
    """--val-fraction 0.05 of 8 images held out none: the runs silently kept their last epoch rather than selecting
    on val. Refused before anything is written; 0 (no val, asked for) still trains, from Python too."""
    _class_folders(tmp_path / "data", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    common = ["prune", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--model", "small_resnet",
              "--input-size", "8", "--epochs", "1", "--batch-size", "8", "--method", "omp", "--density", "0.5",
              "--device", "cpu", "--no-progress"]
    assert cli.main([*common, "--val-fraction", "0.05", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"error: --val-fraction: 0.05 of the 8 training images rounds to no "
                                              r"val image; raise it, or set it to 0", err), err
    assert not os.path.exists(tmp_path / "a" / "config.json")
    assert cli.main([*common, "--val-fraction", "0", "--out", str(tmp_path / "b")]) == 0
    # a run started before the refusal (recorded with 0.05, its val split empty) still resumes as it started
    recorded = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**recorded, "val_fraction": 0.05}))
    assert cli.main(["resume", str(tmp_path / "b")]) == 0
    train = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8), torch.arange(8) % 2)
    config = TrainConfig(dataset=(train,), num_classes=2, model="small_resnet", input_size=8, val_fraction=0.04,
                         methods=("omp",), densities=(0.5,), search_epochs=1, finetune_epochs=1, batch_size=8,
                         device="cpu", progress=False, out=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="rounds to no val image"):
        TwoStageTrainer(config).run()
    capsys.readouterr()


def test_eval_refuses_an_empty_split_and_keeps_the_runs_limit_to_its_own_folder(tmp_path):
    _class_folders(tmp_path / "data", {"train": {"cat": 4, "dog": 4}, "test": {"cat": 2, "dog": 2}})
    _class_folders(tmp_path / "other", {"train": {"cat": 1, "dog": 1}, "test": {"cat": 5, "dog": 5}})
    out = tmp_path / "run"
    TwoStageTrainer(tiny(out, dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=8, input_size=8,
                         methods=("omp",), finetune_epochs=1, val_fraction=0.0, limit=3)).run()
    best = os.path.join(run_dir(out, "omp", 0.5), "best.pt")
    with pytest.raises(ValueError, match=r"split 'val' of imagefolder holds no images \(the run held out no val "
                                         r"images: val_fraction 0\)"):  # it had read accuracy 0.0
        evaluate_checkpoint(best, "imagefolder", str(tmp_path / "data"), split="val", device="cpu")
    own = evaluate_checkpoint(best, "imagefolder", str(tmp_path / "data"), device="cpu")
    assert (own["limit"], own["samples"]) == (3, 3)  # the run's --limit on the run's folder
    other = evaluate_checkpoint(best, "imagefolder", str(tmp_path / "other"), device="cpu")
    assert (other["limit"], other["samples"]) == (None, 10)  # another folder: all of its test images


def test_older_configs_still_load_and_a_forced_job_replaces_one_refused_now(tmp_path):
    """A diff review's case: a run recorded before sizes of 0 were refused (0 meant the default) must resume, and one
    whose value is out of today's range must still be replaced by --force, not crash the comparison."""
    legacy = {**tiny(tmp_path / "a").to_dict(), "input_size": 0, "image_size": 0, "prompt_size": 0}
    restored = TrainConfig.from_dict(legacy)
    assert (restored.input_size, restored.image_size, restored.prompt_size) == (None, None, None)
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**legacy, "split_seed": 2**40, "out": str(out)}))
    config = tiny(out)
    with pytest.raises(FileExistsError, match="holds a run with a different config"):
        refuse_existing_run(config, force=False, resuming=False)
    assert refuse_existing_run(config, force=True, resuming=False)
    # one method or density given bare, as a single value
    bare = tiny(tmp_path / "b", methods="omp", densities=0.5)
    assert (bare.methods, bare.densities) == (("omp",), (0.5,))


def test_sizes_and_split_seeds_out_of_range_are_refused_by_name(tmp_path, capsys):
    base = ["prune", "--dataset", "synthetic", "--epochs", "1", "--limit", "16", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "o")]
    for flag, value, pattern in [("--input-size", "0", "--input-size: expected an integer >= 1, got 0"),
                                 ("--image-size", "0", "--image-size: expected an integer >= 1, got 0"),
                                 ("--prompt-size", "-3", "--prompt-size: expected an integer >= 1, got -3"),
                                 ("--split-seed", str(2**32), r"--split-seed: expected an integer in \[0, 2\*\*32\)"),
                                 ("--split-seed", "-1", r"--split-seed: expected an integer in \[0, 2\*\*32\)"),
                                 # TrainConfig's own refusals, told with the flag that set the field (they read
                                 # "density must be in (0, 1]" and "lr of search_scores: ..." without it)
                                 ("--density", "1.5", r"--density: expected densities in \(0, 1\], got 1.5"),
                                 ("--lr", "search_scores=-1", "--lr: lr of search_scores: expected a finite number"),
                                 ("--epochs", "-1", "--epochs: expected an integer >= 0, got -1"),
                                 ("--num-workers", "-2", "--num-workers: expected an integer >= 0, got -2")]:
        assert cli.main([*base, flag, value]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err) and err.count("\n") == 1, err
    config = tmp_path / "c.json"
    for key, value, pattern in [("input_size", 0, "input_size: expected an integer >= 1"), ("val_fraction", 1.0,
                                r"val_fraction: expected a number in \[0, 1\), got 1.0"),
                                ("limit", 0, "limit: expected an integer >= 1"),
                                ("split_seed", 2**64, r"split_seed: expected an integer in \[0, 2\*\*32\)")]:
        config.write_text(json.dumps({"dataset": "synthetic", key: value}))
        assert cli.main(["prune", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert re.search(f"--config {re.escape(str(config))}: {pattern}", err), err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize(("overrides", "field", "pattern"), [
    ({"densities": ()}, "densities", "expected at least one density"),  # it ran nothing and reported success
    ({"densities": "0.2"}, "densities", "expected a number or a list of them"),
    ({"batch_size": "8"}, "batch_size", "expected an integer, got '8'"),
    ({"batch_size": 8.0}, "batch_size", "expected an integer, got 8.0"),
    ({"search_epochs": 1.5}, "search_epochs", "expected an integer"),
    ({"seed": "x"}, "seed", "expected an integer, got 'x'"),
    ({"limit": True}, "limit", "expected an integer or None"),
    ({"imp_rate": 1.5}, "imp_rate", r"expected a number in \(0, 1\)"),  # checked once config.json was written
    ({"score_init": "x"}, "score_init", "expected one of"),
    ({"prompt": "nope"}, "prompt", "expected one of"),
    ({"prompt_size": 40}, "prompt_size", "pad must be"),
    ({"dataset": "nosuch"}, "dataset", "unknown dataset 'nosuch'"),
    ({"optimizers": None}, "optimizers", "expected a dict of optimizer groups"),
    ({"optimizers": {"search_scores": 0.1}}, "optimizers", "search_scores: expected a dict"),
    ({"optimizers": {"search_scores": {"learning_rate": 0.1}}}, "optimizers",
     "unknown key 'learning_rate' for search_scores; the keys are name, lr, momentum, weight_decay"),
    ({"optimizers": {"search_scores": {"lr": "1e-4"}}}, "optimizers", r"got '1e-4' \(text, not a number: YAML"),
])
def test_train_config_refuses_a_setting_by_its_field(tmp_path, overrides, field, pattern):
    """An outside review: wrong types raised TypeError deep inside a check, or passed and failed at run() (1.5
    epochs), or trained ("x" as a seed); some choices were refused only after config.json was written (imp_rate,
    score_init); an optimizer key's typo was kept and never used. Each is a SettingError naming its field."""
    with pytest.raises(SettingError, match=pattern) as info:
        tiny(tmp_path, **overrides)
    assert info.value.field == field
    assert not os.path.exists(tmp_path / "config.json")
    config = tiny(tmp_path, batch_size=np.int64(8), methods="omp", densities=np.float32(0.5))
    assert type(config.batch_size) is int and config.densities == (0.5,) and config.methods == ("omp",)


def test_a_refused_setting_names_the_flag_or_file_that_set_it(tmp_path, capsys):
    """An outside review: of two flags that set a field the specific one is named (--search-epochs beside --epochs);
    --epochs itself is still checked when both stages' flags override it; an optimizer setting is blamed on the flag
    or the file that set that group's key, not on another optimizer flag."""
    base = ["prune", "--dataset", "synthetic", "--limit", "16", "--device", "cpu", "--no-progress", "--out",
            str(tmp_path / "o")]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"dataset": "synthetic", "optimizers": {"search_scores": {"lr": -1}}}))
    for argv, pattern in [
            (["--epochs", "5", "--search-epochs", "-1"], "--search-epochs: expected an integer >= 0, got -1"),
            (["--epochs", "-1", "--search-epochs", "1", "--finetune-epochs", "1"],
             "--epochs: expected an integer >= 0"),
            (["--lr", "search_scores=-1", "--weight-decay", "search_scores=0.1"], "--lr: lr of search_scores"),
            (["--weight-decay", "finetune_weights=-2", "--lr", "search_scores=0.1"],
             "--weight-decay: weight_decay of finetune_weights"),
            (["--config", str(config), "--weight-decay", "search_scores=0.1"],
             f"--config {re.escape(str(config))}: optimizers: lr of search_scores"),
            (["--config", str(config), "--lr", "search_scores=-3"], "--lr: lr of search_scores: .* got -3"),
            (["--method", "nope"], "--method: expected methods among vpns, .*, got 'nope'")]:
        assert cli.main([*base, *argv]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err) and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(tmp_path / "o" / "config.json")


def test_resume_refuses_data_that_changed(tmp_path, monkeypatch):
    """A resume read whatever the folder held by then: images added had redrawn the val split from training images,
    a renamed class permuted the labels mid-run, and a relative --data-dir read another folder from another working
    directory (an outside review). config.json records the data's fingerprint (paths below the data's folder, so
    the data may move with the run)."""
    import shutil

    data = tmp_path / "data"
    _class_folders(data, {"train": {"cat": 6, "dog": 6}, "test": {"cat": 2, "dog": 2}})
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    TwoStageTrainer(tiny(out, dataset="imagefolder", data_dir="data", image_size=8, input_size=8,
                         methods=("omp",), finetune_epochs=1)).run()
    with open(out / "config.json") as f:
        recorded = json.load(f)
    assert recorded["data_dir"] == "data" and recorded["data"]["classes"] == ["cat", "dog"]
    assert resume(str(out), progress=False)  # unchanged: finished, nothing reruns
    elsewhere = tmp_path / "elsewhere"
    _class_folders(elsewhere / "data", {"train": {"cat": 3, "dog": 6}, "test": {"cat": 2, "dog": 2}})
    monkeypatch.chdir(elsewhere)  # "data" is another folder from here
    with pytest.raises(ValueError, match=r"the train split's images changed since the run started"):
        resume(str(out), progress=False)
    shutil.rmtree(elsewhere / "data")
    shutil.copytree(data, elsewhere / "data")  # the same data, moved: resumes
    assert resume(str(out), progress=False)
    monkeypatch.chdir(tmp_path)
    _class_folders(data, {"train": {"cat": 7}})  # one image more
    with pytest.raises(ValueError, match=r"the train split's images changed since the run started \(\d+ then, \d+ "
                                         r"now\); resume needs the data the run started with"):
        resume(str(out), progress=False)
    (data / "train" / "cat" / "6.png").unlink()
    shutil.move(data / "train" / "dog", data / "train" / "ant")
    shutil.move(data / "test" / "dog", data / "test" / "ant")
    with pytest.raises(ValueError, match=r"the data's classes changed since the run started \(2 then, 2 now: gone "
                                         r"'dog', new 'ant'\)"):
        resume(str(out), progress=False)
    assert cli.main(["prune", "--config", str(out / "config.json"), "--out", str(tmp_path / "again")]) == 0


def test_a_factory_whose_head_is_not_its_last_linear_fails_in_one_line(tmp_path, monkeypatch):
    """A factory without num_classes gets its last registered Linear replaced as the head; where the head was
    registered first, the dry forward ended in a traceback (an outside review)."""
    (tmp_path / "headfirst_module.py").write_text(
        "from torch import nn\n\n\n"
        "class HeadFirst(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.head = nn.Linear(8, 5)\n"
        "        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                                  nn.Flatten(), nn.Linear(16, 8), nn.ReLU())\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.body(x))\n\n\n"
        "def build():\n"
        "    return HeadFirst()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"model headfirst_module:build: its forward on one 224x224 image failed "
                                         r"\(mat1 and mat2 shapes cannot be multiplied.*\); a factory without a "
                                         r"num_classes argument gets its last registered Linear layer replaced"):
        TwoStageTrainer(tiny(model="headfirst_module:build")).run()


def test_the_jobs_console_lines_go_through_logging(capsys):
    """The trainer's lines were plain prints no logging setting reached (an outside review): printed on stdout
    where nothing is configured, silenced by a level on vpns_fast, handled by logging where the application set
    it up."""
    import logging

    from vpns_fast.console import say

    package = logging.getLogger("vpns_fast")
    say("line one")
    assert capsys.readouterr().out == "line one\n"
    package.setLevel(logging.WARNING)
    try:
        say("line two")
        assert capsys.readouterr().out == ""
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        try:
            say("line three")
        finally:
            package.removeHandler(handler)
        assert [r.getMessage() for r in records] == ["line three"] and records[0].name == "vpns_fast.training"
        assert capsys.readouterr().out == ""
    finally:
        package.setLevel(logging.NOTSET)
    logging.disable(logging.INFO)
    try:
        say("line four")
        assert capsys.readouterr().out == ""
    finally:
        logging.disable(logging.NOTSET)
    # an application logging at INFO through the root (logging.basicConfig(level=logging.INFO)) gets records,
    # the trainer's own lines included
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    root_level = logging.root.level
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO)
    try:
        TwoStageTrainer(tiny(methods=("omp",), finetune_epochs=1)).run()
    finally:
        logging.root.removeHandler(handler)
        logging.root.setLevel(root_level)
    lines = [r.getMessage() for r in records if r.name == "vpns_fast.training"]  # progress=False: a line an epoch
    assert any(line.startswith("[omp d=0.5] finetune 1/1 | loss") for line in lines)
    assert "[omp d=0.5]" not in capsys.readouterr().out
