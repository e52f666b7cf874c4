"""Does computing on packed 4- or 8-bit weights (runtime.packed: torch's CPU int4 kernel, bfloat16 arithmetic)
cost accuracy beyond the compression itself? SmolLM2-135M perplexity (bench/accuracy.py's text and windows) of:
none, FlexGen 4- or 8-bit weights fake-quantized in float32 (what `--compress weights` computes), and the same
compressed weights multiplied by the int4 kernel (what `--compress weights --packed` computes).

    python bench/packed_accuracy.py [--group-size 32] [--bits 8] [--max-tokens N]

Packed: every nn.Linear whose [in, out] weight the kernel takes runs x @ PackedWeight (the matrix quantized as
the runtime's compressed copy holds it); the embedding is fake-quantized along its hidden dim (what
runtime.packed.RowTable reads); the tied lm_head is the embedding quantized along its input dim, as the
runtime's head layer stores it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.accuracy import TEXT, Variant, load_model, perplexity  # noqa: E402
from flexgen_graph import catalog  # noqa: E402
from flexgen_graph.app import models  # noqa: E402
from flexgen_graph.layout import packed_kernel_fits  # noqa: E402
from runtime.packed import packed_weight  # noqa: E402
from runtime.quant import QuantConfig, fake_quantize, quantize  # noqa: E402


class PackedLinear(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear, cfg: QuantConfig) -> None:
        super().__init__()
        self.w = packed_weight(quantize(lin.weight.detach().t().contiguous(), 0, cfg))  # [in, out] grouped along in
        self.bias = lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        return y if self.bias is None else y + self.bias


def packed_model(store, cfg: QuantConfig):
    model, _ = load_model(store, None, "")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        head = model.lm_head
        if head.weight is emb:  # tied: the head gets its own packed copy before the embedding is quantized
            model.lm_head = PackedLinear(head, cfg)
        emb.copy_(fake_quantize(emb, -1, cfg))
    n = int(isinstance(model.lm_head, PackedLinear))
    for name, mod in list(model.named_modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, torch.nn.Linear) and packed_kernel_fits(tuple(sub.weight.shape[::-1]), cfg):
                setattr(mod, child, PackedLinear(sub, cfg))
                n += 1
    return model, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--bits", type=int, choices=[4, 8], default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--max-tokens", type=int)
    args = ap.parse_args()
    from transformers import AutoTokenizer
    spec = catalog.catalog_spec(catalog.DEFAULT_MODEL)
    store = models.open_store("default", spec, models.default_cache_dir())
    tok = AutoTokenizer.from_pretrained(store.path / "hf")
    ids = torch.tensor(tok(TEXT.read_text())["input_ids"][:args.max_tokens])
    cfg = QuantConfig(args.bits, args.group_size)
    none = Variant("none", None)
    base = perplexity(load_model(store, None, "")[0], ids, none, args.window, args.stride)
    fq = perplexity(load_model(store, cfg, "all")[0], ids, none, args.window, args.stride)
    model, n = packed_model(store, cfg)
    pk = perplexity(model, ids, none, args.window, args.stride)
    print(f"SmolLM2-135M, {ids.numel()} tokens, {args.bits} bits in groups of {args.group_size}; {n} linear maps on "
          "the int4 kernel\n")
    print("| weights | perplexity | vs none | vs fake-quantized float32 |")
    print("|---|---|---|---|")
    print(f"| none | {base:.3f} | - | - |")
    print(f"| {args.bits}-bit, dequantized (float32) | {fq:.3f} | {100 * (fq / base - 1):+.2f}% | - |")
    print(f"| {args.bits}-bit, packed (int4 kernel, bfloat16) | {pk:.3f} | {100 * (pk / base - 1):+.2f}% | "
          f"{100 * (pk / fq - 1):+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
