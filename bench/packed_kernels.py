"""Which matmul computes fastest on group-wise compressed weights (runtime.quant's scheme) on this CPU.

    nice -n 19 python bench/packed_kernels.py [--rows 1 16 64 512] [--group-size 32]

For SmolLM2-135M's linear shapes, ms per call of y = x @ w (x: [rows, in] float32, w: [in, out]):
- dense: float32 x @ w, the uncompressed baseline;
- dequant: today's path, dequantize the whole matrix into a dense scratch, then x @ w;
- int4pack fp32 / bf16: torch's `_weight_int4pack_mm_for_cpu` on the weight repacked once
  (runtime.packed.pack_into_int4), 4-bit only, with float32 activations and stats, or bfloat16 ones
  (x cast to bfloat16 and the result back to float32, as runtime.packed does); fp32 is skipped
  above 64 rows (seconds per call);
- tiled: dequantize a few groups of input rows at a time into a small scratch and accumulate
  (never the whole matrix), 4 and 8 bits;
- int8pack: torch's per-channel `_weight_int8pack_mm`, called once per group (its scales are
  per output channel, so group-wise 8-bit needs one call per group plus the minimums' term).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from runtime import packed  # noqa: E402
from runtime.quant import QuantConfig, dequantize, quantize  # noqa: E402

SHAPES = {  # name: (in, out), stored input-major as the runtime stores them
    "q_proj 576x576": (576, 576),
    "k_proj 576x192": (576, 192),
    "gate/up 576x1536": (576, 1536),
    "down 1536x576": (1536, 576),
    "head 576x49152": (576, 49152),
}


def ms(fn, budget_s: float = 0.3) -> float:
    """Median-free but steady: the best of a few timed batches of calls, ms per call."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, min(200, int(budget_s / 3 / one)))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e3


def int8pack_grouped(x: torch.Tensor, q8: list[torch.Tensor], scales: torch.Tensor, zeros: torch.Tensor,
                     g: int) -> torch.Tensor:
    """x @ w for 8-bit group-wise w = (c - 128) * s + z, one per-channel int8 matmul per group.
    q8: per group, int8 [out, g] (codes - 128, contiguous); scales, zeros: [G, out] float32."""
    xs = x.unflatten(1, (-1, g)).sum(-1)  # xs: [rows, G]
    y = xs @ zeros
    for i in range(scales.shape[0]):
        y += torch.ops.aten._weight_int8pack_mm(x[:, i * g:(i + 1) * g].contiguous(), q8[i], scales[i])
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 512])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
          f"group size {args.group_size}")
    print("| bits | weight [in, out] | rows | dense fp32 ms | dequant+matmul ms | int4pack fp32 ms | int4pack bf16 ms | tiled ms | int8pack/group ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bits in args.bits:
        cfg = QuantConfig(bits, args.group_size)
        for name, (k, n) in SHAPES.items():
            w = torch.randn(k, n) * 0.05
            q = quantize(w, 0, cfg)
            wq = dequantize(q)
            scratch = torch.empty(k, n)
            pk = packed.packed_int4(q) if bits == 4 else None
            if pk is not None:  # the fp32 variant's exact stats: zero = mn + 8 * scale
                sz32 = torch.stack((q.scale.float(), q.mn.float() + 8 * q.scale.float()), -1)
            tiled = packed.TiledWeight.from_qtensor(q)
            if bits == 8:  # codes - 128 as int8, [out, in]; zero point folded: w = (c - 128) s + (mn + 128 s)
                codes = torch.cat([q.data[i] for i in range(q.data.shape[0])], 0)  # [in, out] uint8
                q8 = [c.t().contiguous() for c in (codes.int() - 128).to(torch.int8).split(args.group_size, 0)]
                s32, z32 = q.scale.float(), q.mn.float() + 128 * q.scale.float()
            for rows in args.rows:
                x = torch.randn(rows, k)
                ref = x @ wq
                t_dense = ms(lambda: x @ wq)
                t_deq = ms(lambda: x @ dequantize(q, out=scratch))
                t_tiled = ms(lambda: tiled.matmul(x))
                assert torch.allclose(tiled.matmul(x), ref, atol=1e-3, rtol=1e-3), f"tiled {name} {rows}"
                t4 = t4b = t8 = "-"
                if pk is not None:
                    fp32 = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, pk.codes, pk.group_size, sz32)
                    if rows <= 64:
                        assert torch.allclose(fp32(), ref, atol=1e-3, rtol=1e-3), f"int4 fp32 {name} {rows}"
                        t4 = f"{ms(fp32):.3f}"
                    got = packed.int4_matmul(x, pk)
                    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item()), f"int4 bf16 {name} {rows}"
                    t4b = f"{ms(lambda: packed.int4_matmul(x, pk)):.3f}"
                if bits == 8:
                    got = int8pack_grouped(x, q8, s32, z32, args.group_size)
                    assert torch.allclose(got, ref, atol=1e-2, rtol=1e-2), f"int8pack {name} {rows}"
                    t8 = f"{ms(lambda: int8pack_grouped(x, q8, s32, z32, args.group_size)):.3f}"
                print(f"| {bits} | {name} | {rows} | {t_dense:.3f} | {t_deq:.3f} | {t4} | {t4b} | {t_tiled:.3f} | {t8} |",
                      flush=True)


if __name__ == "__main__":
    main()
