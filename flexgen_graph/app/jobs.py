"""Batch jobs: JSONL prompts in, JSONL results out, crash-safe and resumable.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} (chat template
applied) or {"id": ..., "prompt_ids": [...]}, with optional "max_tokens", "temperature",
"top_p", "seed", "stop" (a string or a list of them: the text ends before the first). A bad line gets an output record {"id": ..., "error": "..."} (or
{"line": N, "error": ...} without an id) and the job goes on.

The input is read twice and never held in memory: pass 1 validates each line and routes it to
the smallest plan of the set that fits it (remembering only its byte offset); pass 2 runs each
plan's lines in blocks, appending each finished block's records (flush + fsync). Ids already
in the output file are skipped, so re-running an interrupted job resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from tqdm import tqdm

from flexgen_graph.errors import UserError
from runtime.driver import StopStrings
from runtime.sampling import Sampling

KNOWN_FIELDS = {"id", "prompt", "messages", "prompt_ids", "max_tokens", "temperature", "top_p", "seed", "stop"}


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    prompt_ids: tuple[int, ...]
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...] = ()


@dataclass
class JobSummary:
    prompts: int = 0
    errors: int = 0
    skipped: int = 0  # already in the output file (resumed)
    tokens: int = 0
    wall_s: float = 0.0
    predicted_tokens_per_s: list[float] = field(default_factory=list)
    peak_bytes: dict[str, int] = field(default_factory=dict)  # measured, max over the plans run
    interrupted: bool = False  # stopped at a block boundary on request (SIGINT / SIGTERM)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def load_tokenizer(store_path: Path):
    hf = store_path / "hf"
    if not (hf / "tokenizer_config.json").is_file() and not (hf / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf)


def decode_text(tokenizer) -> Callable[[list[int]], str]:
    """How generated tokens read as text (special tokens left out), for outputs and stop strings alike."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


def id_key(rid: Any) -> str:
    return json.dumps(rid, sort_keys=True)


def _chat_ids(tokenizer, messages: list) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def _number(obj: dict, name: str, kind: type, default):
    v = obj.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise UserError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {v!r}")
    return kind(v)


def default_seed(run_seed: int, rid: Any) -> int:
    """A sequence's seed when its line gives none: stable per (run seed, id), whatever the block."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}|{id_key(rid)}".encode()).digest()[:8], "little") >> 1


def parse_line(line: str, lineno: int, tokenizer, defaults: Sampling = Sampling()) -> Request | dict:
    """A Request, or an error record for the output."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return {"line": lineno, "error": f"line {lineno}: invalid JSON ({e.msg})"}
    if not isinstance(obj, dict):
        return {"line": lineno, "error": f"line {lineno}: expected a JSON object"}
    if "id" not in obj:
        return {"line": lineno, "error": f"line {lineno}: missing \"id\""}
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return {"line": lineno, "error": f"line {lineno}: \"id\" must be a string or an integer, got {rid!r}"}

    def err(msg: str) -> dict:
        return {"id": rid, "error": msg}

    unknown = set(obj) - KNOWN_FIELDS
    if unknown:
        return err(f"unknown field(s) {sorted(unknown)} (known: {sorted(KNOWN_FIELDS)})")
    try:
        max_tokens = obj.get("max_tokens")
        if max_tokens is not None and _number(obj, "max_tokens", int, None) < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        sampling = Sampling(temperature=_number(obj, "temperature", float, defaults.temperature),
                            top_p=_number(obj, "top_p", float, defaults.top_p),
                            seed=_number(obj, "seed", int, default_seed(defaults.seed, rid)))
    except ValueError as e:
        return err(str(e))
    stop = obj.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(x, str) and x for x in stop)):
        return err(f"stop must be a non-empty string or a list of them, got {obj['stop']!r}")
    if stop and tokenizer is None:
        return err("stop strings need a tokenizer, and these weights come without one")
    given = [k for k in ("prompt", "messages", "prompt_ids") if k in obj]
    if len(given) != 1:
        return err("exactly one of \"prompt\", \"messages\", \"prompt_ids\" is required")
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in ids):
            return err("prompt_ids must be a list of non-negative integers")
    elif tokenizer is None:
        return err("these weights come without a tokenizer: give \"prompt_ids\" instead of text")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            return err("prompt must be a string")
        ids = tokenizer(obj["prompt"])["input_ids"]
    else:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                        and isinstance(m.get("content"), str) for m in msgs)):
            return err("messages must be a non-empty list of {\"role\": str, \"content\": str} objects")
        ids = _chat_ids(tokenizer, msgs)
    if not ids:
        return err("empty prompt")
    return Request(rid, tuple(ids), max_tokens, sampling, tuple(stop))


