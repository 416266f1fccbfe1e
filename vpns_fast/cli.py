"""The ``vpns`` command line."""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import threading
import time
import warnings

from vpns_fast._version import __version__
from vpns_fast.errors import NetworkNotRebuildable, SettingError, exception_reason


def _at_least(value, flag: str, least: int) -> None:
    if value is not None and value < least:
        raise ValueError(f"{flag}: expected an integer >= {least}, got {value}")


def _check_device(name: str) -> None:
    """Before any work: a device that cannot be parsed or is not there is the user's error."""
    from vpns_fast.environment import resolve_device

    try:
        resolve_device(name)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


def _check_input_file(path: str, what: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: is a folder; expected a file (e.g. OUT/runs/RUN/best.pt)")
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as exc:  # no permission, a symlink loop, ...
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def _check_output_file(path: str) -> None:
    if not path:
        raise ValueError("--out: expected a file path, got an empty string")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(f"--out {path}: is a folder; expected a file path")
    _check_parents_are_folders(path)


def _check_output_folder(path: str | None) -> None:
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path}: is a file; expected a folder (new, or an existing vpns run)")
    _check_parents_are_folders(path)


def _check_parents_are_folders(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        if os.path.islink(parent):
            raise ValueError(f"--out {path}: {parent} is a symbolic link to nothing (broken, or a loop)")
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--out {path}: {parent} is a file, not a folder")


# --input-size of `vpns report`: the FLOP count runs one image, whose activations grow with H x W. 8192 x 8192
# is far beyond any vision model's input; 3 x 100000 x 100000 in float32 is 120 GB for the input alone.
MAX_REPORT_PIXELS = 8192 * 8192


def _deployment_engines() -> dict:
    """What decides how `vpns infer` / `bench-infer` / `export --format onnx` run here: the sparse CPU engine (its
    kernel's instruction set, or why it is unavailable) and the ONNX packages' versions (None: not installed)."""
    import importlib.metadata

    try:
        import torchvision
    except Exception as exc:  # missing, or built for another torch (`torchvision::nms does not exist`)
        torchvision_version = f"fails to import: {_one_line(exc)}"
        engine = "unavailable: vpns_fast.deploy needs torchvision"
        try:  # installed or not, without importing it (its import is not what is broken here)
            onnxruntime = importlib.metadata.version("onnxruntime")
        except importlib.metadata.PackageNotFoundError:
            onnxruntime = None
    else:
        torchvision_version = torchvision.__version__
        from vpns_fast.deploy import sparse_cpu
        from vpns_fast.deploy.baselines import onnxruntime_version

        available, reason = sparse_cpu.available()
        engine = f"available, {sparse_cpu.kernel_isa()} kernel" if available else f"unavailable: {reason}"
        onnxruntime = onnxruntime_version()
    try:
        onnxscript = importlib.metadata.version("onnxscript")
    except importlib.metadata.PackageNotFoundError:
        onnxscript = None
    return {"torchvision": torchvision_version, "cpu_engine": engine, "onnxruntime": onnxruntime,
            "onnxscript": onnxscript}


def _cmd_info(args) -> int:
    from vpns_fast.environment import describe

    info = {**describe(), **_deployment_engines()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("vpns_fast", "python", "torch", "torchvision", "triton", "cuda", "cuda_available", "cpu_threads",
                "forced_backend", "cpu_engine", "onnxruntime", "onnxscript"):
        print(f"{key:15s} {info[key]}")
    print(f"{'devices':15s} {', '.join(info['devices'])}")
    print("backends:")
    for name, rep in info["backends"].items():
        print(f"  {name:7s} ops: {', '.join(rep['ops']) or '(none yet)'}")
        for dev, status in rep["devices"].items():
            state = "available" if status["available"] else f"unavailable: {status['reason']}"
            print(f"  {'':7s} {dev:5s} {state}")
    return 0


# What to lower when a command runs out of memory (`vpns infer` had been told to try a --batch it does not have)
_OUT_OF_MEMORY_HINTS = {"prune": "try a smaller --batch-size", "transfer": "try a smaller --batch-size",
                        "eval": "try a smaller --batch-size", "resume": "resume on a machine with more memory",
                        "bench-infer": "try a smaller --batch", "tune": "try a smaller --batch",
                        "report": "try a smaller --input-size", "infer": "try smaller images or fewer at once"}


def _cmd_report(args) -> int:
    from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint
    from vpns_fast.pruning.masking import density_report

    _check_input_file(args.checkpoint, "checkpoint")
    shape = " ".join(map(str, args.input_size or ()))
    if args.input_size is not None and (min(args.input_size) < 1 or args.input_size[1] * args.input_size[2] >
                                        MAX_REPORT_PIXELS):
        raise ValueError(f"--input-size: expected three integers >= 1 (C H W), H x W at most {MAX_REPORT_PIXELS:,}, "
                         f"got {shape}")
    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    input_size = args.input_size or payload.get("input_size")
    try:
        report = density_report(model, input_size)
    except ValueError as exc:  # the FLOP count runs the model on one input of that size: named by the flag here
        if args.input_size is None or not isinstance(exc.__cause__, RuntimeError):
            raise
        raise ValueError(f"--input-size {shape}: the model cannot run on it "
                         f"({exception_reason(exc.__cause__, with_type=False)})") from None
    model_name = payload["model"]["name"] or payload["model"].get("class")
    if args.json:  # what the text's first line says, too (the JSON had only the table: an outside review)
        print(json.dumps({"checkpoint": args.checkpoint, "model": model_name, "granularity": payload["granularity"],
                          "input_size": list(input_size) if input_size else None, **report.to_dict()}, indent=2))
    else:
        print(f"checkpoint: {args.checkpoint}  model: {model_name}  "
              f"granularity: {payload['granularity']}  input: {input_size}")
        print(report)
    return 0


def _csv(kind):
    def parse(text):
        entries = text.split(",")
        if text.strip() and not all(entry.strip() for entry in entries):  # "1,,2" or "1,": a value lost, not ignored
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got an empty entry "
                                             f"in {text!r}")
        try:
            return tuple(kind(x) for x in entries if x.strip())
        except ValueError as exc:  # int()'s own message ("invalid literal for int() with base 10") named no flag
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from exc
    return parse


def _assignments(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected GROUP=VALUE, got {text!r}")
    group, value = text.split("=", 1)
    return group.strip(), value.strip()


# The names the help lists, written out: the modules that define them import torch, and `vpns --help`
# must not (tests/test_cli_fast.py keeps these equal to vpns_fast.data.DATASETS and the search methods of
# vpns_fast.pruning.methods.METHODS).
HELP_DATASETS = ("digits", "cifar10", "cifar100", "tiny-imagenet", "imagefolder", "synthetic")
HELP_METHODS = ("vpns", "hydra", "omp", "random", "imp", "dense", "omp+vp", "random+vp", "imp+vp")


def _add_training_flags(p: argparse.ArgumentParser, transfer: bool = False) -> None:
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(HELP_DATASETS)} (default: digits, "
                   "embedded)")
    p.add_argument("--data-dir", help="where the dataset lives (CIFAR pickles, Tiny-ImageNet, ImageFolder)")
    p.add_argument("--download", action="store_true", help="download CIFAR / Tiny-ImageNet if missing (online)")
    p.add_argument("--model", default="small_resnet",
                   help="a torchvision classification model (resnet18, mobilenet_v3_small, vit_b_16, ...), "
                   "timm:NAME (needs pip install 'vpns_fast[timm]'), package.module:factory for your own network "
                   "(importable, e.g. on PYTHONPATH; called with num_classes=N when it takes it), or "
                   "cifar_resnet18 / small_resnet (default: small_resnet)")
    p.add_argument("--model-arg", action="append", type=_assignments, default=[], metavar="KEY=VALUE",
                   help="an argument for the model's builder or factory, VALUE read as JSON when it parses (e.g. "
                   "--model-arg image_size=32 for a torchvision ViT at 32x32); repeatable")
    p.add_argument("--weights", help="dense weights: a .pth/.safetensors file, or 'pretrained' for torchvision's "
                   "ImageNet weights (hub cache, else download). Default: train densely from scratch "
                   "(--pretrain-epochs) or start from random init")
    if not transfer:
        p.add_argument("--method", default="vpns", type=_csv(str),
                       help=f"comma-separated methods: {', '.join(HELP_METHODS)}")
        p.add_argument("--density", default=(0.1,), type=_csv(float),
                       help="comma-separated fractions of weights kept, e.g. 0.5,0.2,0.1 (default 0.1)")
    p.add_argument("--epochs", type=int, help="epochs of each stage (sets both --search-epochs and --finetune-epochs)")
    p.add_argument("--search-epochs", type=int, help="stage-1 epochs (default 30)")
    p.add_argument("--finetune-epochs", type=int, help="stage-2 epochs, and of each IMP round (default 30)")
    p.add_argument("--hydra-epochs", type=int, help="HYDRA's epochs per stage when they differ from the others "
                   "(the paper gives HYDRA 60 against VPNs' 30)")
    p.add_argument("--pretrain-epochs", type=int, default=0, help="dense training from scratch first when no "
                   "--weights are given (cached as OUT/dense.pt)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--protocol", choices=("release", "prompted"), default="release",
                   help="release: prompted + unprompted steps, test without prompt; prompted: prompt everywhere")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast mixed precision")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bitwise-repeatable on CPU)")
    p.add_argument("--prompt", choices=("pad", "fix", "random", "expansive"), default="pad")
    p.add_argument("--prompt-size", type=int, help="pad width / square side (default 16 at 224, scaled)")
    p.add_argument("--image-size", type=int, help="image size fed to the prompt (default: the network input)")
    p.add_argument("--input-size", type=int, help="network input size = prompt output (default: the model's, "
                   "224 for torchvision models, 32 for the small ones)")
    p.add_argument("--label-mapping", choices=("auto", "flm", "ilm", "none"), default="auto")
    p.add_argument("--scope", choices=("global", "layer"), default="global", help="VPNs threshold scope")
    p.add_argument("--hydra-scope", choices=("global", "layer"), default="layer", help="HYDRA threshold scope")
    p.add_argument("--granularity", choices=("unstructured", "kernel", "channel"), default="unstructured")
    p.add_argument("--structured", action="store_true",
                   help="structured channel mode for ResNets and VGGs (docs/method.md §9): shared residual-group "
                   "channel masks, input-channel masking, dense classifier, first 5 convs capped at 25%% channel "
                   "sparsity; needs --granularity channel")
    p.add_argument("--lr", action="append", type=_assignments, default=[], metavar="GROUP=LR",
                   help="learning rate of a group: search_scores, search_prompt, hydra_scores, finetune_weights, "
                   "finetune_prompt, pretrain (repeatable)")
    p.add_argument("--optimizer", action="append", type=_assignments, default=[], metavar="GROUP=NAME",
                   help="sgd, adam or adamw for a group (repeatable)")
    p.add_argument("--weight-decay", action="append", type=_assignments, default=[], metavar="GROUP=WD")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--limit", type=int, help="cap samples per split (quick runs)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training images held out as val, in [0, 1) (default 0.1; 0: no val, the "
                        "last epoch is kept)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the val draw, in [0, 2**32), apart from --seed so that every seed sees the same "
                        "split (default 0); synthetic data also draws its images from it")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers")
    p.add_argument("--keep-checkpoints", choices=("last", "all"), default="last")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or tables: one plain line per epoch on stdout (with the job's ETA)")
    p.add_argument("--logger", type=_csv(str), default=(), metavar="NAME[,NAME]",
                   help="also log every epoch's metrics (as in OUT/metrics.csv), the learned prompt and the final "
                   "table to tensorboard (OUT/tensorboard/; pip install 'vpns_fast[tensorboard]') and/or wandb "
                   "(offline unless WANDB_MODE is set; pip install 'vpns_fast[wandb]')")
    p.add_argument("--out", help="output directory (results.json, checkpoints, plots)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _check_dataset(name: str, data_dir: str | None = None, config_file: str | None = None) -> None:
    """--dataset known, and --data-dir given where the dataset reads its files from a folder (unless a --config
    file may set it): the library's own message names ``data_dir``, not the flag (an outside review)."""
    from vpns_fast.data import DATASETS, FOLDER_DATASETS, canonical_dataset_name

    try:
        key = canonical_dataset_name(name)
    except ValueError:
        raise ValueError(f"--dataset: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}") from None
    if key in FOLDER_DATASETS and data_dir is None and config_file is None:
        raise ValueError(f"--data-dir: --dataset {name} reads its files from a folder; give that folder (the README's "
                         "datasets list says what it holds)")


def _config_from_args(args, methods=None, mask_from=None):
    """The job's TrainConfig, from the flags (and the --config file), and the function that names a SettingError
    raised later by whoever set its field."""
    from vpns_fast.training.trainer import TrainConfig

    _check_dataset(args.dataset, args.data_dir, getattr(args, "config", None))
    _check_device(args.device)
    _check_output_folder(args.out)
    _at_least(getattr(args, "epochs", None), "--epochs", 0)  # not a field: checked here, even when overridden

    optimizers: dict[str, dict] = {}
    for flag, key, cast in (("lr", "lr", float), ("optimizer", "name", str), ("weight_decay", "weight_decay", float)):
        for group, value in getattr(args, flag):
            try:
                optimizers.setdefault(group, {})[key] = cast(value)
            except ValueError:
                raise ValueError(f"--{flag.replace('_', '-')} {group}={value}: expected a number") from None
    epochs = {}
    if args.epochs is not None:
        epochs = {"search_epochs": args.epochs, "finetune_epochs": args.epochs}
    for name in ("search_epochs", "finetune_epochs"):
        if getattr(args, name) is not None:
            epochs[name] = getattr(args, name)
    if getattr(args, "structured", False) and args.granularity != "channel" and getattr(args, "config", None) is None:
        raise ValueError("--structured needs --granularity channel")
    model_kwargs = {key: _json_or_text(value) for key, value in args.model_arg}
    values = dict(
        dataset=args.dataset, data_dir=args.data_dir, download=args.download, model=args.model, weights=args.weights,
        model_kwargs=model_kwargs,
        methods=methods or args.method, densities=getattr(args, "density", (1.0,)),
        pretrain_epochs=args.pretrain_epochs,
        hydra_epochs=getattr(args, "hydra_epochs", None), batch_size=args.batch_size, seed=args.seed,
        protocol=args.protocol, device=args.device, amp=args.amp,
        channels_last=args.channels_last, deterministic=args.deterministic, prompt=args.prompt,
        prompt_size=args.prompt_size, image_size=args.image_size, input_size=args.input_size,
        label_mapping=args.label_mapping, scope=args.scope,
        hydra_scope=args.hydra_scope, granularity=args.granularity, structured=getattr(args, "structured", False),
        optimizers=optimizers, schedule=args.schedule,
        limit=args.limit, val_fraction=args.val_fraction, split_seed=args.split_seed, num_workers=args.num_workers,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress, logger=args.logger, out=args.out, mask_from=mask_from, **epochs)
    settings, overrides = None, {}  # the config file's settings, and the flags that override them
    try:
        if getattr(args, "config", None) is None:
            config = TrainConfig(**values)
        else:
            from vpns_fast.training.config_file import config_from_settings, read_config_file

            given = {name for flag in args.given_flags for name in _FLAG_FIELDS.get(flag, (flag,))}
            overrides = {key: value for key, value in values.items() if key in given}
            settings = read_config_file(args.config)
            config = config_from_settings(args.config, settings, overrides)
    except SettingError as exc:
        raise _named(exc, args, settings, overrides) from None
    _check_output_folder(config.out)
    return config, functools.partial(_named, args=args, settings=settings, overrides=overrides)


def _named(error: SettingError, args, settings: dict | None, overrides: dict) -> Exception:
    """``error`` told with whoever set what it refuses: the config file (where its ``settings`` set it and no flag
    did), else the flag, else as it is."""
    if settings is not None:
        from vpns_fast.training.config_file import named_by_file

        error = named_by_file(error, args.config, settings, overrides)
    return _named_by_flag(error, args) if isinstance(error, SettingError) else error


def _train(args, methods=None, mask_from=None) -> None:
    """The job of `vpns prune` / `vpns transfer`. A setting refused while it runs, in the data stage (``data_dir``
    without the dataset's files, a ``val_fraction`` that leaves no image, a ``num_classes`` not the dataset's), is
    named as one refused when the config is made: by the flag, or the config file, that set it."""
    from vpns_fast.training.trainer import TwoStageTrainer

    config, named = _config_from_args(args, methods, mask_from)
    try:
        TwoStageTrainer(config, force=args.force).run()
    except SettingError as exc:
        raise named(exc) from None


def _named_by_flag(error: SettingError, args) -> ValueError:
    """TrainConfig's refusal of a setting told with the flag that set it (``--batch-size: expected ...``); else as it
    is (a config file's setting is already named with the file). Of several flags that set the field, the one named
    after it (``--search-epochs`` beside ``--epochs``, which it overrides); of the optimizer flags, the one that set
    the refused group and key."""
    flags = [flag for flag in sorted(args.given_flags) if error.field in _FLAG_FIELDS.get(flag, (flag,))]
    if error.field == "optimizers" and error.part:
        group, key = error.part[0], error.part[1] if len(error.part) > 1 else None
        flags = [flag for flag in flags if group in dict(getattr(args, flag))
                 and key in (None, _OPTIMIZER_FLAG_KEYS[flag])]
    elif error.field in flags:
        flags = [error.field]
    return ValueError(f"--{flags[0].replace('_', '-')}: {error.reason}") if len(flags) == 1 else error


# The key of an optimizer group each optimizer flag sets.
_OPTIMIZER_FLAG_KEYS = {"lr": "lr", "optimizer": "name", "weight_decay": "weight_decay"}
# The TrainConfig fields a flag sets where their names differ (every other flag sets the field of its name).
_FLAG_FIELDS = {"method": ("methods",), "density": ("densities",), "model_arg": ("model_kwargs",),
                "no_progress": ("progress",), "epochs": ("search_epochs", "finetune_epochs"),
                "lr": ("optimizers",), "optimizer": ("optimizers",), "weight_decay": ("optimizers",)}


def _given_flags(argv: list[str]) -> set[str]:
    """The options given on the command line (their dests): parsed again with every default suppressed, the
    namespace holds only those, so a flag's default never overrides a --config file."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.option_strings:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func"}


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _cmd_prune(args) -> int:
    _train(args)
    return 0


def _cmd_transfer(args) -> int:
    methods = ("transfer+vp",) if args.with_prompt else ("transfer",)
    _check_input_file(args.checkpoint, "checkpoint")
    _train(args, methods=methods, mask_from=args.checkpoint)
    return 0


def _cmd_resume(args) -> int:
    from vpns_fast.training.trainer import resume

    resume(args.out_dir, progress=args.progress)
    return 0


def _cmd_eval(args) -> int:
    from vpns_fast.training.evaluation import evaluate_checkpoint

    _check_input_file(args.checkpoint, "checkpoint")
    _check_dataset(args.dataset, args.data_dir)
    _check_device(args.device)
    _at_least(args.batch_size, "--batch-size", 1)
    _at_least(args.limit, "--limit", 1)
    result = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_dir, split=args.split,
                                 batch_size=args.batch_size, device=args.device, limit=args.limit)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:18s} {value}")
    return 0


def _cmd_export(args) -> int:
    from vpns_fast.deploy.export import MissingDependencyError, export
    from vpns_fast.files import never_replaced

    _check_input_file(args.checkpoint, "checkpoint")
    _check_output_file(args.out)
    if os.path.exists(args.out) and os.path.samefile(args.out, args.checkpoint):  # even with --force
        raise ValueError(f"--out {args.out}: is the checkpoint being exported; write the export to another file")
    problem = never_replaced(args.out)
    if problem is not None:  # before "exists": --force would not replace it either
        raise ValueError(f"--out {problem}")
    if os.path.lexists(args.out) and not args.force:  # export()'s own message names its argument, force=True
        raise ValueError(f"--out {args.out}: exists; pass --force to replace it")
    if args.slim and args.format != "onnx":
        raise ValueError(f"--slim: only for --format onnx (--format {args.format} would ignore it; --format slim "
                         "writes the slimmed network)")
    try:
        meta = export(args.checkpoint, args.format, args.out, force=args.force, slim=args.slim)
    except MissingDependencyError as exc:
        print(f"vpns export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        folder = os.path.dirname(os.path.abspath(args.out))
        if not exc.filename or os.path.dirname(os.path.abspath(os.fsdecode(exc.filename))) != folder:
            raise  # a message of ours, or about another file
        # the output's folder cannot be written (permissions, a read-only or special file system)
        raise ValueError(f"--out {args.out}: cannot write it ({exc.strerror or exc})") from None
    line = f"wrote {args.out} ({args.format})"
    if args.format == "sparse":
        sizes = meta["bytes"]
        line += f": weights {sizes['weights_encoded']:,} bytes encoded vs {sizes['weights_dense']:,} dense"
    elif args.format == "slim":
        line += f": {meta['channels_dropped']} conv channels removed"
        if meta.get("units_dropped"):
            line += f", {meta['units_dropped']} classifier units removed"
    print(line)
    return 0


def _check_threads(threads: int | None) -> None:
    """``--threads`` of infer / bench-infer: None (torch's) or 1 to 4 per CPU."""
    _at_least(threads, "--threads", 1)
    most_threads = 4 * (os.cpu_count() or 1)
    if threads is not None and threads > most_threads:  # OpenMP fails to start, or crashes, far above
        raise ValueError(f"--threads: expected at most {most_threads} (4 per CPU), got {threads}")


def _cmd_infer(args) -> int:
    import torch

    from vpns_fast.data import decode_image, resize_batch
    from vpns_fast.deploy.runtime import deploy
    from vpns_fast.environment import torch_threads

    _at_least(args.top, "--top", 1)
    _check_device(args.device)
    _check_threads(args.threads)
    _check_input_file(args.path, "path")
    with torch_threads(args.threads):
        # every image decoded once before the model is deployed (and, under --policy measure, timed), and let go:
        # a typo in an image's name, or a file that is no image, had cost the whole deploy first (4.2 s for
        # MobileNetV3 at 32 px, an outside review); holding them all at full size would cost their pixels' memory
        for path in args.images:
            decode_image(path)
        module = deploy(args.path, args.device, policy=args.policy, winograd=not args.no_winograd)
        # decoded again one at a time and resized exactly as the datasets' test-style transform does
        images = torch.stack([resize_batch(decode_image(path), module.image_shape) for path in args.images])
        probabilities = module(images).float().softmax(1).cpu()
    nan_rows = probabilities.isnan().any(1).nonzero().flatten().tolist()
    if nan_rows:  # never printed or written as a result
        raise ValueError(f"{args.images[nan_rows[0]]}: the model computes NaN for this image (infinite logits "
                         "of opposite signs, or an overflow); no result")
    top = probabilities.topk(min(args.top, probabilities.shape[1]), dim=1)
    names = module.class_names
    rows = []
    for path, values, indices in zip(args.images, top.values.tolist(), top.indices.tolist()):
        labels = [{"class": i, "name": names[i] if names and i < len(names) else None, "probability": v}
                  for v, i in zip(values, indices)]
        rows.append({"image": path, "top": labels})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        shown = ", ".join(f"{lab['name'] if lab['name'] is not None else lab['class']} ({lab['probability']:.3f})"
                          for lab in row["top"])
        print(f"{row['image']}: {shown}")
    return 0


# bench-infer's --iters and --warmup: rounds of one call of each engine; more than this is a typo, not a benchmark
MOST_BENCH_ROUNDS = 100_000


def _cmd_bench_infer(args) -> int:
    from vpns_fast.deploy.runtime import benchmark_inference

    if not args.batch:
        raise ValueError("--batch: expected comma-separated batch sizes, got none")
    for batch in args.batch:
        _at_least(batch, "--batch", 1)
    if len(set(args.batch)) != len(args.batch):
        raise ValueError(f"--batch: expected distinct batch sizes, got {','.join(map(str, args.batch))}")
    for flag, least in (("iters", 1), ("warmup", 0)):
        _at_least(getattr(args, flag), f"--{flag}", least)
        if getattr(args, flag) > MOST_BENCH_ROUNDS:  # 10^23 rounds ran until killed (an outside review)
            raise ValueError(f"--{flag}: expected at most {MOST_BENCH_ROUNDS}, got {getattr(args, flag)}")
    _check_threads(args.threads)
    _check_device(args.device)
    _check_input_file(args.path, "path")
    rows = benchmark_inference(args.path, args.batch, args.device, args.threads, args.iters, args.warmup,
                               args.policy, layers=args.layers, winograd=not args.no_winograd)
    if args.json:
        print(json.dumps(rows, indent=2, allow_nan=False))
    else:
        _print_bench_rows(rows, args.layers)
    _warn_where_not_faster(rows)
    return 0


def _warn_where_not_faster(rows: list[dict]) -> None:
    """A warning on stderr (with ``--json`` too) for each batch where the deployed module is not faster than a
    baseline it was timed against: dense torch, or ONNX Runtime, which a deployer would run instead."""
    for r in rows:
        if r["backend"] != "deploy":
            continue
        for other in ("dense-torch", "onnxruntime"):
            speedup = r.get(f"speedup_vs_{other}")
            if speedup is not None and speedup < 1.0:
                print(f"vpns bench-infer: warning: at batch {r['batch']} the deployed module is not faster than "
                      f"{other} ({speedup:.2f}x); see `--layers` for the per-layer decisions", file=sys.stderr)


def _print_bench_rows(rows: list[dict], layers: bool) -> None:
    """The benchmark as a table (images/s with its p20-p80 spread over rounds), the deployed module's
    speedups with theirs, and with ``layers`` its per-layer decisions."""
    # as wide as the longest engine name (ONNX Runtime's names its exporter): cut, it read "onnxruntime (torch.expor"
    width = max([24] + [len(str(r["engine"])) for r in rows if "skipped" not in r])
    print(f"{'batch':>5s}  {'backend':12s} {'network':8s} {'engine':{width}s} {'images/s':>9s} {'p20-p80':>15s} "
          f"{'latency ms':>10s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['batch']:5d}  {r['backend']:12s} skipped: {r['skipped']}")
            continue
        spread = f"{r['images_per_s_p20']:.1f}-{r['images_per_s_p80']:.1f}"
        print(f"{r['batch']:5d}  {r['backend']:12s} {r['network']:8s} {str(r['engine']):{width}s} "
              f"{r['images_per_s']:9.1f} {spread:>15s} {r['latency_ms']:10.3f}")
    from vpns_fast.deploy.sparse_cpu import chosen_layers_ms, format_decisions, table_flops

    for r in rows:
        if r["backend"] != "deploy":
            continue
        if r.get("call_plan"):
            print(f"batch {r['batch']}: the deployed module ran through {r['call_plan']}")
        for other in ("dense-torch", "onnxruntime"):
            if f"speedup_vs_{other}" in r:
                print(f"batch {r['batch']}: deployed vs {other}: {r[f'speedup_vs_{other}']:.2f}x "
                      f"(p20-p80 over {r['rounds']} rounds: {r[f'speedup_vs_{other}_p20']:.2f}-"
                      f"{r[f'speedup_vs_{other}_p80']:.2f}x)")
        if layers and r.get("decisions") is not None:
            peak = (f"; machine dense peak this run: {r['peak_gflops']:.1f} GFLOP/s (best of a 1024^3 sgemm "
                    f"and a 256-channel 3x3 conv)"
                    if r.get("peak_gflops") else "")
            kernel = f"; sparse kernel: {r['sparse_kernel_isa']}" if r.get("sparse_kernel_isa") else ""
            print(f"\nbatch {r['batch']}: per-layer decisions ({r.get('fusion') or 'no graph rewrites'}){kernel}{peak}")
            in_call = r.get("in_call")
            print(format_decisions(r["decisions"], r.get("peak_gflops"),
                                   in_call["layers_ms"] if in_call else None))
            if r.get("network_choice"):
                print(f"whole network: {r['network_choice']}")
            if r.get("winograd"):
                print(f"Winograd in the whole network: {r['winograd']}")
            nonzero, dense = table_flops(r["decisions"])
            if nonzero and dense:
                rate = nonzero / (r["latency_ms"] * 1e6)
                share = f" ({100 * rate / r['peak_gflops']:.0f}% of the peak)" if r.get("peak_gflops") else ""
                print(f"end to end: {rate:.1f} GFLOP/s on the nonzero weights{share}; the FLOP-ratio limit of "
                      f"the speedup over dense is {dense / nonzero:.1f}x")
            layers_ms, untimed = chosen_layers_ms(r["decisions"])
            if layers_ms:
                rest = r["latency_ms"] - layers_ms
                print(f"where the time goes: the layers above, each timed alone, sum to {layers_ms:.2f} ms of the "
                      f"network's {r['latency_ms']:.2f} ms ({100 * layers_ms / r['latency_ms']:.0f}%)"
                      + (f", {untimed} layers not timed" if untimed else "")
                      + (f"; the other {rest:.2f} ms is the work outside them (activations, adds, pooling not "
                         f"listed, the input stage, Python) and their cache misses inside the network" if rest > 0
                         else "; more than the whole network: the layers' timings (at conversion) and the "
                              "network's (here) met different load on the machine, so this split says nothing"))
            if in_call:
                listed = {d["name"] for d in r["decisions"]}
                ours = sum(ms for name, ms in in_call["layers_ms"].items() if name in listed)
                others = sum(ms for name, ms in in_call["layers_ms"].items() if name not in listed)
                print(f"inside whole calls (the compiled call plan's {in_call['steps']} steps each timed, medians of "
                      f"{in_call['calls']} calls of {in_call['total_ms']:.2f} ms): the layers above {ours:.2f} ms "
                      f"(column 'in call'), other modules {others:.2f} ms, torch functions and tensor methods "
                      f"{in_call['other_ms']:.2f} ms, the input stage (checks, normalization or prompt) "
                      f"{in_call['input_ms']:.2f} ms")


def _cmd_tune(args) -> int:
    import warnings

    import torch

    from vpns_fast.environment import resolve_device
    from vpns_fast.models import build_model
    from vpns_fast.ops import conv_dispatch
    from vpns_fast.pruning.masking import set_density, sparsify
    from vpns_fast.pruning.tuning import tune

    _check_device(args.device)
    device = resolve_device(args.device)
    if device.type != "cuda":
        # the default table steers every later GPU run on this machine: interpreter timings must not land there
        if args.table is None and conv_dispatch.chosen_table_path() is None:
            raise ValueError(f"--table: a tune on {device.type} times the Triton interpreter, not a GPU; name the "
                             "table file to write with --table or $VPNS_FAST_CONV_TABLE (the per-user default "
                             "table is written by GPU tunes only)")
        warnings.warn("tuning on a CPU times the Triton interpreter, not a GPU: the table it writes is only "
                      "useful for testing", stacklevel=1)
    model = sparsify(build_model(args.model, num_classes=args.num_classes), args.granularity)
    set_density(model, args.density)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    stages = ("search", "finetune", "infer") if args.stage == "all" else (args.stage,)
    rows = []
    for batch in args.batch:
        example = torch.rand(batch, 3, args.input_size, args.input_size, device=device)
        example = example.contiguous(memory_format=memory_format)
        for stage in stages:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                for row in tune(model, example, stage, path=args.table):
                    rows.append({"batch": batch, "stage": stage, **row})
    path = args.table or conv_dispatch.default_table_path()
    if args.json:
        print(json.dumps({"table": path, "rows": rows}, indent=2))
        return 0
    print(f"{'batch':>5s}  {'stage':8s}  {'layer':24s} {'igemm ms':>9s} {'cudnn ms':>9s}  choice")
    refused = False
    for r in rows:
        ms = {}
        for name in ("igemm", "cudnn"):
            value = r["ms"].get(name)
            refused |= value == float("inf")
            text = "-" if value is None else "refused" if value == float("inf") else f"{value:.3f}"
            ms[name] = f"{text:>9s}"
        print(f"{r['batch']:5d}  {r['stage']:8s}  {r['layer']:24s} {ms['igemm']} {ms['cudnn']}  {r['choice']}")
    if refused:
        print("refused: the candidate does not take this call (the implicit GEMM: groups > 1, or bf16/fp16 autocast "
              "over float32 weights, whose straight-through gradient would see the rounded weight)")
    print(f"table: {path}")
    return 0


class _OneLineErrors(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (argparse prints the whole usage first), exit 2;
    its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown options from the top parser, as "vpns: error: ...": named here
        # by the subcommand, whose --help lists what it takes
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(namespace, "command", None)
            argv = list(sys.argv[1:] if args is None else args)
            # the subcommand's name only for options given after it (`vpns --foo infer ...` is the top parser's)
            after = command in argv and all(extra in argv[argv.index(command) + 1:] for extra in extras)
            prog = f"{self.prog} {command}" if after else self.prog
            self.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see `{prog} --help`)\n")
        return namespace


NO_WINOGRAD_HELP = ("never run dense 3x3 convolutions by Winograd's F(4x4, 3x3) (used where it measures faster than "
                    "oneDNN; its float32 results lie about 5e-6 of the output's largest magnitude from the exact "
                    "ones, a direct convolution's 3e-7, and an infinite or huge (1e37) activation gives NaN over a "
                    "wider patch)")


def _add_engine_flags(parser: argparse.ArgumentParser, policy: str) -> None:
    """The CPU engine's choices, as ``vpns infer`` and ``vpns bench-infer`` take them (``policy``: the default)."""
    parser.add_argument("--policy", choices=("measure", "sparse", "dense"), default=policy,
                        help=f"CPU engine: measure (each layer timed sparse against dense, the faster kept), sparse "
                             f"(every supported layer sparse, untimed) or dense; default {policy}")
    parser.add_argument("--no-winograd", action="store_true", help=NO_WINOGRAD_HELP)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def _add_bench_infer_parser(sub) -> None:
    """`vpns bench-infer`'s subcommand and flags."""
    bench_infer = sub.add_parser("bench-infer", help="inference throughput: deployed module vs dense torch and "
                                 "ONNX Runtime", description="Images/s (median and p20-p80 over rounds) and median "
                                 "latency of the deployed module, of the dense folded network in torch and of that "
                                 "network in ONNX Runtime (when installed), per batch size, the backends taking turns "
                                 "call by call; the deployed module's speedups with their spread.")
    bench_infer.add_argument("path", help="checkpoint (.pt) or dense/sparse/slim export")
    bench_infer.add_argument("--batch", type=_csv(int), default=(1, 32),
                             help="comma-separated, distinct batch sizes (default: 1,32)")
    bench_infer.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    bench_infer.add_argument("--iters", type=int, default=10,
                             help="timed rounds, each one call of every engine in turn (default: 10; at most "
                                  f"{MOST_BENCH_ROUNDS})")
    bench_infer.add_argument("--warmup", type=int, default=2,
                             help=f"untimed calls of each engine first (default: 2; at most {MOST_BENCH_ROUNDS})")
    _add_engine_flags(bench_infer, "measure")
    bench_infer.add_argument("--json", action="store_true")
    bench_infer.add_argument("--layers", action="store_true",
                             help="also show each layer's decision (dense/sparse), measured times, GFLOP/s and why")
    bench_infer.set_defaults(func=_cmd_bench_infer)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="vpns", description="vpns_fast: prune vision models with visual "
                            "prompts and weight masks (VPNs), fast.")
    parser.add_argument("--version", action="version", version=f"vpns_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="versions, devices and which backends are available (and why not)",
                          description="Print package, torch, triton and CUDA versions, the devices, and for each "
                          "backend (torch, triton, cpp) its ops and whether it is available, with the reason.")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    report = sub.add_parser("report", help="per-layer density table of a checkpoint",
                            description="Print each Conv2d/Linear layer's shape, parameters, kept weights, density "
                            "and dense vs kept FLOPs for one image.")
    report.add_argument("checkpoint", help="a vpns_fast checkpoint file (.pt)")
    report.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="input shape for the FLOP count (default: the one stored in the checkpoint)")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(func=_cmd_report)

    prune = sub.add_parser("prune", help="find and tune sparse subnetworks (VPNs and baselines)",
                           description="For each method and density: reload the dense weights, find the mask "
                           "(stage 1), tune the subnetwork (stage 2), evaluate with and without the prompt.")
    _add_training_flags(prune)
    prune.add_argument("--config", metavar="FILE",
                       help="settings from a JSON file (YAML with PyYAML installed) with the keys of the config.json a "
                       "run writes; flags given on the command line override it. A finished run's OUT/config.json "
                       "with a new --out repeats that run")
    prune.set_defaults(func=_cmd_prune)

    resume = sub.add_parser("resume", help="continue an interrupted `vpns prune` run",
                            description="Continue the run in OUT_DIR from its last checkpoints; finished runs are "
                            "kept, the interrupted one restarts at its last completed epoch.")
    resume.add_argument("out_dir")
    resume.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (--progress) or one plain line per epoch on stdout with the job's ETA "
                        "(--no-progress); by default as the run was started")
    resume.set_defaults(func=_cmd_resume)

    evaluate = sub.add_parser("eval", help="accuracy of a checkpoint with and without its prompt",
                              description="Evaluate a vpns_fast checkpoint on a dataset split.")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test")
    evaluate.add_argument("--batch-size", type=int, default=256)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    transfer = sub.add_parser("transfer", help="fine-tune a mask found on one dataset on another",
                              description="Impose the masks of CHECKPOINT (e.g. OUT/runs/vpns_d0.1/mask.pt from a "
                              "run on dataset A) on the dense weights and fine-tune them on --dataset B.")
    transfer.add_argument("checkpoint")
    transfer.add_argument("--with-prompt", action="store_true", help="train a prompt during fine-tuning (VPNs-style)")
    _add_training_flags(transfer, transfer=True)
    transfer.set_defaults(func=_cmd_transfer)

    export = sub.add_parser("export", help="write a checkpoint as dense/sparse/slim safetensors or ONNX",
                            description="dense: folded torchvision state_dict; sparse: compressed masked weights "
                            "with checksum; slim: pruned channels removed, BN folded; onnx: the inference pipeline "
                            "(prompt, network, label mapping) as an ONNX graph (needs pip install vpns_fast[onnx]).")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=("dense", "sparse", "slim", "onnx"), required=True)
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--slim", action="store_true", help="onnx: export the slimmed network")
    export.add_argument("--force", action="store_true", help="replace an existing --out")
    export.set_defaults(func=_cmd_export)

    infer = sub.add_parser("infer", help="classify image files with a checkpoint or export",
                           description="Resize each image to the model's input size, run the deployed model "
                           "(prompt, network, label mapping) and print the top-k classes.")
    infer.add_argument("path", help="checkpoint (.pt) or dense/sparse/slim export")
    infer.add_argument("images", nargs="+")
    infer.add_argument("--top", type=int, default=5)
    infer.add_argument("--device", default="cpu")
    # measure by default, as deploy(): "sparse" is faster to start for a pruned model but runs a dense or lightly
    # pruned one (a slim or dense export) through the sparse kernel too; the README says when to pass it
    _add_engine_flags(infer, "measure")
    infer.add_argument("--json", action="store_true")
    infer.set_defaults(func=_cmd_infer)

    _add_bench_infer_parser(sub)

    tune = sub.add_parser("tune", help="measure the masked-conv dispatch (Triton implicit GEMM vs cuDNN) for a "
                          "model's shapes", description="Time both masked-conv implementations on every distinct "
                          "conv shape of the sparsified model and record the faster one in the dispatch table "
                          "that training and inference then use (see vpns_fast/ops/conv_dispatch.py).")
    tune.add_argument("--model", default="resnet18", help="a model name, as for `vpns prune --model`")
    tune.add_argument("--num-classes", type=int)
    tune.add_argument("--input-size", type=int, default=224)
    tune.add_argument("--batch", type=_csv(int), default=(256,), help="comma-separated batch sizes")
    tune.add_argument("--granularity", choices=("unstructured", "kernel", "channel"), default="unstructured")
    tune.add_argument("--density", type=float, default=0.1)
    tune.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                      help="autocast dtype, as in `vpns prune --amp`")
    tune.add_argument("--channels-last", action="store_true")
    tune.add_argument("--stage", choices=("search", "finetune", "infer", "all"), default="all",
                      help="which calls to time: search (stage 1: gradients to inputs and scores), finetune "
                      "(stage 2: inputs and weights), infer (forward only), or all three")
    tune.add_argument("--device", default="cuda")
    tune.add_argument("--table", help="table file (default $VPNS_FAST_CONV_TABLE or "
                      "~/.cache/vpns_fast/conv_dispatch.json; a tune off the GPU needs one of the first two)")
    tune.add_argument("--json", action="store_true")
    tune.set_defaults(func=_cmd_tune)
    return parser


