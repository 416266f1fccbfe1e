"""The ``vpns`` command line."""
from __future__ import annotations

import argparse
import json
import platform
import sys


def _cmd_info(args) -> int:
    import torch

    import vpns_fast
    from vpns_fast import ops

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"unavailable ({exc.__class__.__name__})"
    info = {
        "vpns_fast": vpns_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "forced_backend": ops.forced_backend(),
        "backends": ops.backend_report(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("vpns_fast", "python", "torch", "triton", "cuda", "cuda_available", "cpu_threads", "forced_backend"):
        print(f"{key:15s} {info[key]}")
    print(f"{'devices':15s} {', '.join(info['devices'])}")
    print("backends:")
    for name, rep in info["backends"].items():
        print(f"  {name:7s} ops: {', '.join(rep['ops']) or '(none yet)'}")
        for dev, status in rep["devices"].items():
            state = "available" if status["available"] else f"unavailable: {status['reason']}"
            print(f"  {'':7s} {dev:5s} {state}")
    return 0


def _cmd_report(args) -> int:
    from vpns_fast.checkpoint import load_checkpoint, model_from_checkpoint
    from vpns_fast.pruning import density_report

    payload = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(payload)
    input_size = args.input_size or payload.get("input_size")
    report = density_report(model, input_size)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"checkpoint: {args.checkpoint}  model: {payload['model']['name']}  "
              f"granularity: {payload['granularity']}  input: {input_size}")
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpns", description="vpns_fast: prune vision models with visual "
                                     "prompts and weight masks (VPNs), fast.")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"vpns {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
