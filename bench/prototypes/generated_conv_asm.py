"""Writes straight-line AVX-512 assembly (GNU as, Intel syntax) for one sparse convolution with the batch in the
vector lanes, and the data its harness (generated_conv_run.cpp) checks and times it with. Not part of vpns_fast:
see README.md here.

    python3 bench/prototypes/generated_conv_asm.py C_IN C_OUT K H [--rows-a-group 30] [--density 0.1] --out /tmp/g.s

The layer: K x K (1 or 3), padding K // 2, stride 1, H x H output, weights kept at random with probability DENSITY.
Input [C_IN][H + 2p][H + 2p][16] (16 images in each vector), output [C_OUT][H][H][16]. The code,
``generated(x, y, w, count)``, computes ``count`` consecutive positions of one input row (x and y advance 64 bytes a
position): for each group of R output channels, their sums live in zmm0..zmm(R-1) across the group's whole row of
nonzeros; each tap (input channel, kh, kw) that some row of the group uses is loaded once into zmm31 and shared by
every row that uses it; each weight is an embedded-broadcast operand ``[w + 4j]{1to16}`` at a displacement fixed
when the code is written, and each tap's offset is the load's displacement. No index is loaded and no loop runs over
nonzeros: what a sparse kernel's inner loop does at run time is done once here.
"""
from __future__ import annotations

import argparse
import random


def random_layer(c_in: int, c_out: int, k: int, h: int, density: float, seed: int = 1) -> list[list[tuple[int, float]]]:
    """Per output channel, its nonzeros as (offset in floats from the position's first input value, weight)."""
    rng = random.Random(seed)
    padded = h + 2 * (k // 2)
    return [[(16 * ((c * padded + kh) * padded + kw), rng.uniform(-0.5, 0.5))
             for c in range(c_in) for kh in range(k) for kw in range(k) if rng.random() < density]
            for _ in range(c_out)]


def assembly(rows: list[list[tuple[int, float]]], rows_a_group: int, out_channel_bytes: int) -> tuple[str, list[float]]:
    """The code's text and its weight table (the order the code reads the weights in)."""
    table: list[float] = []
    lines = [".intel_syntax noprefix", ".text", ".globl generated", ".type generated,@function", "generated:",
             "  mov r10, rcx"]  # count: each group runs it
    for n, first in enumerate(range(0, len(rows), rows_a_group)):
        group = range(first, min(len(rows), first + rows_a_group))
        lines += ["  mov r8, rdi", "  mov r9, rsi", "  mov rcx, r10", f".Lgroup{n}:"]
        lines += [f"  vpxord zmm{k}, zmm{k}, zmm{k}" for k in range(len(group))]
        users: dict[int, list[tuple[int, float]]] = {}
        for k, o in enumerate(group):
            for offset, weight in rows[o]:
                users.setdefault(offset, []).append((k, weight))
        for offset in sorted(users):  # each row's nonzeros in its own order: the sums are CSR's
            lines.append(f"  vmovaps zmm31, [r8 + {4 * offset}]")
            for k, weight in users[offset]:
                lines.append(f"  vfmadd231ps zmm{k}, zmm31, dword ptr [rdx + {4 * len(table)}]{{1to16}}")
                table.append(weight)
        lines += [f"  vmovaps [r9 + {o * out_channel_bytes}], zmm{k}" for k, o in enumerate(group)]
        lines += ["  add r8, 64", "  add r9, 64", "  dec rcx", f"  jnz .Lgroup{n}"]
    lines += ["  vzeroupper", "  ret", '.section .note.GNU-stack,"",@progbits']
    return "\n".join(lines) + "\n", table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("c_in", "c_out", "k", "h"):
        parser.add_argument(name, type=int)
    parser.add_argument("--rows-a-group", type=int, default=30, help="output channels whose sums share the registers")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--out", required=True, help="the .s file; OUT.rows and OUT.table are written beside it")
    args = parser.parse_args()
    if not 1 <= args.rows_a_group <= 31:
        parser.error("--rows-a-group: expected 1-31 (zmm31 holds the tap)")
    rows = random_layer(args.c_in, args.c_out, args.k, args.h, args.density)
    text, table = assembly(rows, args.rows_a_group, 64 * args.h * args.h)
    with open(args.out, "w") as file:
        file.write(text)
    with open(args.out + ".rows", "w") as file:  # per output channel: offset:weight ...
        file.write("".join(" ".join(f"{offset}:{weight!r}" for offset, weight in row) + "\n" for row in rows))
    with open(args.out + ".table", "w") as file:
        file.write(f"{len(table)}\n" + "".join(f"{weight!r}\n" for weight in table))


if __name__ == "__main__":
    main()