# The optional extras of pyproject.toml by the module a command imports from them (tests/test_packaging.py keeps
# the two in step).
_EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "timm": "timm", "tensorboard": "tensorboard", "yaml": "yaml",
           "wandb": "wandb"}


def _one_line(exc: BaseException) -> str:
    """The user's error as one line. A DataLoader worker re-raises with the worker's whole traceback in
    the message; its last line is the original ``Type: message``."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that what is under way unwinds as after Ctrl-C (a partial
    output file is removed) instead of the process vanishing mid-write."""


_MAIN_PID = os.getpid()


def _terminate(signum, frame):
    if os.getpid() != _MAIN_PID:
        # a forked child (a DataLoader worker) inherited the handler: it ends as SIGTERM ends any process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def _import_torch_uninterrupted() -> None:
    """Import torch (and numpy) with Ctrl-C held back until the import is done: a KeyboardInterrupt raised
    inside numpy's import, which torch's import runs, can be swallowed there and leave numpy half-imported,
    so that the command went on to finish (replacing a file after the user's Ctrl-C) or failed much later
    with an unrelated traceback."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread: the command imports torch itself
    found = signal.getsignal(signal.SIGINT)
    if found is None:
        return  # a handler set outside Python (an embedding program): Python could not put it back
    interrupted = []
    # started with Ctrl-C ignored (`nohup vpns ... &`): it stays ignored
    held = signal.SIG_IGN if found is signal.SIG_IGN else (lambda signum, frame: interrupted.append(signum))
    previous = signal.signal(signal.SIGINT, held)
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given_flags = _given_flags(argv)
    global _MAIN_PID
    in_main_thread = threading.current_thread() is threading.main_thread()
    _MAIN_PID = os.getpid()
    started = time.time()
    previous_term = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    # warnings as one line on stderr, not Python's two with the source line that raised it (the format only:
    # where warnings go, and whether they are recorded, stays whatever the caller set)
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kwargs: (
        f"vpns {args.command}: warning" + (f" ({category.__name__})" if category is not UserWarning else "")
        + f": {message}\n")
    try:
        _import_torch_uninterrupted()
        return args.func(args)
    except NetworkNotRebuildable as exc:  # its advice (model=...) is for Python code
        print(f"vpns {args.command}: error: {exc.reason}; the command line cannot give one: load the file in Python "
              "with model=<a module of the same architecture> (vpns_fast.deploy, vpns_fast.deploy.export.export), "
              f"or {exc.TRAINING_ADVICE}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a required package uninstalled (safetensors, scikit-learn: a review)
        top = (exc.name or "").split(".")[0]
        if top in ("vpns_fast", "kernels", "bench"):
            raise  # one of this project's own modules: a defect, not the user's environment
        extra = _EXTRAS.get(top)
        fix = f"pip install 'vpns_fast[{extra}]'" if extra else f"pip install {top}" if top else "install it"
        print(f"vpns {args.command}: error: this command needs the package {top or _one_line(exc)!r}, which is "
              f"not installed: {fix}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"vpns {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command reads or writes (permissions, a full disk)
        where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
        print(f"vpns {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        run_folder = args.out_dir if args.command == "resume" else getattr(args, "out", None)
        hint = ""
        if run_folder and args.command in ("prune", "transfer", "resume"):
            # before config.json is written (the data still loading) there is nothing to resume (an outside review);
            # a config.json older than this job is the run a forced job had not yet replaced (a diff review)
            config_path = os.path.join(run_folder, "config.json")
            if not os.path.isfile(config_path):
                hint = "; nothing was written to resume"
            elif args.command != "resume" and os.path.getmtime(config_path) < started:
                hint = f"; {run_folder} still holds its earlier run, not replaced"
            else:
                hint = f"; continue with `vpns resume {run_folder}`"
        terminated = isinstance(exc, Terminated)
        print(f"vpns {args.command}: {'terminated' if terminated else 'interrupted'}{hint}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:
        from vpns_fast.environment import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        hint = _OUT_OF_MEMORY_HINTS.get(args.command, "")
        print(f"vpns {args.command}: error: out of memory "
              f"({(_one_line(exc).strip().splitlines() or [type(exc).__name__])[0][:200]})"
              + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous_format
        if in_main_thread and previous_term is not None:  # None: a handler set outside Python, kept as it was
            signal.signal(signal.SIGTERM, previous_term)


if __name__ == "__main__":
    sys.exit(main())
