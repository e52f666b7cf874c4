"""The generation driver: a block of prompts in, generations out. It runs the interpreter's prefill
program once, then its decode program step by step, feeding each step's tokens to the next and
stopping sequences at their stop token, their stop strings or their limit (runtime.engine interprets
the programs).

    with Engine(plan, store) as engine:
        gens = generate(engine, [[1, 2, 3], [4, 5]])   # what engine.generate does
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from flexgen_graph.errors import UserError
from runtime import kernels
from runtime.sampling import GREEDY, Sampling, generators


@dataclass(frozen=True, slots=True)
class Generation:
    token_ids: tuple[int, ...]  # generated tokens, the stop token (or the last of a stop string) included
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class PromptTooLongError(UserError):
    pass


@dataclass(frozen=True, slots=True)
class StopStrings:
    """A sequence's stop strings and how its tokens read as text (the application's tokenizer). Once per
    step the tail of a running sequence is decoded: it ends at the first token after which the tail holds
    a stop string (finish "stop"); `cut` then drops the text from the first stop string on."""

    strings: tuple[str, ...]
    decode: Callable[[Sequence[int]], str]

    def __post_init__(self) -> None:
        if not self.strings or not all(isinstance(x, str) and x for x in self.strings):
            raise UserError(f"stop strings must be non-empty strings, got {self.strings!r}")

    @property
    def window(self) -> int:
        """Tokens decoded per check: a stop string of n characters spans at most n tokens, and one more
        before it keeps the decoding of its first token as it reads in the whole text."""
        return max(len(x) for x in self.strings) + 2

    def ended(self, tail: Sequence[int]) -> bool:
        text = self.decode(tail)
        return any(x in text for x in self.strings)

    def cut(self, text: str) -> str:
        """The text before the first stop string (the whole text when it holds none)."""
        at = [i for i in (text.find(x) for x in self.strings) if i >= 0]
        return text[:min(at)] if at else text


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
    tally: "Tally | None"
    flag: int = 0  # pipeline: every sequence of the block is done (rides with the last gpu batch)
    # a scoring plan: each position's next token, the positions scored, and the head's results
    targets: list[torch.Tensor] | None = None
    cont: list[torch.Tensor] | None = None
    scored: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None


def generate(eng, prompts: list[list[int]], max_new_tokens: list[int] | None = None,
         sampling: list[Sampling] | None = None, ignore_eos: bool = False,
         on_step: Callable[[int | None], None] | None = None,
         stops: list[StopStrings | None] | None = None) -> list[Generation]:
    """Generation for up to one block of prompts; greedy unless `sampling` gives a temperature for a
    prompt; a prompt's `stops` end it at a stop string. A block that is not full runs its filled gpu
    batches only, the last at its filled rows. on_step, when given, is called after each step with how
    many of the prompts made a token in it (None on a pipeline stage that does not tally them); it
    reads the tokens the step's one host sync already brought over, so it costs no sync of its own."""
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
    tally = Tally(len(seqs), eng.gen_len, limits, eos, pad, eng.spec.eos_token_ids, list(stops or []))
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


@dataclass(frozen=True, slots=True)
class Scored:
    """A continuation's tokens scored after their context: each one's log-probability and whether it is
    the most likely token there (greedy)."""

    logprobs: tuple[float, ...]
    greedy: tuple[bool, ...]

    @property
    def logprob(self) -> float:
        return sum(self.logprobs)

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


