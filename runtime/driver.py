"""The generation driver: a block of prompts in, generations out. It runs the interpreter's prefill
program once, then its decode program step by step, feeding each step's tokens to the next and
stopping sequences at their stop token or limit (runtime.engine interprets the programs).

    with Engine(plan, store) as engine:
        gens = generate(engine, [[1, 2, 3], [4, 5]])   # what engine.generate does
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flexgen_graph.errors import UserError
from runtime import kernels
from runtime.sampling import GREEDY, Sampling, generators


@dataclass(frozen=True, slots=True)
class Generation:
    token_ids: tuple[int, ...]  # generated tokens, the stop token included when there is one
    finish_reason: str  # "stop" (EOS) or "length"


class PromptTooLongError(UserError):
    pass


@dataclass(slots=True)
class BlockState:
    """What the ops of the running block read and write besides the plan's buffers, per filled gpu batch:
    the token ids to embed, the attention mask and positions, the head's next tokens; and how tokens are
    picked and tallied. Mutable: the driver sets it per block, the handlers update ids / next / flag.
    A block holds its prompts in order, so the filled gpu batches come first and only the last of them
    may be partly filled; the interpreter runs the ops of the others as no-ops (runtime.engine)."""

    rows: tuple[int, ...]  # filled rows of every gpu batch of the plan: 0 for a batch past the prompts
    ids: list[torch.Tensor]
    mask: list[torch.Tensor]
    pos: list[torch.Tensor]
    next: list[torch.Tensor | None]
    sampling: list[Sampling]
    gens: list
    all_greedy: bool
    tally: "Tally"
    flag: int = 0  # pipeline: every sequence of the block is done (rides with the last gpu batch)


def generate(eng, prompts: list[list[int]], max_new_tokens: list[int] | None = None,
         sampling: list[Sampling] | None = None, ignore_eos: bool = False,
         on_step: Callable[[int | None], None] | None = None) -> list[Generation]:
    """Generation for up to one block of prompts; greedy unless `sampling` gives a temperature for a
    prompt. A block that is not full runs its filled gpu batches only, the last at its filled rows.
    on_step, when given, is called after each step with how many of the prompts made a token in it
    (None on a pipeline stage that does not tally them); it reads the tokens the step's one host sync
    already brought over, so it costs no sync of its own."""
    n = len(prompts)
    if not 0 < n <= eng.b * eng.nb:
        raise UserError(f"a block holds 1..{eng.b * eng.nb} prompts, got {n}")
    limits = list(max_new_tokens or [eng.gen_len] * n)
    for i, (p, m) in enumerate(zip(prompts, limits)):
        if not 0 < len(p) <= eng.prompt_len:
            raise PromptTooLongError(f"prompt {i} has {len(p)} tokens; this plan takes 1..{eng.prompt_len}")
        if not 0 < m <= eng.gen_len:
            raise UserError(f"prompt {i}: max_new_tokens {m} outside 1..{eng.gen_len} (the plan's gen_len)")
    seqs = list(prompts)
    picks = list(sampling or [GREEDY] * n)
    limits = torch.tensor(limits)
    pad = eng.spec.pad_token_id if eng.spec.pad_token_id is not None else 0
    eos = torch.tensor((-1,) if ignore_eos or not eng.spec.eos_token_ids else eng.spec.eos_token_ids)

    p = eng.prompt_len
    ids = torch.full((len(seqs), p), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), eng.max_seq), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, p - len(s):] = torch.tensor(s)
        mask[i, p - len(s):] = True  # left padding; generated positions are always attended
    mask[:, p:] = True
    pos = kernels.positions_from_mask(mask)
    filled = tuple(max(0, min(eng.b, n - k * eng.b)) for k in range(eng.nb))
    rows = [slice(k * eng.b, k * eng.b + r) for k, r in enumerate(filled) if r]
    dev = eng.device
    tally = Tally(len(seqs), eng.gen_len, limits, eos, pad, eng.spec.eos_token_ids)
    st = eng.state = BlockState(rows=filled, ids=[ids[r].to(dev) for r in rows],
                                mask=[mask[r].to(dev) for r in rows], pos=[pos[r].to(dev) for r in rows],
                                next=[None] * len(rows), sampling=picks,
                                gens=generators(picks, dev), all_greedy=all(x.greedy for x in picks), tally=tally)
    if eng.link is not None:
        return _generate_stage(eng, st, n, on_step)
    eng.run_program("prefill", 0, p)
    for step in range(eng.gen_len):
        tok = torch.cat(st.next).cpu()  # one host sync per step: EOS and limits are checked here
        before = tally.done  # host tensors: counting them syncs nothing
        tally.add(tok, step)
        if on_step is not None:
            on_step(n - int(before[:n].sum()))
        if tally.all_done or step + 1 == eng.gen_len:
            break
        fed = tally.out[:, step]  # a done sequence is fed padding
        st.ids = [fed[r].unsqueeze(1).to(dev) for r in rows]
        eng.run_program("decode", p + step, 1)
    return tally.results(n)


def _generate_stage(eng, st: BlockState, n: int, on_step=None) -> list[Generation]:
    """The step loop of one pipeline stage. No step waits for the others: the tokens of each gpu batch
    go from the last stage to the first by the plan's SEND_TOKENS / RECV_TOKENS ops, and the last stage
    tallies them. Whether every sequence is done after step r reaches the first stage with the tokens
    of step r's last gpu batch, while it runs step r + 1, and travels on with that batch's hidden
    state: after step r + 1 every stage knows, and all stop together (step r + 1 done for nothing)."""
    last = eng.link.stage.is_last
    eng.run_program("prefill", 0, eng.prompt_len)
    step = 0
    while True:
        before = st.tally.done
        if last:
            st.tally.add(torch.cat(st.next).cpu(), step)
        if on_step is not None:
            on_step(n - int(before[:n].sum()) if last else None)
        if st.flag or step + 1 == eng.gen_len:
            break
        eng.run_program("decode", eng.prompt_len + step, 1)
        step += 1
    if eng.link.stage.is_first:  # the last step's tokens were sent all the same: take them
        eng.take_sent_tokens()
    return eng.link.share_results(st.tally.results(n) if last else None)


class Tally:
    """The generated tokens of a block, step by step: a sequence is done at its stop token or its limit;
    later tokens of a done sequence are replaced by padding and not reported."""

    def __init__(self, rows: int, gen_len: int, limits: torch.Tensor, eos: torch.Tensor, pad: int,
                 eos_ids: tuple[int, ...]) -> None:
        self.out = torch.full((rows, gen_len), pad, dtype=torch.long)
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.stopped = torch.zeros(rows, dtype=torch.bool)
        self.limits, self.eos, self.pad, self.eos_ids = limits, eos, pad, eos_ids

    def _step(self, tok: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = torch.where(self.done, torch.full_like(tok, self.pad), tok)
        hit_eos = torch.isin(tok, self.eos) & ~self.done
        return tok, hit_eos, self.done | hit_eos | (self.limits <= step + 1)

    def add(self, tok: torch.Tensor, step: int) -> None:
        tok, hit_eos, self.done = self._step(tok, step)
        self.out[:, step] = tok
        self.stopped |= hit_eos

    def done_with(self, tok: torch.Tensor, step: int) -> bool:
        """Whether every sequence would be done once `tok` is added as token `step` (nothing changes)."""
        return bool(self._step(tok, step)[2].all())

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def results(self, n: int) -> list[Generation]:
        results = []
        for i in range(n):
            row = self.out[i].tolist()
            count = int(self.limits[i])
            if bool(self.stopped[i]):
                count = next(j for j, x in enumerate(row) if x in self.eos_ids) + 1
            results.append(Generation(tuple(row[:count]), "stop" if bool(self.stopped[i]) else "length"))
        return results
