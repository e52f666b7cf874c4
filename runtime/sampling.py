"""Token selection: greedy by default; temperature / top-p sampling per sequence.

Each sampled sequence has its own generator seeded from its seed, so its tokens do not depend
on which other prompts share its block (a resumed job reproduces an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_graph.errors import UserError


@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def generators(params: list[Sampling], device: torch.device | str = "cpu") -> list[torch.Generator | None]:
    gens: list[torch.Generator | None] = []
    for p in params:
        if p.greedy:
            gens.append(None)
        else:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed)
            gens.append(g)
    return gens


def pick(logits: torch.Tensor, params: list[Sampling], gens: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row of logits [B, V] (float32)."""
    out = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, gens)):
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always stays)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out[i] = torch.multinomial(probs, 1, generator=g)[0]
    return out
