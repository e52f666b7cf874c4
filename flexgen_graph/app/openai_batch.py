"""OpenAI Batch API files: their input lines become the engine's requests, answers leave in OpenAI's
batch output shape. A file is read as one format throughout: `run --format openai|native`, or `auto`
(the default), which looks at the file's first JSON object.

Input line (one request of OpenAI's batch endpoint):

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}],
              "max_completion_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\\n\\n"]}}

or "url": "/v1/completions" with "prompt" (a string, or token ids) instead of "messages". Fields a
body leaves out take the run's defaults (--temperature, --top-p, --seed: greedy unless told), not
OpenAI's temperature 1; body.model must name the model that runs (a mismatch is an error, never a
substitution). Answer line:

    {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "req_...",
     "body": {"object": "chat.completion", "choices": [...], "usage": {...}, ...}}, "error": null}

Answer lines go to the output; a line that cannot run goes to the errors file beside it (jobs.errors_path)
as {"id": ..., "custom_id": "r1", "response": null, "error": {"code", "message", "line": N}} (custom_id
null when the line has none usable). Lines meet the native lines' checks (jobs: token ids within the
vocabulary, 64-bit seeds, finite numbers, strict UTF-8), and only a valid answer line makes a custom_id
done when a run resumes (answered_id).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexgen_graph.app.session import encode
from flexgen_graph.errors import UserError
from runtime.sampling import Sampling

FORMATS = ("auto", "native", "openai")
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
ENVELOPE = {"custom_id", "method", "url", "body"}
BODY = {
    "chat": {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop"},
    "text": {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop"},
}
# fields accepted only at the value that asks for what this engine does anyway (one greedy-or-sampled
# answer, no penalties, no log-probabilities, no streaming)
NO_EFFECT = {"n": 1, "best_of": 1, "stream": False, "logprobs": False, "echo": False,
             "frequency_penalty": 0, "presence_penalty": 0}
# bookkeeping that does not change an answer
IGNORED = {"user", "metadata", "store", "service_tier"}
# a developer turn is OpenAI's newer name for a system turn
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class InputFormatError(UserError):
    pass


class ModelMismatchError(InputFormatError):
    pass


def is_openai(obj: Any) -> bool:
    """Whether a parsed input line is shaped as an OpenAI batch request (by its envelope fields)."""
    return isinstance(obj, dict) and ("custom_id" in obj or "body" in obj)


def line_id(obj: dict) -> Any:
    """The id a line is known by: its custom_id when it is an OpenAI batch line, else its id."""
    return obj.get("custom_id") if is_openai(obj) else obj.get("id")


def detect(path: Path) -> str:
    """'openai' or 'native', by the file's first line that is a JSON object."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return "openai" if is_openai(obj) else "native"
    return "native"


def resolve_format(name: str, path: Path) -> str:
    if name not in FORMATS:
        raise InputFormatError(f"--format {name!r}: expected one of {', '.join(FORMATS)}")
    return detect(path) if name == "auto" else name


def needs_tokenizer(path: Path, fmt: str) -> tuple[int, str] | None:
    """(line number, what it gives) of the first line that cannot run without a tokenizer, or None:
    a native line with text ("prompt" or "messages"), or any OpenAI line (its answer is text)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if fmt == "openai" and is_openai(obj):
                return lineno, "an OpenAI batch request (its answer is text)"
            text = [k for k in ("prompt", "messages") if isinstance(obj, dict) and k in obj]
            if fmt == "native" and text:
                return lineno, f"text (\"{text[0]}\")"
    return None


def answered_id(rec: dict) -> Any:
    """The custom_id an output line answers when it is a whole answer line of this module's shape, else None
    (an error line, or one cut or edited into something else, makes nothing done)."""
    resp = rec.get("response")
    if rec.get("error") is not None or not isinstance(resp, dict) or resp.get("status_code") != 200:
        return None
    body = resp.get("body")
    choices = body.get("choices") if isinstance(body, dict) else None
    if not (isinstance(choices, list) and len(choices) == 1 and isinstance(choices[0], dict)):
        return None
    choice = choices[0]
    text = choice["message"].get("content") if isinstance(choice.get("message"), dict) else choice.get("text")
    if choice.get("finish_reason") not in ("stop", "length") or not isinstance(text, str):
        return None
    return rec.get("custom_id")


@dataclass(frozen=True, slots=True)
class Meta:
    """What an answer's OpenAI shape needs beyond the native request."""

    kind: str  # "chat" or "text"


