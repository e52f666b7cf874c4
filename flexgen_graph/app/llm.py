"""The Python API, in vLLM's offline shape: `LLM(...).generate(prompts, SamplingParams(...))`.

    >>> from flexgen_graph import LLM, SamplingParams
    >>> with LLM(profile="cpu-small") as llm:               # the embedded SmolLM2-135M-Instruct
    ...     outs = llm.generate([[{"role": "user", "content": "What is the capital of France?"}],
    ...                          "The capital of France is"], SamplingParams(max_tokens=8), progress=False)
    >>> "Paris" in outs[0].text, outs[1].finish_reason, len(outs[1].token_ids)
    (True, 'length', 8)

Prompts are strings, chat message lists (the model's chat template is applied) or token id lists.
`score(contexts, continuations)` gives each continuation's log-probability after its context and
whether greedy decoding would produce it (what lm-evaluation-harness asks for):

    >>> with LLM(profile="cpu-small") as llm:
    ...     [(yes, _), (no, _)] = llm.score(["The capital of France is"] * 2, [" Paris", " Berlin"], progress=False)
    >>> yes > no
    True

Each call plans for its own job: the requests are sorted by length (longest first), cut into blocks,
and each block runs a plan compiled for its length (rounded up to a power of two) and the call's
largest max_tokens (a scoring plan: its longest continuation), or the smallest plan of `plan=` that
takes it. Plans are cached (in memory and under the cache folder), and the engine of the last plan
stays open until `close()`.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from flexgen_graph.app.session import (Engines, Output, PlanCache, Request, blocks, encode, fits, run_block,
                                       smallest_fitting)
from flexgen_graph.catalog import DEFAULT_MODEL
from flexgen_graph.errors import UserError
from flexgen_graph.ir import Workload
from flexgen_graph.planfile import Plan, PlanMismatchError

Prompt = str | Sequence[dict] | Sequence[int]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one prompt is continued: at most max_tokens new tokens, greedy at temperature 0 (the default),
    else sampled at `temperature` from the top_p nucleus with its own generator (seed; None: one derived
    from the prompt's index in the call, so a sequence does not depend on its neighbours in a block).
    stop: strings (or one) that end the sequence as soon as it generates one (finish "stop"); the text
    ends before the first of them, the token ids run up to the token that completed it.

    >>> SamplingParams(stop="Q:").stop
    ('Q:',)
    >>> SamplingParams(max_tokens=0)
    Traceback (most recent call last):
    ...
    flexgen_graph.errors.UserError: max_tokens must be an integer >= 1, got 0
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise UserError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)  # frozen: normalized once, here
        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise UserError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and type(self.seed) is not int:
            raise UserError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None:
            from flexgen_graph.app.jobs import check_seed
            check_seed(self.seed, "seed")  # [0, 2**64), as the CLI and input lines take it
        self.runtime(0)  # temperature and top_p are checked where they are used

    def runtime(self, index: int):
        """The runtime's Sampling for the prompt at `index` of its call."""
        from flexgen_graph.app.jobs import default_seed
        from runtime.sampling import Sampling

        return Sampling(self.temperature, self.top_p, self.seed if self.seed is not None else default_seed(0, index))


