"""Every user mistake on the command line ends in one line on stderr naming the argument or file and
what was expected, exit status 2, no traceback; Ctrl-C ends in one line (with the resume hint), 130."""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import re
import signal
import stat
import sys
import time

import pytest
import torch
from PIL import Image

import vpns_fast as V
from vpns_fast import cli
from vpns_fast.cli import main
from vpns_fast.models import build_model
from vpns_fast.pruning.checkpoint import save_checkpoint

TRAIN = ["--epochs", "1", "--limit", "8", "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    model = V.sparsify(build_model("small_resnet", num_classes=10), "unstructured")
    save_checkpoint(root / "m.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32))
    Image.new("RGB", (32, 32)).save(root / "img.png")
    Image.effect_noise((64, 64), 64).convert("RGB").save(root / "whole.png")
    whole = (root / "whole.png").read_bytes()
    (root / "cut.png").write_bytes(whole[:len(whole) // 2])  # a download cut off halfway
    (root / "afile.txt").write_text("not a folder")
    (root / "afolder").mkdir()
    (root / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch" * 10)
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (cifar / name).write_bytes(b"garbage")
    for split in ("train", "test"):
        for label in ("a", "b"):
            (root / "folder" / split / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "folder" / split / label / "x.png")
    (root / "folder" / "train" / "a" / "notes.png").write_text("not an image")
    with open(root / "pickled.pt", "wb") as f:
        pickle.dump({"weight": 1}, f)
    torch.save({"weight": torch.zeros(2)}, root / "plain_dict.pt")
    (root / "run_list").mkdir()
    (root / "run_list" / "config.json").write_text("[1, 2]")
    (root / "run_corrupt").mkdir()
    (root / "run_corrupt" / "config.json").write_text("{not json")
    for name, values in (("nan", (float("nan"),)), ("opposite_inf", (float("inf"), float("-inf")))):
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.fc.bias[:len(values)] = torch.tensor(values)
        save_checkpoint(root / f"{name}.pt", broken, model_name="small_resnet", model_kwargs={"num_classes": 10},
                        input_size=(3, 32, 32))
    (root / "empty.pt").write_bytes(b"")
    (root / "random.pt").write_bytes(bytes(range(256)) * 4)
    torch.save({"format": "vpns_fast-checkpoint", "model": argparse.Namespace()}, root / "object.pt")
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    return root


CASES = {
    "device": (["prune", *TRAIN, "--device", "tpu", "--out", "{root}/o_device"], "--device"),
    "out under a file": (["prune", *TRAIN, "--out", "{root}/afile.txt/sub"], "afile.txt is a file"),
    "out is a file": (["prune", *TRAIN, "--out", "{root}/afile.txt"], "--out .*afile.txt: is a file"),
    "epochs": (["prune", "--epochs", "-3", "--out", "{root}/o_epochs"], "--epochs: expected an integer >= 0"),
    "val fraction 1": (["prune", *TRAIN, "--val-fraction", "1", "--out", "{root}/o_val"],
                       r"--val-fraction: expected a number in \[0, 1\), got 1.0"),
    "val fraction nan": (["prune", *TRAIN, "--val-fraction", "nan", "--out", "{root}/o_val"],
                         r"--val-fraction: expected a number in \[0, 1\), got nan"),
    "val fraction text": (["prune", *TRAIN, "--val-fraction", "a tenth"], "--val-fraction: invalid float value"),
    "dataset": (["prune", *TRAIN, "--dataset", "bogus"], "--dataset: unknown dataset 'bogus'"),
    "no data dir": (["prune", *TRAIN, "--dataset", "ImageFolder", "--out", "{root}/o_nodir"],
                    "--data-dir: --dataset ImageFolder reads its files from a folder"),
    "eval, no data dir": (["eval", "{root}/m.pt", "--dataset", "cifar10"],
                          "--data-dir: --dataset cifar10 reads its files from a folder"),
    "garbage cifar": (["prune", *TRAIN, "--dataset", "cifar10", "--data-dir", "{root}"],
                      "data_batch_1 is not a CIFAR python-version pickle"),
    # three training images: no val split (0.1 of them rounds to none, which is refused)
    "non-image in imagefolder": (["prune", *TRAIN, "--dataset", "imagefolder", "--data-dir", "{root}/folder",
                                  "--val-fraction", "0"], "notes.png: not an image file"),
    "non-image, loader workers": (["prune", *TRAIN, "--dataset", "imagefolder", "--data-dir", "{root}/folder",
                                   "--val-fraction", "0", "--num-workers", "2", "--out", "{root}/o_workers"],
                                  "notes.png: not an image file"),
    "val rounds to none": (["prune", *TRAIN, "--dataset", "imagefolder", "--data-dir", "{root}/folder"],
                           r"error: val_fraction: 0.1 of the 3 training images rounds to no val image"),
    "infer top -1": (["infer", "{root}/m.pt", "{root}/img.png", "--top", "-1"], "--top: expected an integer >= 1"),
    "infer top 0": (["infer", "{root}/m.pt", "{root}/img.png", "--top", "0"], "--top: expected an integer >= 1"),
    "infer onnx": (["infer", "{root}/model.onnx", "{root}/img.png"], "model.onnx is an ONNX file"),
    "infer missing image": (["infer", "{root}/m.pt", "{root}/nothing.png"], "nothing.png: cannot read the image"),
    "export out is a folder": (["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/afolder", "--force"],
                               "--out .*afolder: is a folder"),
    "bench threads 0": (["bench-infer", "{root}/m.pt", "--threads", "0"], "--threads: expected an integer >= 1"),
    "infer threads 0": (["infer", "{root}/m.pt", "{root}/img.png", "--threads", "0"],
                        "--threads: expected an integer >= 1"),
    "infer unknown option": (["infer", "{root}/m.pt", "{root}/img.png", "--foo"],
                             "vpns infer: error: unrecognized arguments: --foo .see `vpns infer --help`"),
    "unknown option before the command": (["--foo", "infer", "{root}/m.pt", "{root}/img.png"],
                                          "^vpns: error: unrecognized arguments: --foo .see `vpns --help`"),
    "bench batch not an int": (["bench-infer", "{root}/m.pt", "--batch", "1,x"],
                               "--batch: expected comma-separated int values, got '1,x'"),
    "bench iters 0": (["bench-infer", "{root}/m.pt", "--iters", "0"], "--iters: expected an integer >= 1"),
    "bench batch 0": (["bench-infer", "{root}/m.pt", "--batch", "0"], "--batch: expected an integer >= 1"),
    "bench batch twice": (["bench-infer", "{root}/m.pt", "--batch", "2,2"], "--batch: expected distinct batch sizes"),
    "bench iters huge": (["bench-infer", "{root}/m.pt", "--iters", "100000000000000000000000"],
                         "--iters: expected at most 100000"),
    "bench warmup huge": (["bench-infer", "{root}/m.pt", "--warmup", "100001"], "--warmup: expected at most"),
    "report input size": (["report", "{root}/m.pt", "--input-size", "3", "-5", "32"], "--input-size: expected"),
    "eval a folder": (["eval", "{root}", "--dataset", "digits"], "is a folder; expected a file"),
    "export out empty": (["export", "{root}/m.pt", "--format", "dense", "--out", ""],
                         "--out: expected a file path, got an empty string"),
    "export out ends in a slash": (["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/new/"],
                                   "--out .*new/: is a folder"),
    "export out under a link loop": (["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/loop_a/x"],
                                     "loop_a is a symbolic link to nothing"),
    "export out not writable": (["export", "{root}/m.pt", "--format", "dense", "--out", "/proc/vpns_x.safetensors"],
                                r"--out /proc/vpns_x.safetensors: cannot write it \(No such file"),
    "export slim flag": (["export", "{root}/m.pt", "--format", "sparse", "--slim", "--out", "{root}/s.sparse"],
                         "--slim: only for --format onnx"),
    "export nan": (["export", "{root}/nan.pt", "--format", "dense", "--out", "{root}/nan.dense"],
                   "nan.pt: fc.bias holds NaN values"),
    "infer nan": (["infer", "{root}/nan.pt", "{root}/img.png", "--policy", "dense"], "nan.pt: fc.bias holds NaN"),
    "infer nan logits": (["infer", "{root}/opposite_inf.pt", "{root}/img.png", "--policy", "dense", "--json"],
                         "img.png: the model computes NaN for this image"),
    "infer unreadable": (["infer", "{root}/loop_a", "{root}/img.png"], "path .*loop_a: cannot be read"),
    "bench unreadable": (["bench-infer", "{root}/loop_a"], "path .*loop_a: cannot be read"),
    "bench threads too many": (["bench-infer", "{root}/m.pt", "--threads", "100000"], "--threads: expected at most"),
    "infer threads too many": (["infer", "{root}/m.pt", "{root}/img.png", "--threads", "100000"],
                               "--threads: expected at most"),
    "bench batch empty entry": (["bench-infer", "{root}/m.pt", "--batch", "1,,2"],
                                "--batch: expected comma-separated int values, got an empty entry in '1,,2'"),
    "export over its checkpoint": (["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/m.pt", "--force"],
                                   "--out .*m.pt: is the checkpoint being exported; write the export to another file"),
    "export out exists": (["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/afile.txt"],
                          "--out .*afile.txt: exists; pass --force to replace it$"),
    "infer cut-off image": (["infer", "{root}/m.pt", "{root}/cut.png", "--policy", "dense"],
                            "cut.png: cannot read the image: image file is truncated"),
    "infer empty file": (["infer", "{root}/empty.pt", "{root}/img.png"], "empty.pt is empty$"),
    "export over its checkpoint, no force": (["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/m.pt"],
                                             "--out .*m.pt: is the checkpoint being exported"),
    "bench batch empty": (["bench-infer", "{root}/m.pt", "--batch", ","], "--batch: expected comma-separated"),
    "report input channels": (["report", "{root}/m.pt", "--input-size", "1", "32", "32"],
                              "--input-size 1 32 32: the model cannot run on it .*channels"),
    "report input huge": (["report", "{root}/m.pt", "--input-size", "3", "100000", "100000"],
                          "--input-size: expected .* at most"),
    "report empty file": (["report", "{root}/empty.pt"], r"empty.pt is not a readable checkpoint \(the file is empty"),
    "report random bytes": (["report", "{root}/random.pt"], "random.pt is not a readable checkpoint \\(not a file "
                            "torch.save wrote"),
    "report object file": (["report", "{root}/object.pt"], "torch's safe loader refused it, and nothing in it"),
    "report text file": (["report", "{root}/afile.txt"],
                         r"afile.txt is not a readable checkpoint \(not a file torch.save wrote: it is neither"),
    "bench device mps": (["bench-infer", "{root}/m.pt", "--device", "mps"],
                         "--device: expected auto, cpu, cuda or cuda:N, got 'mps'"),
    # argparse's errors: one line too, without the usage block before it
    "bench policy choice": (["bench-infer", "{root}/m.pt", "--policy", "fast"],
                            r"argument --policy: invalid choice: 'fast' .*\(see `vpns bench-infer --help`\)"),
    "export missing arguments": (["export"], "the following arguments are required: checkpoint, --format, --out"),
    "no command": ([], "the following arguments are required: COMMAND"),
    "unknown flag": (["report", "{root}/m.pt", "--densty"], "unrecognized arguments: --densty"),
}

# Raised below the command line (vpns_fast/models.py, vpns_fast/training/trainer.py) as ValueErrors naming the file.
BELOW_THE_CLI = {
    "weights pickle": (["prune", *TRAIN, "--weights", "{root}/pickled.pt"], "weights file .*pickled.pt"),
    "weights plain dict": (["prune", *TRAIN, "--weights", "{root}/plain_dict.pt", "--out", "{root}/o_dict"],
                           "plain_dict.pt"),
    "weights text": (["prune", *TRAIN, "--weights", "{root}/afile.txt"], "afile.txt"),
    "config list": (["resume", "{root}/run_list"], "config.json"),
    "config corrupt": (["resume", "{root}/run_corrupt"], "config.json"),
}


def _run(argv, root, capsys):
    try:
        code = main([arg.format(root=root) for arg in argv])
    except SystemExit as exc:  # argparse's own errors end the program
        code = exc.code
    return code, capsys.readouterr().err


def _assert_one_line_error(code, err, pattern):
    assert code == 2, err
    assert "Traceback" not in err and "weights_only` set to `False" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("vpns ", "vpns:")) and ": error: " in lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line(files, capsys, case):
    argv, pattern = CASES[case]
    _assert_one_line_error(*_run(argv, files, capsys), pattern)


@pytest.mark.parametrize("case", BELOW_THE_CLI)
def test_user_errors_raised_below_the_cli(files, capsys, case):
    argv, pattern = BELOW_THE_CLI[case]
    _assert_one_line_error(*_run(argv, files, capsys), pattern)


def test_ctrl_c_is_one_line_with_the_resume_hint(files, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_prune", interrupted)
    monkeypatch.setattr(cli, "_cmd_infer", interrupted)
    out = files / "o_interrupted"
    assert main(["prune", "--out", str(out)]) == 130  # before config.json: nothing to resume (an outside review)
    assert capsys.readouterr().err.strip() == "vpns prune: interrupted; nothing was written to resume"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier run's, which this job (forced, say) had not replaced yet
    assert main(["prune", "--out", str(out)]) == 130
    earlier = f"vpns prune: interrupted; {out} still holds its earlier run, not replaced"
    assert capsys.readouterr().err.strip() == earlier

    def interrupted_after_writing_its_config(args):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_prune", interrupted_after_writing_its_config)
    assert main(["prune", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"vpns prune: interrupted; continue with `vpns resume {out}`"
    assert main(["infer", str(files / "m.pt"), str(files / "img.png")]) == 130
    assert capsys.readouterr().err.strip() == "vpns infer: interrupted"


def test_cpu_tune_never_writes_the_default_table(tmp_path, capsys, monkeypatch):
    from vpns_fast.ops import conv_dispatch

    monkeypatch.delenv("VPNS_FAST_CONV_TABLE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    default = conv_dispatch.default_table_path()
    assert default.startswith(str(tmp_path))
    code = main(["tune", "--model", "small_resnet", "--input-size", "16", "--batch", "2", "--device", "cpu"])
    _assert_one_line_error(code, capsys.readouterr().err, "--table: a tune on cpu")
    assert not (tmp_path / ".cache").exists()


def test_a_link_at_out_is_the_users_and_kept_without_force(files, capsys):
    link = files / "dangling"
    os.symlink(files / "missing_folder" / "m.safetensors", link)
    _assert_one_line_error(*_run(["export", "{root}/m.pt", "--format", "dense", "--out", str(link)], files, capsys),
                           "--out .*dangling: exists; pass --force")
    assert os.path.islink(link)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_force_replaces_only_regular_files(files, capsys, kind):
    """`--out /dev/null --force` replaced the machine's /dev/null with a regular file (an outside review): a FIFO,
    a device or a folder at --out is refused even with --force, and left as it was."""
    target = files / f"special_{kind}"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    expected = "special_fifo is a FIFO, not a regular file" if kind == "fifo" else "special_folder: is a folder"
    _assert_one_line_error(*_run(["export", "{root}/m.pt", "--format", "dense", "--out", str(target), "--force"],
                                 files, capsys), expected)
    assert (os.path.exists(target) and not os.path.isfile(target)
            and (kind != "fifo" or stat.S_ISFIFO(os.lstat(target).st_mode)))


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_special_file_at_out_is_called_never_replaced_before_force_is_asked_for(files, capsys, kind):
    """`vpns export ... --out /dev/null` without --force said "exists; pass --force to replace it", and following
    that advice met "is a character device, not a regular file; only files are replaced" (an outside trial): the
    first refusal says it at once, from the command line, export() and save_checkpoint alike."""
    if kind == "fifo":
        target = files / "never_fifo"
        if not os.path.lexists(target):
            os.mkfifo(target)
    else:
        target = "/dev/null"
    expected = "is a FIFO" if kind == "fifo" else "is a character device"
    _assert_one_line_error(*_run(["export", "{root}/m.pt", "--format", "dense", "--out", str(target)], files, capsys),
                           f"--out {target} {expected}, not a regular file, and is never replaced")
    with pytest.raises(ValueError, match=f"^path {target} {expected}, not a regular file, and is never replaced"):
        V.export(str(files / "m.pt"), "dense", target)
    model = V.sparsify(build_model("small_resnet", num_classes=10), "unstructured")
    with pytest.raises(ValueError, match=f"^{target} {expected}, not a regular file, and is never replaced"):
        save_checkpoint(target, model, model_name="small_resnet", model_kwargs={"num_classes": 10})
    assert stat.S_ISFIFO(os.lstat(target).st_mode) if kind == "fifo" else stat.S_ISCHR(os.lstat(target).st_mode)


def test_an_image_over_pils_pixel_limit_is_refused_by_name(files, capsys, monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # img.png has 32 x 32 > 2 x 100 pixels
    _assert_one_line_error(*_run(["infer", "{root}/m.pt", "{root}/img.png", "--policy", "dense"], files, capsys),
                           r"img.png: Image size \(1024 pixels\) exceeds limit of 200 pixels \(PIL")


def test_an_image_between_pils_limit_and_twice_it_is_refused_too(files, capsys, monkeypatch):
    """PIL raises only past twice MAX_IMAGE_PIXELS and only warns between, where a 10000 x 10000 PNG of 120 KB was
    decoded into 1.7 GB (an outside review); the README says past the limit."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 600)  # img.png has 32 x 32 = 1024 pixels: between
    _assert_one_line_error(*_run(["infer", "{root}/m.pt", "{root}/img.png", "--policy", "dense"], files, capsys),
                           r"img.png: Image size \(1024 pixels\) exceeds limit of 600 pixels \(PIL")


def test_a_masked_class_with_a_minus_infinite_logit_is_a_result(files, capsys):
    model = V.sparsify(build_model("small_resnet", num_classes=10), "unstructured")
    with torch.no_grad():
        model.fc.bias[0] = float("-inf")
    save_checkpoint(files / "neg_inf.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32))
    assert main(["infer", str(files / "neg_inf.pt"), str(files / "img.png"), "--policy", "sparse", "--json",
                 "--top", "10"]) == 0
    rows = json.loads(capsys.readouterr().out)  # strict JSON: no NaN
    assert {entry["class"]: entry["probability"] for entry in rows[0]["top"]}[0] == 0.0


def test_sigterm_while_writing_removes_the_partial_file_and_keeps_the_old_one(files, capsys, monkeypatch):
    from vpns_fast.files import atomic_write

    out = files / "kept.bin"
    out.write_bytes(b"the user's file")

    def killed_midway(args):
        def write(f):
            f.write(b"half of it")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        atomic_write(out, write, overwrite=True)

    monkeypatch.setattr(cli, "_cmd_export", killed_midway)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["export", str(files / "m.pt"), "--format", "dense", "--out", str(out), "--force"]) == 143
    assert capsys.readouterr().err.strip() == "vpns export: terminated"
    assert out.read_bytes() == b"the user's file"
    assert not [name for name in os.listdir(files) if name.startswith(".tmp-")]
    assert signal.getsignal(signal.SIGTERM) is previous  # put back for whoever called main()


@pytest.fixture
def sigint_handler():
    """Sets SIGINT's handler for the test (pytest's own may be SIG_IGN, e.g. under `nohup ... &`), then puts
    back the one it found."""
    found = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, found)


def test_ctrl_c_during_torchs_import_waits_for_the_import(monkeypatch, sigint_handler):
    import builtins

    sigint_handler(signal.default_int_handler)
    real_import, finished = builtins.__import__, []

    def interrupted_import(name, *args, **kwargs):
        if name == "numpy" and not finished:
            signal.raise_signal(signal.SIGINT)  # arrives inside the import, as a Ctrl-C at start-up does
            finished.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(KeyboardInterrupt):
        cli._import_torch_uninterrupted()
    assert finished == ["numpy"]  # the import ran to its end before the interrupt was raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handler is back


def test_ctrl_c_ignored_at_start_stays_ignored(monkeypatch, sigint_handler):
    """A command started with SIGINT ignored (`nohup vpns ... &`) is not interrupted by one during the import."""
    import builtins

    sigint_handler(signal.SIG_IGN)
    real_import, raised = builtins.__import__, []

    def interrupted_import(name, *args, **kwargs):
        if name == "numpy" and not raised:
            signal.raise_signal(signal.SIGINT)
            raised.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    cli._import_torch_uninterrupted()  # no KeyboardInterrupt
    assert raised == ["numpy"] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_sigint_handler_set_outside_python_is_left_alone(monkeypatch):
    """signal.getsignal says None for a handler an embedding program installed; signal.signal could not put it
    back, so the import leaves SIGINT as it found it."""
    calls = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: calls.append((signum, handler)))
    cli._import_torch_uninterrupted()
    assert calls == []


@pytest.mark.parametrize("raised, pattern", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 1 bytes"), "out of memory .*can't allocate memory.*; try a smaller --batch$"),
    (PermissionError(13, "Permission denied", "/some/where.pt"), "error: /some/where.pt: Permission denied$"),
    (MemoryError(), r"out of memory \(MemoryError\); try a smaller --batch$"),  # Python's own: no message
    # a package a command imports, missing: an optional extra by its extra, another by its name (an outside review:
    # a traceback)
    (ModuleNotFoundError("No module named 'onnx'", name="onnx"),
     r"this command needs the package 'onnx', which is not installed: pip install 'vpns_fast\[onnx\]'$"),
    (ModuleNotFoundError("No module named 'safetensors'", name="safetensors"),
     r"needs the package 'safetensors', which is not installed: pip install safetensors$"),
])
def test_out_of_memory_and_file_errors_are_one_line(files, capsys, monkeypatch, raised, pattern):
    def failing(args):
        raise raised

    monkeypatch.setattr(cli, "_cmd_bench_infer", failing)
    _assert_one_line_error(*_run(["bench-infer", "{root}/m.pt"], files, capsys), pattern)


def test_infer_reads_its_images_before_deploying(files, capsys, monkeypatch):
    """A typo in an image's name cost the whole deploy (and its timings) before the error (an outside review);
    so did a file that is no image, or a cut-off one."""
    from vpns_fast.deploy import runtime

    def deploy(*args, **kwargs):
        raise AssertionError("deployed before the images were checked")

    monkeypatch.setattr(runtime, "deploy", deploy)
    for image, expected in (("nothing.png", "nothing.png: cannot read the image: No such file"),
                            ("afolder", "afolder: cannot read the image: it is a folder"),
                            ("afile.txt", "afile.txt: not an image file PIL can read"),
                            ("cut.png", "cut.png: cannot read the image: image file is truncated")):
        _assert_one_line_error(*_run(["infer", "{root}/m.pt", "{root}/img.png", f"{{root}}/{image}"], files,
                                     capsys), expected)


def test_out_of_memory_hints_name_what_the_command_has(files, capsys, monkeypatch):
    """`vpns infer` ran out of memory with the advice to try a smaller --batch, a flag it does not have."""
    def failing(args):
        raise MemoryError()

    for command, argv, hint in (("infer", ["infer", "{root}/m.pt", "{root}/img.png"],
                                 "try smaller images or fewer at once"),
                                ("report", ["report", "{root}/m.pt"], "try a smaller --input-size"),
                                ("export", ["export", "{root}/m.pt", "--format", "dense", "--out", "{root}/o.st"],
                                 None)):
        monkeypatch.setattr(cli, f"_cmd_{command}", failing)
        code, err = _run(argv, files, capsys)
        _assert_one_line_error(code, err, r"out of memory \(MemoryError\)" + (f"; {hint}$" if hint else "$"))


def test_a_checkpoint_command_given_an_export_says_so(files, capsys, tmp_path):
    V.export(str(files / "m.pt"), "dense", tmp_path / "m.safetensors")
    for argv in (["report", str(tmp_path / "m.safetensors")],
                 ["export", str(tmp_path / "m.safetensors"), "--format", "sparse", "--out", str(tmp_path / "o")]):
        _assert_one_line_error(*_run(argv, files, capsys), "m.safetensors is a vpns_fast export, not a checkpoint")


def test_an_export_whose_tag_lies_deep_in_its_header_is_still_named_an_export(files, capsys, tmp_path):
    """The header's metadata is a map in no set order: a sparse export of MobileNetV3-Small had its metadata JSON
    first and the format tag at byte ~12,200, past the 4096 bytes looked at, and `vpns report` said only "no format
    tag" (an outside trial). The same export, its header rewritten with the tag last, must read as an export."""
    import struct

    from vpns_fast.deploy.export import FORMAT_PREFIX
    from vpns_fast.pruning.checkpoint import EXPORT_TAG_PREFIX

    assert EXPORT_TAG_PREFIX == FORMAT_PREFIX  # the checkpoint layer's copy of the tag
    V.export(str(files / "m.pt"), "sparse", tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__")
    tag = metadata.pop("vpns_fast.format")
    # the tensors' entries and the meta JSON first, the tag last
    header = {**header, "__metadata__": {**metadata, "vpns_fast.format": tag}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    assert deep.read_bytes().find(b'"vpns_fast.export.sparse"') > 4096
    _assert_one_line_error(*_run(["report", str(deep)], files, capsys),
                           "deep.safetensors is a vpns_fast export, not a checkpoint")
    assert main(["infer", str(deep), str(files / "img.png"), "--policy", "dense"]) == 0  # still a valid export


def test_report_refuses_an_input_size_over_the_memory_up_front(files, capsys, monkeypatch):
    """`vpns report --input-size 3 8192 8192` (within its documented limit) was killed by the kernel without a
    word: the FLOP count holds every layer's output. Its memory is estimated first (at about 224 x 224, scaled by
    the pixels) and a size over what is available is refused by name."""
    from vpns_fast import environment

    monkeypatch.setattr(environment, "available_memory_bytes", lambda: 8 << 20)  # 8 MiB
    _assert_one_line_error(*_run(["report", "{root}/m.pt", "--input-size", "3", "512", "512"], files, capsys),
                           r"out of memory \(input_size \(3, 512, 512\): counting FLOPs at that size holds every "
                           r"layer's output, about [0-9]+ MiB; 8 MiB are available\); try a smaller --input-size$")
    assert main(["report", str(files / "m.pt"), "--input-size", "3", "32", "32"]) == 0  # no larger: not estimated


def test_warnings_are_one_line(files, capsys, monkeypatch):
    import warnings

    def warns(args):
        warnings.warn("the checkpoint has no checksum", UserWarning, stacklevel=1)
        return 0

    def show(message, category, filename, lineno, file=None, line=None):  # Python's display (pytest records)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(cli, "_cmd_info", warns)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        assert main(["info"]) == 0
    assert capsys.readouterr().err == "vpns info: warning: the checkpoint has no checksum\n"
    assert warnings.formatwarning is not None and "vpns" not in warnings.formatwarning("x", UserWarning, "f", 1)


def test_a_forked_child_ends_on_sigterm_as_any_process_does(files, monkeypatch):
    """A DataLoader worker forked while `vpns` runs inherits its SIGTERM handler; it must end at once, not
    raise the main process's exception inside the worker."""
    import multiprocessing

    outcome = {}

    def forks(args):
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGTERM)
        child.join(10)
        outcome["exitcode"] = child.exitcode
        return 0

    monkeypatch.setattr(cli, "_cmd_info", forks)
    assert main(["info"]) == 0
    assert outcome["exitcode"] == -signal.SIGTERM


def test_a_missing_module_of_this_project_is_a_defect_not_a_users_error(files, monkeypatch):
    def failing(args):
        raise ModuleNotFoundError("No module named 'vpns_fast.nothing'", name="vpns_fast.nothing")

    monkeypatch.setattr(cli, "_cmd_bench_infer", failing)
    with pytest.raises(ModuleNotFoundError):
        main(["bench-infer", str(files / "m.pt")])


def test_info_reports_a_torchvision_that_fails_to_import(monkeypatch, capsys):
    """An outside review: `vpns info`, the tool for a broken environment, crashed on a torchvision built for
    another torch (`operator torchvision::nms does not exist`)."""
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # its import raises ImportError
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torchvision     fails to import:" in out
    assert "cpu_engine      unavailable: vpns_fast.deploy needs torchvision" in out
