"""The link between pipeline stages: one process per stage, torch.distributed point-to-point.

Stage i of n is rank i of the process group. Hidden states go rank i -> i + 1 (`send` / `recv`, run by
the RECV and SEND streams of the engine: on a GPU inside CUDA streams, so nccl orders them with the
compute). After each step the last stage's tokens go to every stage (`share_tokens`): the first embeds
them next, and every stage applies the same stop rule to the same tokens, so all stop together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_graph.ir import Stage


class StageLinkError(ConnectionError):
    """A neighbouring stage went away or sent something else than expected."""


@dataclass(frozen=True, slots=True)
class StageLink:
    stage: Stage
    rank_offset: int = 0  # rank of stage 0 (0 unless the group runs several pipelines)

    @property
    def prev_rank(self) -> int:
        return self.rank_offset + self.stage.index - 1

    @property
    def next_rank(self) -> int:
        return self.rank_offset + self.stage.index + 1

    @property
    def last_rank(self) -> int:
        return self.rank_offset + self.stage.count - 1

    def send(self, t: torch.Tensor, tag: int) -> None:
        import torch.distributed as dist

        try:
            dist.send(t, self.next_rank, tag=tag)
        except RuntimeError as e:
            raise self._lost("send to", self.next_rank, e) from None

    def recv(self, t: torch.Tensor, tag: int) -> None:
        import torch.distributed as dist

        try:
            dist.recv(t, self.prev_rank, tag=tag)
        except RuntimeError as e:
            raise self._lost("receive from", self.prev_rank, e) from None

    def share_tokens(self, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
        """The last stage's n tokens (int64, on the host), on every stage."""
        import torch.distributed as dist

        out = tokens.cpu() if self.stage.is_last else torch.empty(n, dtype=torch.long)
        try:
            dist.broadcast(out, self.last_rank)  # a CPU tensor: the group's gloo side carries it
        except RuntimeError as e:
            raise self._lost("get tokens from", self.last_rank, e) from None
        return out

    def _lost(self, what: str, rank: int, e: RuntimeError) -> StageLinkError:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return StageLinkError(f"pipeline stage {self.stage.index}: could not {what} rank {rank} ({first}); the "
                              "other stage's own error says why (torchrun names the rank that failed first)")