def score(eng, contexts: list[list[int]], continuations: list[list[int]]) -> list[Scored]:
    """Up to one block of (context, continuation) pairs through a scoring plan: one run of its prefill
    program over context + continuation (its last token dropped), the head at the continuation's
    positions; the log-probabilities and greedy flags cross to the host once, nothing else."""
    n, wl = len(contexts), eng.plan.workload
    if not wl.score:
        raise UserError(f"scoring needs a scoring plan (Workload(..., score=True)); this one generates "
                        f"(prompt {wl.prompt_len}, gen {wl.gen_len})")
    if len(continuations) != n or not 0 < n <= eng.b * eng.nb:
        raise UserError(f"a block scores 1..{eng.b * eng.nb} pairs, got {n} contexts and {len(continuations)} "
                        "continuations")
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        if not c or not x:
            raise UserError(f"request {i}: the {'context' if not c else 'continuation'} is empty")
        if len(c) + len(x) - 1 > eng.prompt_len or len(x) > wl.gen_len:
            raise PromptTooLongError(f"request {i}: context {len(c)} + continuation {len(x)} tokens; this plan "
                                     f"scores {wl.gen_len} of at most {eng.prompt_len} + 1 tokens")
    whole = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    seqs = [w[:-1] for w in whole]
    p, pad = eng.prompt_len, eng.spec.pad_token_id if eng.spec.pad_token_id is not None else 0
    ids = torch.full((n, p), pad, dtype=torch.long)
    targets = torch.zeros((n, p), dtype=torch.long)
    mask = torch.zeros((n, p), dtype=torch.bool)
    cont = torch.zeros((n, p), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, p - len(s):] = torch.tensor(s)
        mask[i, p - len(s):] = True
        targets[i, p - len(s):] = torch.tensor(whole[i][1:])
        cont[i, p - len(continuations[i]):] = True  # the positions whose next token is the continuation's
    pos = kernels.positions_from_mask(mask)
    filled = tuple(max(0, min(eng.b, n - k * eng.b)) for k in range(eng.nb))  # as generate: no filler rows
    rows = [slice(k * eng.b, k * eng.b + r) for k, r in enumerate(filled) if r]
    dev = eng.device
    eng.state = st = BlockState(rows=filled, ids=[ids[r].to(dev) for r in rows], mask=[mask[r].to(dev) for r in rows],
                                pos=[pos[r].to(dev) for r in rows], next=[None] * len(rows), sampling=[], gens=[],
                                all_greedy=True, tally=None, targets=[targets[r].to(dev) for r in rows],
                                cont=[cont[r].to(dev) for r in rows], scored=[None] * len(rows))
    eng.run_program("prefill", 0, p)
    lp = torch.cat([s[0] for s in st.scored]).cpu().tolist()  # row-major: request by request
    greedy = torch.cat([s[1] for s in st.scored]).cpu().tolist()
    out, at = [], 0
    for x in continuations:
        out.append(Scored(tuple(lp[at:at + len(x)]), tuple(greedy[at:at + len(x)])))
        at += len(x)
    return out


class Tally:
    """The generated tokens of a block, step by step: a sequence is done at its stop token or its limit;
    later tokens of a done sequence are replaced by padding and not reported."""

    def __init__(self, rows: int, gen_len: int, limits: torch.Tensor, eos: torch.Tensor, pad: int,
                 eos_ids: tuple[int, ...], stops: list[StopStrings | None] = ()) -> None:
        self.out = torch.full((rows, gen_len), pad, dtype=torch.long)
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.stopped = torch.zeros(rows, dtype=torch.bool)
        self.limits, self.eos, self.pad, self.eos_ids = limits, eos, pad, eos_ids
        self.stops = {i: s for i, s in enumerate(stops) if s is not None}
        self.stop_len: dict[int, int] = {}  # tokens kept of a sequence ended by a stop string

    def _step(self, tok: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = torch.where(self.done, torch.full_like(tok, self.pad), tok)
        hit_eos = torch.isin(tok, self.eos) & ~self.done
        return tok, hit_eos, self.done | hit_eos | (self.limits <= step + 1)

    def add(self, tok: torch.Tensor, step: int) -> None:
        was_done = self.done
        tok, hit_eos, self.done = self._step(tok, step)
        self.out[:, step] = tok
        self.stopped |= hit_eos
        for i, s in self.stops.items():  # on the host: the sequences that ran this step and have stop strings
            if not (was_done[i] or hit_eos[i]) and s.ended(self.out[i, max(0, step + 1 - s.window):step + 1].tolist()):
                self.done[i] = self.stopped[i] = True
                self.stop_len[i] = step + 1

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
            if i in self.stop_len:
                count = self.stop_len[i]
            elif bool(self.stopped[i]):
                count = next(j for j, x in enumerate(row) if x in self.eos_ids) + 1
            results.append(Generation(tuple(row[:count]), "stop" if bool(self.stopped[i]) else "length"))
        return results