def record_key(rec: dict) -> str:
    """The key an output record is done under: its input line's when it names one (an error record
    without a usable id, or a duplicate id's), else its id's."""
    return f"line:{rec.get('line')}" if "line" in rec or "id" not in rec else id_key(rec["id"])


def done_keys(data: bytes) -> set[str]:
    """Keys of the whole records in an output file's bytes (a torn last line is not one)."""
    done = set()
    for raw in data[:data.rfind(b"\n") + 1].splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            done.add(record_key(rec))
    return done


def line_key(text: str, lineno: int) -> str:
    """The key of an input line without tokenizing it: the same key parse_line's result is
    recorded under (its id's when the line has a valid id, else its line number's)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return f"line:{lineno}"
    rid = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return f"line:{lineno}"
    return id_key(rid)


class OutputFile:
    """Append-only JSONL whose records are each written whole, flushed and fsynced.

    Opening repairs a torn last line (a crash mid-write) by cutting it off, and collects the
    keys of the records already there so the job can skip them.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: set[str] = set()
        self._f: TextIO | None = None
        if path is None:
            return
        if path.exists():
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):
                with open(path, "r+b") as f:
                    f.truncate(cut)
            self.done = done_keys(data[:cut])
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        # one write call per record: a crash leaves a whole line or a torn tail that the next open cuts
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def write_lines(self, lines: list[str]) -> None:
        """Append records already serialized (each a whole JSON line ending in a newline), with one
        fsync for all: a crash leaves whole lines and at most a torn tail, which the next open cuts."""
        if self._f is None:
            return
        self._f.writelines(lines)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _lines(path: Path):
    """(byte offset, line number, text) of each non-blank line."""
    with open(path, "rb") as f:
        offset, lineno = 0, 0
        for raw in f:
            lineno += 1
            if raw.strip():
                yield offset, lineno, raw.decode("utf-8", errors="replace")
            offset += len(raw)


def scan(in_path: Path, tokenizer, defaults: Sampling = Sampling()) -> tuple[int, int, int]:
    """(valid prompts, longest prompt, largest max_tokens) of a job, to size a plan for it."""
    count, longest, most = 0, 1, 0
    for _, lineno, text in _lines(in_path):
        r = parse_line(text, lineno, tokenizer, defaults)
        if isinstance(r, Request):
            count, longest, most = count + 1, max(longest, len(r.prompt_ids)), max(most, r.max_tokens or 0)
    return count, longest, most


def route(plans, req: Request) -> int | None:
    """Index of the smallest plan that takes the prompt and its max_tokens, or None."""
    for i, p in enumerate(plans):
        if len(req.prompt_ids) <= p.workload.prompt_len and (req.max_tokens or 0) <= p.workload.gen_len:
            return i
    return None


