"""Sparse 1x1 layers through code generated for their nonzeros (``sparse_cpu.set_generated_code``) on whole
networks, on and off taking turns in one process: the check behind the default (README, "Code generated for each
layer").

Each point ``ARCH:KEPT:BATCH`` (``bench.isa_ab``'s points) is a torchvision network at 224 px, every Conv2d/Linear
pruned by magnitude to the fraction ``KEPT``, converted once; the switch is read at each call of the converted
network (its compiled call plan is made again). Its outputs both ways must be equal bit for bit. Then rounds of calls
each way grouped by where the host put the first two CPUs (``bench.placement``), for ``--seconds`` a point. Medians
of the per-round ratios off / on (above 1: the generated code pays), with their p20-p80. Batches that are no multiple
of 16 never run it: such points check that nothing else moved.

    .venv/bin/python -m bench.generated_code_ab [--seconds 75] [--points resnet50:0.1:32] > report.txt
"""
from __future__ import annotations

from bench.batch_lanes_ab import avx512_switch_ab_main
from vpns_fast.deploy import sparse_cpu

DEFAULT_POINTS = "resnet50:0.1:32,resnet50:0.05:32,resnet50:0.5:32,resnet18:0.1:32,mobilenet_v2:0.1:32"


def main(argv=None) -> int:
    return avx512_switch_ab_main(argv, __doc__, DEFAULT_POINTS, sparse_cpu.set_generated_code, "the generated code")


if __name__ == "__main__":
    raise SystemExit(main())
