"""Batch jobs: JSONL prompts in, JSONL answers out, crash-safe and resumable.

Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} (chat template
applied) or {"id": ..., "prompt_ids": [...]}, with optional "max_tokens", "temperature",
"top_p", "seed", "stop" (a string or a list of them: generation ends at the first, and the text
before it is the answer). The output file holds answers only; a line that cannot be answered gets an error
record {"id": ..., "line": N, "error": "..."} ({"line": N, "error": ...} without a usable id) in the
errors file beside it (errors_path: OUT.errors.jsonl), and the job goes on.

The input is read twice and never held in memory: pass 1 validates each line and routes it to
the smallest plan of the set that fits it (remembering only its byte offset); pass 2 runs each
plan's lines in blocks, appending each answer whole (flush + fsync). A block that fails is retried
line by line, so a line that breaks generation gets an error record and its neighbours their answers.
An id counts as done only when the output holds a valid answer record for it, so re-running an
interrupted job, or one whose bad lines were fixed, answers exactly the ids not answered yet; the
errors file is rewritten on every run to what is still wrong.

Records are made in one place each: answer_record (a request and its generation), error_record (a
LineError); answer_key reads an output line back (the key it answers, or None). Each takes the input
format's shape (fmt: None for native lines, an openai_batch.OpenAIBatch for OpenAI Batch API files,
whose parse gives the same Request / LineError and meets the same per-line checks).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from flexgen_graph.app import openai_batch
from flexgen_graph.errors import DiskFullError, UserError
from planner.predict import HOW, BlockRun, predict_plan
from flexgen_graph.app.session import Engines, Request, blocks, encode, run_block, smallest_fitting
from runtime.sampling import Sampling

KNOWN_FIELDS = {"id", "prompt", "messages", "prompt_ids", "max_tokens", "temperature", "top_p", "seed", "stop"}
BOM = b"\xef\xbb\xbf"
SEED_LIMIT = 1 << 64  # seeds are 64-bit unsigned: torch.Generator.manual_seed's range


@dataclass(frozen=True, slots=True)
class LineError:
    """Why an input line gets no answer; has_id: whether `id` is the line's (a usable id was given);
    code: what kind of failure, for formats whose error records carry one (OpenAI's)."""

    line: int
    message: str
    id: Any = None
    has_id: bool = False
    code: str | None = None


@dataclass
class PlanRun:
    """One plan's part of a job: its blocks as they ran (planner.predict.BlockRun), their tokens and wall
    seconds (engine setup excluded), and the cost model's seconds for those very blocks."""

    prompt_len: int
    gen_len: int
    plan_tokens_per_s: float  # the plan's own prediction: full blocks of full-length generations
    blocks: list = field(default_factory=list)
    tokens: int = 0
    block_s: float = 0.0
    predicted_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.block_s if self.block_s > 0 else 0.0

    @property
    def predicted_tokens_per_s(self) -> float:
        return self.tokens / self.predicted_s if self.predicted_s > 0 else 0.0


@dataclass
class JobSummary:
    prompts: int = 0
    errors: int = 0
    skipped: int = 0  # already answered in the output file (resumed)
    tokens: int = 0
    wall_s: float = 0.0
    predicted_tokens_per_s: list[float] = field(default_factory=list)
    peak_bytes: dict[str, int] = field(default_factory=dict)  # measured, max over the plans run
    plans: list[PlanRun] = field(default_factory=list)  # per plan run, in plan order
    interrupted: bool = False  # stopped at a block boundary on request (SIGINT / SIGTERM)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def lines(self, errors_file: Path | None = None) -> list[str]:
        """The run's summary: measured tokens/s, next to the prediction for the work run, per plan;
        errors_file: where the error records went (named when there are some)."""
        resumed = f", {self.skipped} already done" if self.skipped else ""
        where = f": see {errors_file}" if self.errors and errors_file is not None else ""
        head = (f"{self.prompts} prompts ({self.errors} errors{where}{resumed}), {self.tokens} tokens in "
                f"{self.wall_s:.1f} s: {self.tokens_per_s:.1f} tokens/s")
        block_s, pred_s = sum(r.block_s for r in self.plans), sum(r.predicted_s for r in self.plans)
        if pred_s <= 0 or block_s <= 0:
            return [head]
        out = [f"{head}; in its blocks {self.tokens / block_s:.1f} measured, {self.tokens / pred_s:.1f} predicted "
               f"(measured / predicted {pred_s / block_s:.2f})"]
        for r in self.plans:
            steps = sum(b.decode_steps for b in r.blocks)
            seqs = sum(b.sequences for b in r.blocks)
            out.append(f"  plan prompt {r.prompt_len}, gen {r.gen_len}: {len(r.blocks)} block"
                       f"{'s' * (len(r.blocks) != 1)}, {seqs} sequences, {steps} decode steps: measured "
                       f"{r.tokens_per_s:.1f} tokens/s, predicted {r.predicted_tokens_per_s:.1f}; full blocks of "
                       f"full-length generations: {r.plan_tokens_per_s:.1f}")
        out.append(f"  (predicted: {HOW})")
        return out


def load_tokenizer(store_path: Path):
    hf = store_path / "hf"
    if not (hf / "tokenizer_config.json").is_file() and not (hf / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf)


def id_key(rid: Any) -> str:
    return json.dumps(rid, sort_keys=True)


def _usable_id(rid: Any) -> bool:
    return isinstance(rid, (str, int)) and not isinstance(rid, bool)


# ---------------------------------------------------------------- records (the one place each is made)

def answer_record(req: Request, token_ids: list[int], finish_reason: str, text: str | None, fmt=None) -> dict:
    if fmt is not None:
        return fmt.answer(req, token_ids, finish_reason, text)
    return {"id": req.id, "text": text, "token_ids": token_ids, "finish_reason": finish_reason}


def error_record(err: LineError, fmt=None) -> dict:
    if fmt is not None:
        return fmt.error(err)
    return {"id": err.id, "line": err.line, "error": err.message} if err.has_id else \
        {"line": err.line, "error": err.message}


def answer_key(rec: Any) -> str | None:
    """The key of the id an output line answers, or None when it is not a valid answer record (native,
    or OpenAI's batch output shape, known by its custom_id)."""
    if isinstance(rec, dict) and "custom_id" in rec:
        cid = openai_batch.answered_id(rec)
        return id_key(cid) if _usable_id(cid) else None
    if not isinstance(rec, dict) or "error" in rec or not _usable_id(rec.get("id")):
        return None
    ids, text = rec.get("token_ids"), rec.get("text")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return None
    if rec.get("finish_reason") not in ("stop", "length") or not (text is None or isinstance(text, str)):
        return None
    return id_key(rec["id"])


def done_keys(data: bytes) -> set[str]:
    """Keys of the valid answer records in an output file's bytes (a torn last line is not one)."""
    done = set()
    for raw in data[:data.rfind(b"\n") + 1].splitlines():
        try:
            key = answer_key(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if key is not None:
            done.add(key)
    return done


def _torn_record(tail: bytes) -> bool:
    """Whether an output's unterminated last line is a record this program began and did not finish: its start
    (every record, native or OpenAI's, opens with an "id" key) and no whole JSON value. Only such bytes are cut."""
    try:
        json.loads(tail)
        return False
    except (json.JSONDecodeError, UnicodeDecodeError):
        return tail.startswith(b'{"id": ')


def _not_an_answer(raw: bytes) -> str:
    """Why an output line is not an answer record (for the warning that names it)."""
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "invalid JSON"
    if isinstance(rec, dict) and rec.get("error") is not None:
        return "an error record (errors go to the errors file)"
    return "not an answer record"


# ---------------------------------------------------------------- input lines

def _number(obj: dict, name: str, kind: type, default):
    v = obj.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise UserError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {v!r}")
    if kind is float and not math.isfinite(v):
        raise UserError(f"{name} must be finite, got {v!r}")
    return kind(v)


def default_seed(run_seed: int, rid: Any) -> int:
    """A sequence's seed when its line gives none: stable per (run seed, id), whatever the block."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}|{id_key(rid)}".encode()).digest()[:8], "little") >> 1


def decode_line(raw: bytes, lineno: int, offset: int) -> str | LineError:
    """A line's text: UTF-8 (a BOM opening the file is dropped); anything else is refused by byte offset,
    never replaced (a replaced byte would change the prompt and the id)."""
    if offset == 0 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return LineError(lineno, f"line {lineno}: invalid UTF-8 at byte {e.start} of the line (byte "
                                 f"{offset + e.start} of the file); the input must be UTF-8")


def parse_line(line: str, lineno: int, tokenizer, defaults: Sampling = Sampling(),
               vocab: int | None = None) -> Request | LineError:
    """A Request, or why the line gets none. vocab: token ids must lie in [0, vocab)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return LineError(lineno, f"line {lineno}: invalid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return LineError(lineno, f"line {lineno}: expected a JSON object")
    if openai_batch.is_openai(obj):  # known by its custom_id, as line_key keys it
        rid = obj.get("custom_id")
        msg = ("an OpenAI batch request in a file read as native lines (by its first JSON line, or --format "
               "native): one file holds one format")
        return LineError(lineno, msg, rid, True) if _usable_id(rid) else LineError(lineno, f"line {lineno}: {msg}")
    if "id" not in obj:
        return LineError(lineno, f"line {lineno}: missing \"id\"")
    rid = obj["id"]
    if not _usable_id(rid):
        return LineError(lineno, f"line {lineno}: \"id\" must be a string or an integer, got {rid!r}")

    def err(msg: str) -> LineError:
        return LineError(lineno, msg, rid, True)

    unknown = set(obj) - KNOWN_FIELDS
    if unknown:
        return err(f"unknown field(s) {sorted(unknown)} (known: {sorted(KNOWN_FIELDS)})")
    try:
        max_tokens = obj.get("max_tokens")
        if max_tokens is not None and _number(obj, "max_tokens", int, None) < 1:
            raise UserError(f"max_tokens must be >= 1, got {max_tokens}")
        seed = check_seed(_number(obj, "seed", int, default_seed(defaults.seed, rid)), "seed")
        sampling = Sampling(temperature=_number(obj, "temperature", float, defaults.temperature),
                            top_p=_number(obj, "top_p", float, defaults.top_p), seed=seed)
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
        ids = encode(tokenizer, obj["prompt"])
    else:
        try:
            msgs = openai_batch.chat_messages(obj["messages"], "messages", parts=False)
        except UserError as e:
            return err(str(e))
        ids = encode(tokenizer, msgs)
    if not ids:
        return err("empty prompt")
    if (bad := vocab_error(ids, vocab)) is not None:
        return err(bad)
    return Request(rid, tuple(ids), max_tokens, sampling, lineno, stop=tuple(stop))


def check_seed(seed: int, name: str) -> int:
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def vocab_error(ids, vocab: int | None) -> str | None:
    """Why a prompt's token ids do not fit the model (None when they do)."""
    if vocab is not None and (bad := [(j, i) for j, i in enumerate(ids) if i >= vocab]):
        j, i = bad[0]
        return f"prompt token {j} is id {i}, outside the model's vocabulary [0, {vocab})"
    return None


def _surrogate(x: Any, where: str = "") -> tuple[str, str] | None:
    """(where, the string) of the first string in a parsed JSON value holding a lone surrogate (a \\ud800 escape
    JSON allows but Unicode does not: no tokenizer or UTF-8 writer takes it), or None."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return where or "the line", x
    elif isinstance(x, dict):
        for k, v in x.items():
            if bad := _surrogate(k, f"a key of {where or 'the line'}") or _surrogate(v, f"{where}.{k}" if where else k):
                return bad
    elif isinstance(x, list):
        for i, v in enumerate(x):
            if bad := _surrogate(v, f"{where}[{i}]"):
                return bad
    return None


def surrogate_error(text: str, lineno: int) -> LineError | None:
    """A line whose JSON holds a lone surrogate, refused naming where (with its id when the id is clean)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None  # the format's parser names it
    if (bad := _surrogate(obj)) is None:
        return None
    where, s = bad
    msg = f"line {lineno}: {where} holds a lone surrogate ({ascii(s)[1:-1][:60]}), which is not Unicode"
    rid = openai_batch.line_id(obj) if isinstance(obj, dict) else None
    return LineError(lineno, msg, rid, True) if _usable_id(rid) and _surrogate(rid) is None else LineError(lineno, msg)


def _parse(text: str | LineError, lineno: int, tokenizer, defaults: Sampling, vocab: int | None,
           fmt) -> Request | LineError:
    """A decoded input line as the format reads it (a line that is not UTF-8 stays its LineError)."""
    if isinstance(text, LineError):
        return text
    if (bad := surrogate_error(text, lineno)) is not None:
        return bad
    return (fmt.parse if fmt is not None else parse_line)(text, lineno, tokenizer, defaults, vocab)


def line_key(text: str | LineError, lineno: int) -> str:
    """The key of an input line without tokenizing it: its id's when the line has a valid id (the key
    its answer is done under), else its line number's."""
    if isinstance(text, LineError):
        return f"line:{lineno}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return f"line:{lineno}"
    rid = openai_batch.line_id(obj) if isinstance(obj, dict) else None
    return id_key(rid) if _usable_id(rid) else f"line:{lineno}"


def _lines(path: Path):
    """(byte offset, line number, raw bytes) of each non-blank line."""
    with open(path, "rb") as f:
        offset, lineno = 0, 0
        for raw in f:
            lineno += 1
            if raw.strip() and raw != BOM + b"\n":
                yield offset, lineno, raw
            offset += len(raw)


# ---------------------------------------------------------------- the output, its errors file and its lock

def errors_path(output: Path) -> Path:
    """Where the error records of an output go: OUT.errors.jsonl beside OUT.jsonl."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".errors.jsonl")


class OutputInUseError(UserError):
    """Another process holds the output's lock."""


class OutputLock:
    """An advisory lock (flock) on PATH.lock, held from before any work to the end of the job, so one
    job at a time owns an output; the file names its owner, and goes when the owner is done. The output's
    folder must exist (run's checks before any work refuse a missing one by name)."""

    def __init__(self, path: Path) -> None:
        self.path, self.target = path.with_name(path.name + ".lock"), path
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "a process that just started"
                os.close(fd)
                raise OutputInUseError(f"{path} is being written by another run ({owner}; lock {self.path}): wait "
                                       "for it to finish, or give another output") from None
            try:  # the previous owner may have removed the file between our open and our lock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting opener re-checks the inode
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_input_as_output(in_path: Path, out_path: Path | None) -> None:
    """The input is never written: an output (or its errors or lock file) that is the input file is refused."""
    if out_path is None or not in_path.exists():
        return
    for p in (out_path, errors_path(out_path), out_path.with_name(out_path.name + ".lock")):
        if p.resolve() == in_path.resolve() or (p.exists() and os.path.samefile(p, in_path)):
            raise UserError(f"--output {out_path}: {'it' if p == out_path else p} is the input file {in_path}; "
                            "the input is never written: give another output")


class _Appender:
    """Whole records appended to a file with one write and one fsync each; a failed write is cut back
    off (never a partial record), a full disk is one line naming the file and the bytes."""

    def __init__(self, path: Path, what: str, truncate: bool = False) -> None:
        self.path, self.what = path, what
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0), 0o644)
        self.size = os.fstat(self._fd).st_size

    def append(self, data: bytes) -> None:
        view, done = memoryview(data), 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
            os.fsync(self._fd)
        except OSError as e:
            os.ftruncate(self._fd, self.size)
            if e.errno == errno.ENOSPC:
                raise DiskFullError(self.path, len(data) - done, self.what) from None
            raise
        self.size += len(data)

    def close(self) -> None:
        os.close(self._fd)


def _dumps(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


class OutputFile:
    """The answers of a job (append-only JSONL, each record written whole, flushed and fsynced) and its
    errors file beside it (rewritten by every run: what is still wrong; removed when nothing is).

    Opening repairs a torn last line (a crash mid-write) by cutting it off, collects the keys of the
    valid answer records (done), and notes every other line (invalid: line number, why) for one warning:
    such lines are left in place for the user and do not count as done.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: set[str] = set()
        self.invalid: list[tuple[int, str]] = []
        self.errors_written = 0
        self._out: _Appender | None = None
        self._err: _Appender | None = None
        if path is None:
            return
        if path.exists():
            data = path.read_bytes()
            cut = data.rfind(b"\n") + 1
            if cut < len(data) and _torn_record(data[cut:]):
                with open(path, "r+b") as f:
                    f.truncate(cut)
                print(f"note: {path}: cut off a torn last line ({len(data) - cut} bytes) that an interrupted run "
                      "left", file=sys.stderr)
            elif cut < len(data):  # a whole line, or someone else's bytes: kept, ended so the next record starts anew
                with open(path, "ab") as f:
                    f.write(b"\n")
                data, cut = data + b"\n", len(data) + 1
                print(f"note: {path}: its last line had no final newline; kept it and added one", file=sys.stderr)
            for n, raw in enumerate(data[:cut].split(b"\n")[:-1], 1):
                try:
                    key = answer_key(json.loads(raw))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    key = None
                if key is None:
                    self.invalid.append((n, _not_an_answer(raw)))
                else:
                    self.done.add(key)
        self._out = _Appender(path, "output")
        self.errors_path = errors_path(path)
        self.errors_path.unlink(missing_ok=True)  # rewritten from scratch: what this run finds wrong

    def warn_invalid(self) -> None:
        """One warning naming the output lines that are not answers (they are left for the user)."""
        if self.invalid:
            shown = ", ".join(f"{n} ({why})" for n, why in self.invalid[:5])
            more = f" and {len(self.invalid) - 5} more" if len(self.invalid) > 5 else ""
            print(f"warning: {self.path}: line(s) {shown}{more} are not answer records: left as they are, and their "
                  "ids (if any) are answered again", file=sys.stderr)

    def write(self, record: dict) -> None:
        if self._out is not None:
            self._out.append(_dumps(record))

    def write_lines(self, lines: list[str]) -> None:
        """Append records already serialized (each a whole JSON line ending in a newline), with one
        fsync for all: a failure cuts them all off again."""
        if self._out is not None and lines:
            self._out.append("".join(lines).encode("utf-8"))

    def write_error(self, err: LineError, fmt=None) -> None:
        self.write_error_lines([_dumps(error_record(err, fmt)).decode("utf-8")])

    def write_error_lines(self, lines: list[str]) -> None:
        self.errors_written += len(lines)
        if self.path is None or not lines:
            return
        if self._err is None:
            self._err = _Appender(self.errors_path, "errors file", truncate=True)
        self._err.append("".join(lines).encode("utf-8"))

    def close(self) -> None:
        for f in (self._out, self._err):
            if f is not None:
                f.close()
        self._out = self._err = None


# ---------------------------------------------------------------- pass 1: validate, route, size

DEFAULT_GEN_LEN = 64  # new tokens of a line that gives no max_tokens, when run compiles for its job


def _positions(spec) -> int:
    """How many positions a line's prompt and new tokens may span in the model (its window, if it slides)."""
    return min(spec.max_positions, spec.sliding_window or spec.max_positions)


def job_workload(in_path: Path, tokenizer, defaults: Sampling, spec, prompt_len: int | None = None,
                 gen_len: int | None = None, fmt=None) -> tuple[int, int, int]:
    """(valid prompts, prompt_len, gen_len) of the plan `run` compiles for a job: large enough for every
    line the model can take (prompt + max_tokens within its positions); a line beyond that gets an error
    record when the job routes it, instead of refusing the whole job."""
    limit = _positions(spec)
    count, longest, most, unbounded = 0, 1, 0, False
    for offset, lineno, raw in _lines(in_path):
        r = _parse(decode_line(raw, lineno, offset), lineno, tokenizer, defaults, spec.vocab, fmt)
        if isinstance(r, Request) and len(r.prompt_ids) + (r.max_tokens or 1) <= limit:
            count, longest, most = count + 1, max(longest, len(r.prompt_ids)), max(most, r.max_tokens or 0)
            unbounded |= r.max_tokens is None
    # short prompts to a power of two, longer ones to a multiple of 16: few plans to cache, little padding
    rounded = 1 << (longest - 1).bit_length() if longest < 16 else -(-longest // 16) * 16
    p = prompt_len or min(rounded, limit - 1)
    # a line without max_tokens runs to the default DEFAULT_GEN_LEN; when every line says its own, the longest
    want = max(most, DEFAULT_GEN_LEN) if unbounded or not count else most
    return count, p, gen_len or max(1, min(want, limit - p))


def route(plans, req: Request) -> int | None:
    """Index of the smallest plan that takes the prompt and its max_tokens, or None."""
    plan = smallest_fitting(plans, len(req.prompt_ids), req.max_tokens, score=None)
    return None if plan is None else next(i for i, p in enumerate(plans) if p is plan)


def plan_requests(in_path: Path, plans, tokenizer, out: OutputFile, defaults: Sampling,
                  summary: JobSummary, mine: Callable[[str], bool] = lambda key: True,
                  done_elsewhere: frozenset[str] = frozenset(), show: bool = False,
                  fmt=None) -> list[list[tuple[int, int]]]:
    """Pass 1: validate every line, write error records, route the rest: per plan, (offset, lineno).

    Only lines whose key `mine` accepts are this job's (a shard of a data-parallel run); ids answered
    in out or in done_elsewhere (answers another output already holds) are skipped. The first line of
    an id is the one answered; a later line with the same id is an error, answered or not. fmt: the
    input format (None: native lines; else an openai_batch.OpenAIBatch, which parses and shapes records)."""
    routed: list[list[tuple[int, int]]] = [[] for _ in plans]
    first: dict[str, int] = {}  # id key -> the line that owns it
    vocab = plans[0].spec.vocab
    longest = max(p.workload.prompt_len for p in plans)
    for offset, lineno, raw in _lines(in_path):
        text = decode_line(raw, lineno, offset)
        key = line_key(text, lineno)  # before tokenizing: other shards' and finished lines cost no more
        if not mine(key):
            continue
        if key in first:
            rid = openai_batch.line_id(json.loads(text))
            # a line that is not Unicode says so first: its id could not be written into the error record
            _error(out, summary, surrogate_error(text, lineno) or LineError(
                lineno, f"line {lineno}: duplicate id (first on line {first[key]})", rid, True), show, fmt)
            continue
        first[key] = lineno
        if key in out.done or key in done_elsewhere:
            summary.skipped += 1
            continue
        r = _parse(text, lineno, tokenizer, defaults, vocab, fmt)
        if isinstance(r, Request):
            i = route(plans, r)
            if i is not None:
                routed[i].append((offset, lineno))
                summary.prompts += 1
                continue
            big = max(plans, key=lambda p: p.workload.gen_len).workload.gen_len
            spec = plans[0].spec
            if len(r.prompt_ids) + (r.max_tokens or 1) > _positions(spec):  # the model's limit, not the plans'
                why = f"more than {spec.name}'s {_positions(spec)} positions"
            else:
                why = (f"the plans take at most {longest} prompt tokens and {big} new tokens (given by --plan, "
                       "--prompt-len or --gen-len)")
            r = LineError(lineno, f"prompt has {len(r.prompt_ids)} tokens and max_tokens {r.max_tokens}; {why}",
                          r.id, True)
        _error(out, summary, r, show, fmt)
    return routed


def _error(out: OutputFile, summary: JobSummary, err: LineError, show: bool, fmt=None) -> None:
    summary.errors += 1
    out.write_error(err, fmt)
    if show:
        tqdm.write(f"[{err.id if err.has_id else f'line {err.line}'}] error: {err.message}", file=sys.stderr)


# ---------------------------------------------------------------- pass 2: blocks, a failing line isolated

# the machine's or the setup's faults (a disk, memory, a weight file, a plan): the job stops, nothing is
# blamed on its lines; any other exception while running a block is retried line by line
JOB_FAULTS: tuple[type[BaseException], ...] = (OSError, MemoryError, UserError)


def _job_faults() -> tuple[type[BaseException], ...]:
    import torch

    return JOB_FAULTS + (torch.cuda.OutOfMemoryError,)


def generate_isolating(engine, chunk: list[Request], gen_len: int, tokenizer, on_step=None) -> list:
    """session.run_block over a block; when it fails, each line alone: an Output or the exception per line.

    A failure that every line of a block (of two or more) hits alone is not a line's: it is raised, so a
    broken setup stops the job rather than turn every line into an error record. on_step: the driver's
    per-step callback, for the block's run (the retries of its lines run without it)."""
    faults = _job_faults()
    try:
        return run_block(engine, chunk, gen_len, tokenizer, on_step)
    except faults:
        raise
    except Exception as e:
        if getattr(engine, "link", None) is not None:
            raise  # pipeline stages run each block in lockstep: one stage cannot retry alone
        if len(chunk) == 1:
            return [e]
        results: list = []
        for r in chunk:
            try:
                results.append(run_block(engine, [r], gen_len, tokenizer)[0])
            except faults:
                raise
            except Exception as alone:  # noqa: BLE001  (recorded as that line's error)
                results.append(alone)
        if all(isinstance(x, Exception) for x in results):
            raise e
        return results


def _failure(e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0]
    return f"generation failed: {type(e).__name__}: {first}"[:500]


class Progress:
    """The job's progress bar, moved at every decode step: a block's prompts count in as its steps go
    (its longest limit being the most steps it takes), with the tokens so far, tokens/s and the ETA
    of the job. Only drawn on a terminal."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, disable=not sys.stderr.isatty(), desc="generating",
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")
        self.total, self.done, self.tokens, self.t0 = total, 0, 0, time.perf_counter()
        self._size, self._share, self._moved = 0, 0.0, 0.0

    def block(self, size: int, steps: int) -> None:
        self._size, self._share, self._moved = size, size / max(steps, 1), 0.0

    def step(self, live: int | None) -> None:
        """runtime.driver's on_step: live is how many of the block's sequences made a token this step
        (None: this pipeline stage does not see the tokens)."""
        self.tokens += live or 0
        move = min(self._share, self._size - self._moved)
        self._moved += move
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(move)

    def end_block(self, tokens: int | None = None) -> None:
        """tokens: the job's tokens written so far (a block retried line by line counted some twice)."""
        self.done += self._size
        if tokens is not None:
            self.tokens = tokens
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(self._size - self._moved)
        self._size, self._moved = 0, 0.0

    def _postfix(self) -> str:
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        return f"{self.done}/{self.total} prompts, {self.tokens} tokens, {rate:.1f} tokens/s"

    def close(self) -> None:
        self.bar.close()


def _add_block(run: PlanRun, gens, seconds: float) -> None:
    """A block ran until its longest generation stopped: that many decode steps after the prefill."""
    tokens = sum(len(g.token_ids) for g in gens)
    run.blocks.append(BlockRun(len(gens), max(len(g.token_ids) for g in gens) - 1, tokens))
    run.tokens += tokens
    run.block_s += seconds


def run_job(plans, open_engine: Callable, tokenizer, in_path: Path, out: OutputFile, *,
            defaults: Sampling = Sampling(), show: bool = False,
            should_stop: Callable[[], bool] = lambda: False, mine: Callable[[str], bool] = lambda key: True,
            done_elsewhere: frozenset[str] = frozenset(), fmt=None) -> JobSummary:
    """Run every line of in_path; `open_engine(plan)` gives a context-managed Engine for a plan.

    should_stop is polled between blocks: when it says so, the job returns with the finished
    blocks written (summary.interrupted set), and the engine's scratch files are removed.
    mine and done_elsewhere narrow the job to a shard (see plan_requests); fmt is the input format."""
    summary = JobSummary()
    out.warn_invalid()
    routed = plan_requests(in_path, plans, tokenizer, out, defaults, summary, mine, done_elsewhere, show, fmt)
    vocab = plans[0].spec.vocab
    runs: dict[int, PlanRun] = {}  # by plan index, in the order the plans run
    t0 = time.perf_counter()
    bar = Progress(sum(len(r) for r in routed))
    order = [(k, offset, lineno) for k, items in enumerate(routed) for offset, lineno in items]
    with open(in_path, "rb") as f, Engines(open_engine) as engines:
        # each plan's lines in input order, in blocks of its size: the plan routed to is the one that takes them
        for plan, items in blocks(order, lambda x: plans[x[0]], lambda p, x: plans[x[0]] is p):
            if should_stop():
                summary.interrupted = True
                break
            run = runs.get(items[0][0])
            if run is None:
                summary.predicted_tokens_per_s.append(plan.predictions["tokens_per_s"])
                run = runs[items[0][0]] = PlanRun(plan.workload.prompt_len, plan.workload.gen_len,
                                                  plan.predictions["tokens_per_s"])
                summary.plans.append(run)
            engine = engines.get(plan)
            chunk = []
            for _, offset, lineno in items:
                f.seek(offset)
                r = _parse(decode_line(f.readline(), lineno, offset), lineno, tokenizer, defaults, vocab, fmt)
                if isinstance(r, Request):
                    chunk.append(r)
                else:  # the input changed since pass 1
                    _error(out, summary, r, show, fmt)
            if chunk:
                bar.block(len(chunk), max(r.max_tokens or plan.workload.gen_len for r in chunk))
            t_block = time.perf_counter()
            outs = generate_isolating(engine, chunk, plan.workload.gen_len, tokenizer, bar.step) if chunk else []
            ran = [o for o in outs if not isinstance(o, BaseException)]
            if ran:  # a block retried line by line is timed whole but predicted as one block
                _add_block(run, ran, time.perf_counter() - t_block)
            for r, o in zip(chunk, outs):
                if isinstance(o, BaseException):
                    summary.prompts -= 1
                    _error(out, summary, LineError(r.line, _failure(o), r.id, True, "server_error"), show, fmt)
                    continue
                out.write(answer_record(r, list(o.token_ids), o.finish_reason, o.text, fmt))
                summary.tokens += len(o.token_ids)
                if show:
                    tqdm.write(f"[{r.id}] {o.text if o.text is not None else list(o.token_ids)}")
            bar.end_block(summary.tokens)
            for tier, n in engine.peak_bytes.items():
                summary.peak_bytes[tier] = max(summary.peak_bytes.get(tier, 0), n)
    for k, run in runs.items():
        run.predicted_s = predict_plan(plans[k], run.blocks).seconds
    bar.close()
    summary.wall_s = time.perf_counter() - t0
    return summary