def plan_requests(in_path: Path, plans, tokenizer, out: OutputFile, defaults: Sampling,
                  summary: JobSummary, mine: Callable[[str], bool] = lambda key: True,
                  done_elsewhere: frozenset[str] = frozenset()) -> list[list[tuple[int, int]]]:
    """Pass 1: validate every line, write error records, route the rest: per plan, (offset, lineno).

    Only lines whose key `mine` accepts are this job's (a shard of a data-parallel run); keys in
    out or in done_elsewhere (records another output already holds) are skipped."""
    routed: list[list[tuple[int, int]]] = [[] for _ in plans]
    seen: set[str] = set()
    longest = max(p.workload.prompt_len for p in plans)
    for offset, lineno, text in _lines(in_path):
        key = line_key(text, lineno)  # before tokenizing: other shards' and finished lines cost no more
        if not mine(key):
            continue
        if key in out.done or key in done_elsewhere:
            summary.skipped += 1
            continue
        r = parse_line(text, lineno, tokenizer, defaults)
        if key in seen and isinstance(r, Request):
            # recorded under its line, not its id: the id's own record is still to come (or resumed)
            r = {"id": r.id, "line": lineno, "error": f"line {lineno}: duplicate id"}
            key = f"line:{lineno}"
            if key in out.done or key in done_elsewhere:
                summary.skipped += 1
                continue
        seen.add(key)
        if isinstance(r, Request):
            i = route(plans, r)
            if i is not None:
                routed[i].append((offset, lineno))
                summary.prompts += 1
                continue
            big = max(plans, key=lambda p: p.workload.gen_len).workload.gen_len
            r = {"id": r.id, "error": f"prompt has {len(r.prompt_ids)} tokens and max_tokens {r.max_tokens}; "
                                     f"the plans take at most {longest} prompt tokens and {big} new tokens"}
        summary.errors += 1
        out.write(r)
    return routed


def run_job(plans, open_engine: Callable, tokenizer, in_path: Path, out: OutputFile, *,
            defaults: Sampling = Sampling(), show: bool = False,
            should_stop: Callable[[], bool] = lambda: False, mine: Callable[[str], bool] = lambda key: True,
            done_elsewhere: frozenset[str] = frozenset()) -> JobSummary:
    """Run every line of in_path; `open_engine(plan)` gives a context-managed Engine for a plan.

    should_stop is polled between blocks: when it says so, the job returns with the finished
    blocks written (summary.interrupted set), and the engine's scratch files are removed.
    mine and done_elsewhere narrow the job to a shard (see plan_requests)."""
    summary = JobSummary()
    routed = plan_requests(in_path, plans, tokenizer, out, defaults, summary, mine, done_elsewhere)
    total = sum(len(r) for r in routed)
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="prompt", disable=not sys.stderr.isatty(), desc="generating")
    with open(in_path, "rb") as f:
        for plan, items in zip(plans, routed):
            if not items or summary.interrupted:
                continue
            summary.predicted_tokens_per_s.append(plan.predictions["tokens_per_s"])
            with open_engine(plan) as engine:
                for start in range(0, len(items), plan.block_size):
                    if should_stop():
                        summary.interrupted = True
                        break
                    chunk = []
                    for offset, lineno in items[start:start + plan.block_size]:
                        f.seek(offset)
                        chunk.append(parse_line(f.readline().decode("utf-8", errors="replace"), lineno,
                                                tokenizer, defaults))
                    stops = [StopStrings(r.stop, decode_text(tokenizer)) if r.stop else None for r in chunk]
                    gens = engine.generate([list(r.prompt_ids) for r in chunk],
                                           [r.max_tokens or plan.workload.gen_len for r in chunk],
                                           [r.sampling for r in chunk], stops=stops)
                    for r, gen, stop in zip(chunk, gens, stops):
                        text = tokenizer.decode(list(gen.token_ids), skip_special_tokens=True) if tokenizer else None
                        text = stop.cut(text) if stop else text
                        out.write({"id": r.id, "text": text, "token_ids": list(gen.token_ids),
                                   "finish_reason": gen.finish_reason})
                        summary.tokens += len(gen.token_ids)
                        if show:
                            tqdm.write(f"[{r.id}] {text if text is not None else list(gen.token_ids)}")
                    bar.update(len(chunk))
                    bar.set_postfix(tok_s=f"{summary.tokens / (time.perf_counter() - t0):.1f}")
                for tier, n in engine.peak_bytes.items():
                    summary.peak_bytes[tier] = max(summary.peak_bytes.get(tier, 0), n)
    bar.close()
    summary.wall_s = time.perf_counter() - t0
    return summary