def _unicode(text: str, what: str) -> None:
    """Refuse text no tokenizer can take: a lone surrogate (a \\ud800 escape) is not Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what}: a lone surrogate at character {e.start} ({ascii(text[e.start])}), which is not "
                        "Unicode") from None


class LLM:
    """A model and this machine's plans for it, ready to run batches.

    model: a catalog id (with `weights`), a Hugging Face checkpoint folder, a .gguf file, or None for the
    embedded default (SmolLM2-135M-Instruct). weights: dummy, dummy:SEED, a folder or a .gguf, for a catalog
    id or instead of a plan's own. profile: a builtin profile, a profile file, "local" or "auto" (this
    machine, measured once and cached). plan: a Plan, a list of them, or a .fgplan file, used instead of
    compiling (model, dtype and compress must then be left out, a profile must match it). dtype: float32,
    float16 or bfloat16 (default: float16 with a GPU, float32 without). compress: off, auto, weights, cache
    or both (see CompileOptions). device: auto, cpu or cuda. cache_dir: where imported weights and compiled
    plans are kept (default ~/.cache/flexgen-graph). max_block_size caps the sequences of a block.
    """

    def __init__(self, model: str | None = None, *, profile: str = "auto", plan: Plan | Sequence[Plan] | str | Path | None = None,
                 dtype: str | None = None, compress: str = "off", device: str = "auto", cache_dir: str | Path | None = None,
                 weights: str | None = None, offload_dir: str | Path | None = None,
                 max_block_size: int | None = None) -> None:
        from flexgen_graph.app.jobs import load_tokenizer
        from flexgen_graph.app.models import default_cache_dir, open_store, resolve_model, weights_source_for
        from flexgen_graph.app.plans import default_dtype, profile_for
        from planner.compile import CompileOptions

        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.device, self.offload_dir = device, offload_dir
        self._given: list[Plan] | None = None
        if plan is not None:
            self._given = _load_plans(plan)
            first = self._given[0]
            if model is not None:
                raise UserError("give plan or model, not both (the plan names its model)")
            if compress != "off":
                raise UserError(f"compress={compress!r} applies when compiling; the given plan has its own policy")
            if dtype is not None and dtype != first.spec.dtype:
                raise PlanMismatchError(f"dtype {dtype} does not match the plan's {first.spec.dtype}")
            if profile != "auto" and profile_for(profile).fingerprint() != first.profile.fingerprint():
                raise PlanMismatchError(f"the plan was compiled for profile {first.profile.name!r}, not {profile!r}")
            self.profile, self.spec, source = first.profile, first.spec, first.weights_source
        else:
            self.profile = profile_for(profile)
            self.spec, source = resolve_model(model or DEFAULT_MODEL, dtype or default_dtype(self.profile))
        if weights is not None:
            source = weights_source_for(weights, source)
        if not source:
            raise UserError(f"the plan names no weights for {self.spec.name}: pass weights=")
        options = CompileOptions(compress=compress, max_block_size=max_block_size, weights_source=source)
        self._plans = PlanCache(self.spec, self.profile, options, self.cache_dir)  # max_block_size: per call
        self.store = open_store(source, self.spec, self.cache_dir)
        self.tokenizer = load_tokenizer(self.store.path)
        self._engines = Engines(self._open_engine)
        self._lock, self._closed = threading.RLock(), False

    # -- context manager -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the open engine (its buffers and scratch files go); later calls are refused."""
        with self._lock:
            self._closed = True
            self._engines.close()

    @contextmanager
    def _open(self, what: str):
        """The call lock, held for the whole call: one engine computes one call at a time (two threads
        interleaving blocks on it answered wrongly), so a second thread's call waits its turn."""
        with self._lock:
            if self._closed:  # checked under the lock: a close() while this call waited counts
                raise UserError(f"{what}: this LLM was closed; make a new one")
            yield

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- generation ------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, progress: Any = True) -> list[Output]:
        """One Output per prompt, in order. sampling: one SamplingParams for all prompts or one per prompt
        (default: greedy, 16 tokens). progress: show a bar, or anything with update(n) to report to."""
        with self._open("generate"):
            return self._generate(prompts, sampling, progress)

    def _generate(self, prompts, sampling, progress) -> list[Output]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise UserError(f"generate: prompts must be a string, a chat or token-id list, or a list of them, "
                            f"got {type(prompts).__name__}")
        prompts = list(prompts)
        params = self._params(sampling, len(prompts))
        reqs = [Request(i, self.prompt_ids(p, i), s.max_tokens, s.runtime(i), stop=self._stops(s, i))
                for i, (p, s) in enumerate(zip(prompts, params))]
        gen_len = max((r.max_tokens for r in reqs), default=1)
        for i, r in enumerate(reqs):  # every prompt has a plan before any block runs
            self._check_fits(i, len(r.prompt_ids), r.max_tokens)
        out: list[Output | None] = [None] * len(reqs)
        with _Progress(progress, len(reqs), "generating") as bar:
            for plan, chunk in self._blocks([len(r.prompt_ids) for r in reqs], [r.max_tokens for r in reqs], gen_len, False):
                outs = run_block(self._engines.get(plan), [reqs[i] for i in chunk], gen_len, self.tokenizer)
                for i, o in zip(chunk, outs):
                    out[i] = o
                bar.update(len(chunk))
        return out  # type: ignore[return-value]

    # -- scoring ---------------------------------------------------------------------------------------
    def score(self, contexts: Sequence[str | Sequence[int]], continuations: Sequence[str | Sequence[int]], *,
              progress: Any = True) -> list[tuple[float, bool]]:
        """(log-probability, is_greedy) of each continuation after its context: the sum of its tokens'
        log-probabilities, and whether each token is the most likely one after what precedes it. Text is
        tokenized apart (the context as the tokenizer does, the continuation without special tokens);
        token ids are taken as they are. Runs scoring plans (Workload(..., score=True))."""
        return [(s.logprob, s.is_greedy) for s in self.score_tokens(contexts, continuations, progress=progress)]

    def score_tokens(self, contexts: Sequence[str | Sequence[int]], continuations: Sequence[str | Sequence[int]], *,
                     progress: Any = True) -> list[Any]:
        """Per continuation token, its log-probability and greedy flag (runtime.driver.Scored), in order."""
        with self._open("score"):
            return self._score_tokens(contexts, continuations, progress)

    def _score_tokens(self, contexts, continuations, progress) -> list[Any]:
        contexts, continuations = list(contexts), list(continuations)
        if len(contexts) != len(continuations):
            raise UserError(f"score: {len(contexts)} contexts but {len(continuations)} continuations")
        pairs = [(self._part(c, i, "context", True), self._part(x, i, "continuation", False))
                 for i, (c, x) in enumerate(zip(contexts, continuations))]
        lengths, conts = [len(c) + len(x) - 1 for c, x in pairs], [len(x) for _, x in pairs]
        for i, (n, m) in enumerate(zip(lengths, conts)):
            self._check_fits(i, n, m, score=True)
        out: list[Any] = [None] * len(pairs)
        with _Progress(progress, len(pairs), "scoring") as bar:
            for plan, chunk in self._blocks(lengths, conts, max(conts, default=1), True):
                engine = self._engines.get(plan)
                got = engine.score([list(pairs[i][0]) for i in chunk], [list(pairs[i][1]) for i in chunk])
                for i, s in zip(chunk, got):
                    out[i] = s
                bar.update(len(chunk))
        return out

    def _part(self, part: str | Sequence[int], index: int, what: str, special: bool) -> tuple[int, ...]:
        if isinstance(part, str):
            ids = self._tokenizer(index)(part, add_special_tokens=special)["input_ids"] if part else []
        elif isinstance(part, Sequence) and all(type(t) is int for t in part):
            ids = self._in_vocab(part, f"request {index}: {what} token id")
        else:
            raise UserError(f"request {index}: the {what} must be a string or a list of token ids, "
                            f"got {type(part).__name__}")
        if not ids:
            raise UserError(f"request {index}: the {what} is empty")
        return tuple(ids)

    # -- prompts ---------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, index: int = 0) -> tuple[int, ...]:
        """A prompt's token ids: a string tokenized, a chat message list through the chat template, token
        ids checked against the vocabulary."""
        if isinstance(prompt, str):
            _unicode(prompt, f"prompt {index}")
            ids = encode(self._tokenizer(index), prompt)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
                raise UserError(f"prompt {index}: chat messages must be {{\"role\": str, \"content\": str}} objects")
            for j, m in enumerate(prompt):
                _unicode(m["content"], f"prompt {index}, message {j}")
            ids = encode(self._tokenizer(index), list(prompt))
        elif isinstance(prompt, Sequence) and all(type(t) is int for t in prompt):
            ids = self._in_vocab(prompt, f"prompt {index}: token id")
        elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
            bad = next(t for t in prompt if type(t) is not int)
            raise UserError(f"prompt {index}: token ids must be integers, got {bad!r} ({type(bad).__name__})")
        else:
            raise UserError(f"prompt {index}: expected a string, a list of chat messages or a list of token ids, "
                            f"got {type(prompt).__name__}")
        if not ids:
            raise UserError(f"prompt {index} is empty")
        return tuple(ids)

    def _in_vocab(self, ids: Sequence[int], what: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.spec.vocab]
        if bad:
            raise UserError(f"{what} {bad[0]} is outside {self.spec.name}'s vocabulary 0..{self.spec.vocab - 1}")
        return list(ids)

    def _tokenizer(self, index: int):
        if self.tokenizer is None:
            raise UserError(f"prompt {index}: these weights come without a tokenizer: give token ids instead of text")
        return self.tokenizer

    def _stops(self, params: SamplingParams, index: int) -> tuple[str, ...]:
        if params.stop and self.tokenizer is None:
            raise UserError(f"prompt {index}: stop strings need a tokenizer, and these weights come without one")
        return params.stop  # type: ignore[return-value]  (normalized to a tuple)

    @staticmethod
    def _params(sampling: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sampling is None:
            return [SamplingParams()] * n
        if isinstance(sampling, SamplingParams):
            return [sampling] * n
        if not isinstance(sampling, Sequence):
            raise UserError(f"sampling: give one SamplingParams or one per prompt ({n}), got {type(sampling).__name__}")
        params = list(sampling)
        if len(params) != n or not all(isinstance(s, SamplingParams) for s in params):
            raise UserError(f"sampling: give one SamplingParams or one per prompt ({n}), got {len(params)} items")
        return params

    # -- plans and blocks ------------------------------------------------------------------------------
    def _check_fits(self, i: int, length: int, second: int, score: bool = False) -> None:
        """Refuse, before any block runs, a request that no plan can take (second: its max_tokens; scoring:
        its continuation's length, and length is context + continuation - 1, what the prefill reads)."""
        what = f"request {i}: context + continuation - 1 = {length} tokens" if score else \
            f"prompt {i} has {length} tokens and max_tokens {second}"
        if self._given is not None:
            if smallest_fitting(self._given, length, second, score) is None:
                kind = "scoring " if score else ""
                lens = ", ".join(f"prompt {p.workload.prompt_len} / {'scored' if score else 'gen'} {p.workload.gen_len}"
                                 for p in self._given if p.workload.score == score) or "none"
                raise UserError(f"{what}: no given {kind}plan takes it (given {kind}plans: {lens})")
            return
        if length + (0 if score else second) > self.spec.max_positions:
            raise UserError(f"{what}: longer than {self.spec.name}'s {self.spec.max_positions} positions")

    def _blocks(self, lengths: list[int], seconds: list[int], call_second: int, score: bool) -> Iterable[tuple[Plan, list[int]]]:
        """(plan, request indices) per block: longest requests first, each block under the plan of its longest."""
        cap = 1 << max(len(lengths) - 1, 0).bit_length()  # a block larger than the call would only add padding
        return blocks(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)),
                      lambda i: self._plan_for(lengths[i], seconds[i], call_second, score, cap),
                      lambda plan, i: fits(plan, lengths[i], seconds[i], score))

    def _plan_for(self, length: int, second: int, call_second: int, score: bool, cap: int) -> Plan:
        if self._given is not None:
            return smallest_fitting(self._given, length, second, score)
        prompt_len = max(16, 1 << (length - 1).bit_length())
        prompt_len = max(length, min(prompt_len, self.spec.max_positions - (0 if score else call_second)))
        # a scoring plan scores the call's longest continuation (each fits its own prompt, so min() keeps them all)
        gen_len = min(call_second, prompt_len) if score else call_second
        most = self._plans.options.max_block_size
        cap = min(cap, most) if most else cap
        [plan] = self._plans.get(Workload(prompt_len, gen_len, score=score), max_block_size=cap)
        return plan

    def _open_engine(self, plan: Plan):
        from runtime.engine import Engine

        return Engine(plan, self.store, self.offload_dir, device=self.device)


def _load_plans(plan: Plan | Sequence[Plan] | str | Path) -> list[Plan]:
    from flexgen_graph import planfile

    if isinstance(plan, (str, Path)):
        plans = planfile.load_set(plan)
    elif isinstance(plan, Plan):
        plans = [plan]
    else:
        plans = list(plan)
        if not plans or not all(isinstance(p, Plan) for p in plans):
            raise UserError("plan: give a Plan, a non-empty list of Plans or a .fgplan file")
    if any(p.stage is not None for p in plans):
        raise UserError("plan: a pipeline plan runs under torchrun, one process per stage (flexgen-graph run)")
    if len({(p.spec.fingerprint(), p.weights_source) for p in plans}) > 1:
        raise UserError("plan: the plans name different models or weights")
    return plans


class _Progress:
    """A tqdm bar of its own (closed at the end), or the caller's object with update(n), or nothing."""

    def __init__(self, progress: Any, total: int, desc: str) -> None:
        self._own = None
        if hasattr(progress, "update"):
            self.bar = progress
        else:
            from tqdm import tqdm

            self.bar = self._own = tqdm(total=total, desc=desc, unit="prompt", disable=not progress)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc) -> None:
        if self._own is not None:
            self._own.close()
