"""Runs DeepSparse for ``bench infer``'s ``deepsparse`` baseline, inside the Python environment that
has it (DeepSparse 1.8 needs CPython <= 3.11 and numpy < 2 and is end-of-life: it is never a
dependency; bench/README.md says how to make that environment). Imports neither torch nor vpns_fast.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
  {"load": ONNX_PATH, "inputs": NPZ_PATH, "batch": B, "threads": T} -> {"version": "1.8.0"}
  {"run": I, "output": NPY_PATH}  -> runs the engine on input copy I, saves the logits
                                     -> {"ok": true, "engine_seconds": S} (S: the engine call alone)
Errors are answered as {"error": "Type: message"}.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> int:
    import numpy as np

    engine, inputs = None, []
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "load" in request:
                import deepsparse

                arrays = np.load(request["inputs"])
                inputs = [np.ascontiguousarray(arrays[name]) for name in sorted(arrays.files, key=int)]
                engine = deepsparse.compile_model(request["load"], batch_size=request["batch"],
                                                  num_cores=request["threads"])
                answer = {"version": deepsparse.__version__}
            else:
                start = time.perf_counter()
                logits = engine([inputs[request["run"]]])[0]
                seconds = time.perf_counter() - start  # the engine alone, without this request's traffic
                np.save(request["output"], logits)
                answer = {"ok": True, "engine_seconds": seconds}
        except Exception as exc:  # reported to the benchmark, which records it as the baseline's error
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
