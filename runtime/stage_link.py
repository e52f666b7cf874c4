"""The link between pipeline stages: one process per stage, torch.distributed point-to-point.

Stage i of n is rank i of the process group. Hidden states go rank i -> i + 1, each gpu batch's tokens
from the last rank to the first (run by the RECV and SEND streams of the engine: on a GPU inside CUDA
streams, so nccl orders the hidden states with the compute; tokens and flags are host tensors, on gloo).
A token message is the gpu batch's ids and one more int64: for the step's last gpu batch, whether every
sequence of the block is done; that flag travels on with the last gpu batch's hidden state. At the end
of a block the last stage's generations go to every stage (`share_results`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_graph.ir import Stage

FLAG_TAG = 1 << 20  # tags: a gpu batch's hidden state uses its index, these stay clear of them
TOKEN_TAG = 1 << 21


class StageLinkError(ConnectionError):
    """A neighbouring stage went away or sent something else than expected."""


@dataclass(frozen=True, slots=True)
class StageLink:
    stage: Stage  # its index is this process's rank

    @property
    def prev_rank(self) -> int:
        return self.stage.index - 1

    @property
    def next_rank(self) -> int:
        return self.stage.index + 1

    @property
    def last_rank(self) -> int:
        return self.stage.count - 1

    def send_hidden(self, t: torch.Tensor, batch: int) -> None:
        self._p2p("send", t, self.next_rank, batch)

    def recv_hidden(self, t: torch.Tensor, batch: int) -> None:
        self._p2p("recv", t, self.prev_rank, batch)

    def send_flag(self, flag: int) -> None:
        self._p2p("send", torch.tensor([flag], dtype=torch.long), self.next_rank, FLAG_TAG)

    def recv_flag(self) -> int:
        t = torch.zeros(1, dtype=torch.long)
        self._p2p("recv", t, self.prev_rank, FLAG_TAG)
        return int(t[0])

    def send_tokens(self, t: torch.Tensor, batch: int) -> None:
        self._p2p("send", t, 0, TOKEN_TAG + batch)

    def recv_tokens(self, t: torch.Tensor, batch: int) -> None:
        self._p2p("recv", t, self.last_rank, TOKEN_TAG + batch)

    def share_results(self, results: list | None) -> list:
        """The last stage's generations of a block, on every stage (process 0 writes them)."""
        import torch.distributed as dist

        box = [results]
        try:
            dist.broadcast_object_list(box, self.last_rank)
        except RuntimeError as e:
            raise self._lost("get the results from", self.last_rank, e) from None
        return box[0]

    def _p2p(self, what: str, t: torch.Tensor, peer: int, tag: int) -> None:
        import torch.distributed as dist

        try:
            (dist.send if what == "send" else dist.recv)(t, peer, tag=tag)
        except RuntimeError as e:
            raise self._lost("send to" if what == "send" else "receive from", peer, e) from None

    def _lost(self, what: str, rank: int, e: RuntimeError) -> StageLinkError:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return StageLinkError(f"pipeline stage {self.stage.index}: could not {what} rank {rank} ({first}); the "
                              "other stage's own error says why (torchrun names the rank that failed first)")
