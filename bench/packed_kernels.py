"""Which matmul computes fastest on group-wise compressed weights (runtime.quant's scheme) on this CPU.

    nice -n 19 python bench/packed_kernels.py [--rows 1 16 64 512] [--group-size 32] [--bits 4 8]
    ATEN_CPU_CAPABILITY=avx2 python bench/packed_kernels.py   # the kernels torch dispatches on an AVX2 CPU

For SmolLM2-135M's linear shapes, ms per call of y = x @ w (x: [rows, in] float32, w: [in, out]):
- dense: float32 x @ w, the uncompressed baseline;
- dequant: dequantize the whole matrix into a dense scratch, then x @ w;
- tiled: dequantize a block of output columns at a time into a small scratch (runtime.packed.TiledWeight);
- packed: what runtime.packed computes (packed_matmul): torch's `_weight_int4pack_mm_for_cpu` on the weight
  repacked once, bfloat16 activations and stats; 8 bits split each code into nibbles, both halves of a group
  side by side in one call (x enters as (16 x_g, x_g));
- int4pack fp32 (4 bits): the same kernel with float32 activations and stats (a scalar loop); skipped above
  64 rows (seconds per call);
- 2 x int4 (8 bits): the nibble split as two int4 calls, high and low nibbles each with a table of their own
  (16 s, mn + 128 s) and (s, 8 s), results added: twice the table bytes of the one-call layout;
- int8pack/group (8 bits, up to 16 rows): torch's per-channel `_weight_int8pack_mm`, called once per group (its
  scales are per output channel, so group-wise 8-bit needs one call per group plus the minimums' term).
packed_matmul runs the kernel at every number of rows: a dense restore for long prefills would have to read the
kernel's packed layout, which is torch's private one and differs per CPU capability (AVX-512: blocks of 64
output channels, AVX2 and scalar: 32, in other nibble orders), so none is made.
Weights stay cache-resident between calls: a layer streamed from memory in a model run is slower for dense
float32 (4 bytes a weight against about 1.1 at 8 bits), so these ratios understate packed's gain at 1 row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flexgen_graph.layout import packed_kernel_fits  # noqa: E402
from runtime import packed  # noqa: E402
from runtime.quant import QTensor, QuantConfig, dequantize, quantize  # noqa: E402

SHAPES = {  # name: (in, out), stored input-major as the runtime stores them
    "q_proj 576x576": (576, 576),
    "k_proj 576x192": (576, 192),
    "gate/up 576x1536": (576, 1536),
    "down 1536x576": (1536, 576),
    "head 576x49152": (576, 49152),
}


def best_ms(fns: dict[str, Callable[[], torch.Tensor]], budget_s: float = 0.6, rounds: int = 15) -> dict[str, float]:
    """ms per call of each fn: the best of `rounds` short timed batches, the candidates taking turns, so
    load from other processes hits them alike and the minimum finds each one's unloaded time."""
    n = {}
    for c, fn in fns.items():
        fn()
        t = time.perf_counter()
        fn()
        n[c] = max(1, min(100, int(budget_s / len(fns) / rounds / max(time.perf_counter() - t, 1e-6))))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for c, fn in fns.items():
            t = time.perf_counter()
            for _ in range(n[c]):
                fn()
            best[c] = min(best[c], (time.perf_counter() - t) / n[c])
    return {c: v * 1e3 for c, v in best.items()}


def int8pack_grouped(x: torch.Tensor, q8: list[torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
                     g: int) -> torch.Tensor:
    """x @ w for 8-bit group-wise w = (c - 128) * s + z, one per-channel int8 matmul per group.
    q8: per group, int8 [out, g] (codes - 128, contiguous); scales, zeros: [G, out] float32."""
    xs = x.unflatten(1, (-1, g)).sum(-1)  # xs: [rows, G]
    y = xs @ zeros
    for i in range(scales.shape[0]):
        y += torch.ops.aten._weight_int8pack_mm(x[:, i * g:(i + 1) * g].contiguous(), q8[i], scales[i])
    return y


def two_int4(q: QTensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The nibble split as two int4 kernel calls with a table each: x @ w = x @ w_hi + x @ w_lo."""
    codes = torch.cat([q.data[i] for i in range(q.data.shape[0])], 0).int()  # [in, out]
    s, mn = q.scale.float(), q.mn.float()
    halves = []
    for nib, scale, zero in ((codes >> 4, 16 * s, mn + 128 * s), (codes & 15, s, 8 * s)):
        pk = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.t().contiguous(), 1)
        halves.append((pk, torch.stack((scale, zero), -1).to(torch.bfloat16)))
    g = q.cfg.group_size

    def mm(x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        return sum(torch.ops.aten._weight_int4pack_mm_for_cpu(xb, pk, g, sz) for pk, sz in halves).float()
    return mm


COLUMNS = ("dense fp32", "dequant+matmul", "tiled", "packed", "int4pack fp32", "2 x int4", "int8pack/group")


def candidates(q: QTensor, wq: torch.Tensor, x: torch.Tensor, group: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The matmuls to time for one weight and input, each checked against x @ wq first."""
    bits, k = q.cfg.bits, q.shape[0]
    scratch = torch.empty(q.shape)
    out = {"dense fp32": lambda: x @ wq, "dequant+matmul": lambda: x @ dequantize(q, out=scratch),
           "tiled": (lambda t: lambda: t.matmul(x))(packed.TiledWeight.from_qtensor(q))}
    if packed_kernel_fits(q.shape, q.cfg):
        pk = packed.packed_weight(q)
        out["packed"] = lambda: packed.packed_matmul(x, pk)
    if bits == 4 and "packed" in out and x.shape[0] <= 64:
        sz32 = torch.stack((q.scale.float(), q.mn.float() + 8 * q.scale.float()), -1)
        out["int4pack fp32"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, pk.codes, group, sz32)
    if bits == 8:
        out["2 x int4"] = (lambda mm: lambda: mm(x))(two_int4(q))
        codes = torch.cat([q.data[i] for i in range(q.data.shape[0])], 0)  # [in, out] uint8
        q8 = [c.t().contiguous() for c in (codes.int() - 128).to(torch.int8).split(group, 0)]
        s32, z32 = q.scale.float(), q.mn.float() + 128 * q.scale.float()
        if x.shape[0] <= 16:  # seconds per call beyond
            out["int8pack/group"] = lambda: int8pack_grouped(x, q8, s32, z32, group)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, capability {packed.kernel_capability()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, "
          f"group size {args.group_size}")
    print(f"| bits | weight [in, out] | rows | {' | '.join(c + ' ms' for c in COLUMNS)} | dense / packed |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for bits in args.bits:
        cfg = QuantConfig(bits, args.group_size)
        for name, (k, n) in SHAPES.items():
            w = torch.randn(k, n) * 0.05
            q = quantize(w, 0, cfg)
            wq = dequantize(q)
            for rows in args.rows:
                x = torch.randn(rows, k)
                ref, bound = x @ wq, 2 ** -6 * (x.abs() @ wq.abs()).max()  # bfloat16 paths: 2**-6 of the term sum
                fns = candidates(q, wq, x, args.group_size)
                for c, fn in fns.items():
                    assert (fn() - ref).abs().max() <= bound, f"{c} {name} {rows}"
                t = best_ms(fns)
                cells = " | ".join(f"{t[c]:.3f}" if c in t else "-" for c in COLUMNS)
                ratio = f"{t['dense fp32'] / t['packed']:.2f}" if "packed" in t else "-"
                print(f"| {bits} | {name} | {rows} | {cells} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
