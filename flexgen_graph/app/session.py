"""The core of a generation job, shared by `flexgen-graph run` (app.jobs) and `LLM.generate` (app.llm):
prompts to token ids, the plan a request runs under, the job cut into blocks, one block through the
engine with its stop strings, and its generations read back as (text, token_ids, finish_reason).
Each entry point keeps what it does on top (the CLI: resume, errors file, progress, output; the API:
checks that raise, its own progress) and its own policy for which plans a job compiles.

    >>> from flexgen_graph.ir import Workload
    >>> class P:  # a stand-in with a plan's workload and block size
    ...     def __init__(self, n, block_size=2): self.workload, self.block_size = Workload(n, 4), block_size
    >>> short, long_ = P(8), P(16)
    >>> smallest_fitting([long_, short], 5, 4) is short, smallest_fitting([short], 9, 4)
    (True, None)
    >>> lengths = {"a": 12, "b": 3, "c": 14, "d": 2}
    >>> pick = lambda x: smallest_fitting([short, long_], lengths[x], 4)
    >>> [(p.workload.prompt_len, c) for p, c in blocks("cabd", pick, lambda p, x: fits(p, lengths[x], 4))]
    [(16, ['c', 'a']), (8, ['b', 'd'])]
"""

from __future__ import annotations

from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Request:
    """One prompt of a job, tokenized: what the engine runs and its answer needs."""

    id: Any
    prompt_ids: tuple[int, ...]
    max_tokens: int | None  # None: the plan's gen_len
    sampling: Any  # runtime.sampling.Sampling
    line: int = 0  # its line in the input (1-based), for the error record should generation fail
    meta: Any = None  # what the input format's answer shape needs (openai_batch.Meta)
    stop: tuple[str, ...] = ()  # stop strings: generation ends at the first


@dataclass(frozen=True, slots=True)
class Output:
    """One prompt's generation: text (None for weights without a tokenizer), the new token ids (the stop
    token included when there is one), and why it ended: "stop" or "length"."""

    text: str | None
    token_ids: tuple[int, ...]
    finish_reason: str


# ---------------------------------------------------------------- prompts and text

def chat_ids(tokenizer, messages: list) -> list[int]:
    """Chat messages through the model's chat template, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode(tokenizer, prompt: str | list) -> list[int]:
    """A prompt's token ids: text as the tokenizer reads it, a list of chat messages through the template."""
    return list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else chat_ids(tokenizer, prompt)


def decode_text(tokenizer) -> Callable[[Sequence[int]], str]:
    """How generated tokens read as text (special tokens left out), for outputs and stop strings alike."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def stop_strings(stop: tuple[str, ...], tokenizer):
    """The driver's StopStrings for a request's stop strings (None without any)."""
    from runtime.driver import StopStrings

    return StopStrings(tuple(stop), decode_text(tokenizer)) if stop else None


# ---------------------------------------------------------------- plans and blocks

def fits(plan, length: int, max_tokens: int | None, score: bool | None = False) -> bool:
    """Whether a plan takes a request of `length` tokens and max_tokens (None: any). score: whether the
    plan must be a scoring plan (then max_tokens is the continuation's length, and length what its
    prefill reads); None: either kind (`run` takes the plans it is given as they are)."""
    wl = plan.workload
    return (score is None or wl.score == score) and length <= wl.prompt_len and (max_tokens or 0) <= wl.gen_len


def smallest_fitting(plans: Iterable, length: int, max_tokens: int | None, score: bool | None = False):
    """The smallest plan (prompt_len, then gen_len) that takes the request, or None."""
    fitting = [p for p in plans if fits(p, length, max_tokens, score)]
    return min(fitting, key=lambda p: (p.workload.prompt_len, p.workload.gen_len)) if fitting else None


def blocks(order: Iterable[T], plan_for: Callable[[T], Any],
           takes: Callable[[Any, T], bool]) -> Iterator[tuple[Any, list[T]]]:
    """(plan, requests) per block: the first request left (in `order`) picks the plan, which then takes
    the next requests left that it `takes`, up to its block size; the others wait, in order."""
    left = deque(order)
    while left:
        first = left[0]
        plan = plan_for(first)
        chunk: list[T] = []
        passed: list[T] = []
        while left and len(chunk) < plan.block_size:
            x = left.popleft()
            (chunk if takes(plan, x) else passed).append(x)
        assert chunk and chunk[0] == first, f"plan {plan.workload} does not take the request {first!r} that picked it"
        left.extendleft(reversed(passed))
        yield plan, chunk


class PlanCache:
    """Plans compiled for workloads of one model, profile and compile options: kept in memory and on
    disk (app.plans.cached_plans, keyed by CompileOptions.key()). `get` may override options per job."""

    def __init__(self, spec, profile, options, cache_dir: Path) -> None:
        self.spec, self.profile, self.options, self.cache_dir = spec, profile, options, cache_dir
        self._plans: dict[str, list] = {}

    def get(self, workload, **overrides) -> list:
        """The plans for a workload (a plan per stage for a pipeline)."""
        import json

        from flexgen_graph.app.plans import cached_plans

        options = replace(self.options, **overrides)
        key = json.dumps([workload.to_dict(), options.key()])
        if key not in self._plans:
            self._plans[key] = cached_plans(self.spec, self.profile, workload, options, self.cache_dir)
        return self._plans[key]


@dataclass
class Engines:
    """The one open engine, of the last plan run: a block of the same plan reuses it, another plan's
    closes it first. open_engine(plan) gives a context-managed engine."""

    open_engine: Callable[[Any], Any]
    plan: Any = None
    engine: Any = None
    opened: list = field(default_factory=list)  # every plan an engine was opened for (tests read it)
    _stack: ExitStack = field(default_factory=ExitStack)

    def get(self, plan):
        if self.plan is not plan:
            self.close()
            self.engine, self.plan = self._stack.enter_context(self.open_engine(plan)), plan
            self.opened.append(plan)
        return self.engine

    def close(self) -> None:
        self._stack.close()
        self.plan = self.engine = None

    def __enter__(self) -> "Engines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- one block

def run_block(engine, reqs: Sequence[Request], gen_len: int, tokenizer, on_step=None) -> list[Output]:
    """A block of requests through the engine, each ended at its stop strings, its max_tokens (None:
    gen_len) or its stop token; on_step: the driver's per-step callback."""
    kw = {"on_step": on_step} if on_step is not None else {}
    stops = [stop_strings(r.stop, tokenizer) for r in reqs]
    gens = engine.generate([list(r.prompt_ids) for r in reqs], [r.max_tokens or gen_len for r in reqs],
                           [r.sampling for r in reqs], stops=stops, **kw)
    return [output(g, tokenizer, s) for g, s in zip(gens, stops)]


def output(gen, tokenizer, stop=None) -> Output:
    """A runtime Generation as its answer: its text (cut before the first stop string) when there is a
    tokenizer, its token ids, its finish reason."""
    text = None if tokenizer is None else decode_text(tokenizer)(gen.token_ids)
    if stop is not None:
        text = stop.cut(text)
    return Output(text, tuple(gen.token_ids), gen.finish_reason)
