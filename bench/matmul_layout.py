"""Why linear weights are stored input-major: F.linear on HF's [out, in] vs x @ w on a contiguous [in, out].

    python bench/matmul_layout.py
"""

import time

import torch
import torch.nn.functional as F


def ms(fn, n: int) -> float:
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| weight [out, in] | rows | F.linear ms | x @ w_in_major ms |")
    print("|---|---|---|---|")
    for out_f, in_f in [(1536, 576), (576, 1536), (576, 576), (49152, 576)]:
        w = torch.randn(out_f, in_f)
        w_t = w.t().contiguous()
        for rows in (1, 16, 64):
            x = torch.randn(rows, in_f)
            n = 200 if out_f < 10000 else 10
            print(f"| {out_f} x {in_f} | {rows} | {ms(lambda: F.linear(x, w), n):.3f} | {ms(lambda: x @ w_t, n):.3f} |")


if __name__ == "__main__":
    main()
