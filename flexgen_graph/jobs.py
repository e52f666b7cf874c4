"""Batch jobs: read prompts from JSONL, tokenize, run them block by block, write JSONL results.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} (chat template
applied) or {"id": ..., "prompt_ids": [...]}, with an optional "max_tokens". A bad line gets an
output record {"id": ..., "error": "..."} and the job goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

KNOWN_FIELDS = {"id", "prompt", "messages", "prompt_ids", "max_tokens"}


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    prompt_ids: tuple[int, ...]
    max_tokens: int | None


@dataclass
class JobSummary:
    prompts: int = 0
    errors: int = 0
    tokens: int = 0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def load_tokenizer(store_path: Path):
    hf = store_path / "hf"
    if not (hf / "tokenizer_config.json").is_file() and not (hf / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf)


def _chat_ids(tokenizer, messages: list) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def parse_line(line: str, lineno: int, tokenizer) -> Request | dict:
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

    def err(msg: str) -> dict:
        return {"id": rid, "error": msg}

    unknown = set(obj) - KNOWN_FIELDS
    if unknown:
        return err(f"unknown field(s) {sorted(unknown)} (known: {sorted(KNOWN_FIELDS)})")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        return err(f"max_tokens must be a positive integer, got {max_tokens!r}")
    given = [k for k in ("prompt", "messages", "prompt_ids") if k in obj]
    if len(given) != 1:
        return err("exactly one of \"prompt\", \"messages\", \"prompt_ids\" is required")
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return err("prompt_ids must be a list of integers")
    elif tokenizer is None:
        return err("these weights come without a tokenizer: give \"prompt_ids\" instead of text")
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            return err("prompt must be a string")
        ids = tokenizer(obj["prompt"])["input_ids"]
    else:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m and "content" in m
                                                        for m in msgs)):
            return err("messages must be a non-empty list of {\"role\", \"content\"} objects")
        ids = _chat_ids(tokenizer, msgs)
    if not ids:
        return err("empty prompt")
    return Request(rid, tuple(ids), max_tokens)


def read_requests(path: Path, tokenizer) -> tuple[list[Request], list[dict]]:
    reqs, errors, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = parse_line(line, lineno, tokenizer)
            if isinstance(r, Request):
                key = json.dumps(r.id, sort_keys=True)
                if key in seen:
                    errors.append({"id": r.id, "error": f"line {lineno}: duplicate id"})
                    continue
                seen.add(key)
                reqs.append(r)
            else:
                errors.append(r)
    return reqs, errors


def _write(out: TextIO | None, record: dict) -> None:
    if out is None:
        return
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    os.fsync(out.fileno())


def run_requests(engine, tokenizer, reqs: list[Request], errors: list[dict], out: TextIO | None,
                 show: bool = False) -> JobSummary:
    """Run every request through the engine in blocks of the plan's size, writing records as blocks finish."""
    summary = JobSummary(prompts=len(reqs), errors=len(errors))
    for rec in errors:
        _write(out, rec)
    plan = engine.plan
    block, p_len, g_len = plan.block_size, plan.workload.prompt_len, plan.workload.gen_len
    runnable = []
    for r in reqs:
        if len(r.prompt_ids) > p_len:
            summary.errors += 1
            _write(out, {"id": r.id, "error": f"prompt has {len(r.prompt_ids)} tokens; the plan takes at most {p_len}"})
        elif r.max_tokens is not None and r.max_tokens > g_len:
            summary.errors += 1
            _write(out, {"id": r.id, "error": f"max_tokens {r.max_tokens} exceeds the plan's gen_len {g_len}"})
        else:
            runnable.append(r)
    t0 = time.perf_counter()
    bar = tqdm(total=len(runnable), unit="prompt", disable=not sys.stderr.isatty(), desc="generating")
    for start in range(0, len(runnable), block):
        chunk = runnable[start:start + block]
        gens = engine.generate([list(r.prompt_ids) for r in chunk], [r.max_tokens or g_len for r in chunk])
        for r, gen in zip(chunk, gens):
            text = tokenizer.decode(list(gen.token_ids), skip_special_tokens=True) if tokenizer else None
            _write(out, {"id": r.id, "text": text, "token_ids": list(gen.token_ids),
                         "finish_reason": gen.finish_reason})
            summary.tokens += len(gen.token_ids)
            if show:
                tqdm.write(f"[{r.id}] {text if text is not None else list(gen.token_ids)}")
        bar.update(len(chunk))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(tok_s=f"{summary.tokens / elapsed:.1f}")
    bar.close()
    summary.wall_s = time.perf_counter() - t0
    return summary