def _absent(v: Any) -> bool:
    return v is None  # OpenAI reads an explicit null as the field left out


def _int(body: dict, name: str, low: int | None = None) -> int | None:
    v = body.get(name)
    if _absent(v):
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputFormatError(f"body.{name} must be an integer, got {v!r}")
    if low is not None and v < low:
        raise InputFormatError(f"body.{name} must be >= {low}, got {v}")
    return v


def _float(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if _absent(v):
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputFormatError(f"body.{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise InputFormatError(f"body.{name} must be finite, got {v!r}")
    return float(v)


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if _absent(v):
        return ()
    stops = [v] if isinstance(v, str) else v
    if not (isinstance(stops, list) and 1 <= len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)):
        raise InputFormatError(f"body.stop must be a non-empty string or a list of 1 to 4 of them, got {v!r}")
    return tuple(stops)


def chat_messages(v: Any, where: str = "body.messages", parts: bool = True) -> list[dict]:
    """Chat messages as the tokenizer's chat template takes them (roles mapped by ROLES), or an InputFormatError
    naming `where` and the message: each exactly {"role", "content"}. parts: content may also be a list of text
    parts (OpenAI's; joined by newlines), else a string only (native lines)."""
    if not (isinstance(v, list) and v):
        raise InputFormatError(f"{where} must be a non-empty list"
                               + ("" if parts else " of {\"role\": str, \"content\": str} objects"))
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise InputFormatError(f"{where}[{i}] must be an object")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise InputFormatError(f"{where}[{i}]: field(s) {extra} not supported (only role and content)")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputFormatError(f"{where}[{i}].role {role!r} not supported (known: {', '.join(ROLES)})")
        if parts and isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InputFormatError(f"{where}[{i}].content: only text parts ({{\"type\": \"text\", "
                                       "\"text\": ...}) are supported")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputFormatError(f"{where}[{i}].content must be a string"
                                   + (" or a list of text parts" if parts else f", got {type(content).__name__}"))
        out.append({"role": ROLES[role], "content": content})
    return out


def _prompt(v: Any, tokenizer) -> list[int]:
    """/v1/completions' prompt: a string or a list of token ids (a one-element list of either is one prompt)."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
        v = v[0]
    if isinstance(v, str):
        return encode(tokenizer, v)
    if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return list(v)
    raise InputFormatError("body.prompt must be one string or one list of token ids (one prompt per line)")


class OpenAIBatch:
    """The OpenAI batch format of one run: parses its lines, shapes its answers and error records.

    model: the name of the model that runs (the plan's); names: the other names body.model may give it."""

    name = "openai"

    def __init__(self, model: str, tokenizer, names: tuple[str, ...] = ()) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.names = {n.lower() for n in (model, model.rstrip("/").rsplit("/", 1)[-1], *names) if n}

    def parse(self, text: str, lineno: int, tokenizer, defaults: Sampling = Sampling(), vocab: int | None = None):
        """A jobs.Request, or a jobs.LineError (which error() shapes), as jobs.parse_line gives for native
        lines. vocab: token ids must lie in [0, vocab)."""
        from flexgen_graph.app.jobs import LineError  # here: jobs imports this module

        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return LineError(lineno, f"line {lineno}: invalid JSON ({e.msg})")
        rid = line_id(obj) if isinstance(obj, dict) else None
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            what = "a JSON object" if not isinstance(obj, dict) else "\"custom_id\" (a string)"
            return LineError(lineno, f"line {lineno}: expected {what}")
        try:
            if not is_openai(obj):
                raise InputFormatError("not an OpenAI batch request (no custom_id, body): this file is read as "
                                       "OpenAI's batch format (run --format native for native lines)")
            extra = sorted(set(obj) - ENVELOPE)
            if extra:
                raise InputFormatError(f"field(s) {extra} not supported (known: {sorted(ENVELOPE)})")
            if obj.get("method", "POST") != "POST":
                raise InputFormatError(f"method {obj.get('method')!r} not supported (only POST)")
            kind = ENDPOINTS.get(obj.get("url"))
            if kind is None:
                raise InputFormatError(f"url {obj.get('url')!r} not supported (known: {', '.join(ENDPOINTS)})")
            body = obj.get("body")
            if not isinstance(body, dict):
                raise InputFormatError("body must be an object")
            return self._request(rid, lineno, kind, body, tokenizer, defaults, vocab)
        except (UserError, ValueError) as e:
            code = "model_not_found" if isinstance(e, ModelMismatchError) else None
            return LineError(lineno, str(e), rid, True, code)

    def _request(self, rid, lineno: int, kind: str, body: dict, tokenizer, defaults: Sampling, vocab: int | None):
        from flexgen_graph.app import jobs  # here: jobs imports this module

        unknown = sorted(set(body) - BODY[kind] - NO_EFFECT.keys() - IGNORED)
        if unknown:
            raise InputFormatError(f"body field(s) {unknown} not supported for {kind} completions "
                                   f"(known: {sorted(BODY[kind] | NO_EFFECT.keys() | IGNORED)})")
        for name, want in NO_EFFECT.items():
            if not _absent(body.get(name)) and body[name] != want:
                raise InputFormatError(f"body.{name} {body[name]!r} not supported (only {json.dumps(want)})")
        model = body.get("model")
        if not isinstance(model, str):
            raise InputFormatError("body.model is required (the name of the model that runs)")
        if model.lower() not in self.names:
            raise ModelMismatchError(f"body.model {model!r} is not the model that runs ({self.model!r}); "
                                     "write its name (no other model is substituted)")
        limit = _int(body, "max_tokens", 1)
        if kind == "chat":
            newer = _int(body, "max_completion_tokens", 1)
            if newer is not None and limit is not None and newer != limit:
                raise InputFormatError(f"body.max_tokens {limit} and body.max_completion_tokens {newer} differ")
            limit = newer if newer is not None else limit
        seed = _int(body, "seed")
        if seed is not None:
            jobs.check_seed(seed, "body.seed")
        sampling = Sampling(temperature=_float(body, "temperature", defaults.temperature),
                            top_p=_float(body, "top_p", defaults.top_p),
                            seed=jobs.default_seed(defaults.seed, rid) if seed is None else seed)
        stop = _stop(body)
        if tokenizer is None:
            raise InputFormatError("these weights come without a tokenizer, which OpenAI batch lines need "
                                   "(their answers are text): run with --tokenizer")
        if kind == "chat":
            ids = encode(tokenizer, chat_messages(body.get("messages")))
        elif "prompt" not in body:
            raise InputFormatError("body.prompt is required for /v1/completions")
        else:
            ids = _prompt(body["prompt"], tokenizer)
        if not ids:
            raise InputFormatError("empty prompt")
        if (bad := jobs.vocab_error(ids, vocab)) is not None:
            raise InputFormatError(bad)
        return jobs.Request(rid, tuple(ids), limit, sampling, lineno, meta=Meta(kind), stop=stop)

    def answer(self, req, token_ids: list[int], finish_reason: str, text: str | None) -> dict:
        """The batch output line of an answered request (jobs.answer_record's OpenAI shape): its text and
        tokens as the job's block ended them (session.run_block: cut at the request's stop strings)."""
        meta: Meta = req.meta
        text, count, finish = text or "", len(token_ids), finish_reason
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": count,
                 "total_tokens": len(req.prompt_ids) + count}
        if meta.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
            body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion"}
        body.update(created=int(time.time()), model=self.model, choices=[choice], usage=usage)
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": req.id,
                "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                "error": None}

    def error(self, err) -> dict:
        """The batch error line of a request that cannot run, from its jobs.LineError (error_record's shape)."""
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": err.id if err.has_id else None, "response": None,
                "error": {"code": err.code or "invalid_request", "message": err.message, "line": err.line}}


def for_run(name: str, model: str, tokenizer, names: tuple[str, ...] = ()) -> OpenAIBatch | None:
    """The format object run_job takes: None for native lines, an OpenAIBatch for OpenAI's."""
    return OpenAIBatch(model, tokenizer, names) if name == "openai" else None
