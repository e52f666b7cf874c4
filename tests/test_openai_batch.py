"""OpenAI Batch API files run unchanged: requests become the engine's, answers leave in OpenAI's batch
output shape (checked with the openai package's own types) carrying what transformers generates; lines
that cannot run go to the errors file in OpenAI's error shape."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from flexgen_graph.app import openai_batch
from flexgen_graph.app.cli import main
from flexgen_graph.app.jobs import (
    LineError,
    Request,
    answer_key,
    errors_path,
    line_key,
    parse_line,
)
from runtime.sampling import Sampling

MODEL = "tiny-chat"  # the checkpoint folder's name: body.model may give it
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, three specials) with a chat template: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_chat_checkpoint(folder, layers: int = 2):
    """A tiny Llama checkpoint with a tokenizer and a chat template, as a Hugging Face folder."""
    torch.manual_seed(0)
    tok = byte_tokenizer()
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL)


def hf_answer(folder, ids: list[int], max_new: int) -> list[int]:
    """transformers' greedy tokens for a prompt, its stop token included (as the engine reports them)."""
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
    return out[0, len(ids):].tolist()


CHAT = [{"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One."}]}]


def batch_line(custom_id, url="/v1/chat/completions", **body):
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": MODEL, **body}}


LINES = [
    batch_line("chat", messages=CHAT, max_completion_tokens=5, temperature=0, top_p=1, n=1, seed=3, user="u1"),
    batch_line("text", url="/v1/completions", prompt="Once upon a time", max_tokens=4, stop=None),
    batch_line("ids", url="/v1/completions", prompt=[5, 6, 7, 8], max_tokens=3),
    batch_line("other-model", messages=CHAT, max_tokens=2) | {"body": {"model": "gpt-4o-mini", "messages": CHAT}},
    batch_line("n2", messages=CHAT, n=2),
    batch_line("tools", messages=CHAT, tools=[]),
    batch_line("embed", url="/v1/embeddings", input="x"),
    {"method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL, "messages": CHAT}},
]


def check_envelope(rec: dict) -> None:
    """OpenAI's documented batch output line: id, custom_id, response (status_code, request_id, body) or error."""
    assert set(rec) == {"id", "custom_id", "response", "error"} and rec["id"].startswith("batch_req_")
    if rec["error"] is None:
        resp = rec["response"]
        assert resp["status_code"] == 200 and isinstance(resp["request_id"], str) and isinstance(resp["body"], dict)
    else:
        assert rec["response"] is None and isinstance(rec["error"]["message"], str) and rec["error"]["code"]


@pytest.fixture(scope="module")
def answered(chat_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    inp, out = tmp / "batch.jsonl", tmp / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    argv = ["run", "--model", str(chat_checkpoint), "--input", str(inp), "--output", str(out),
            "--cache-dir", str(tmp / "cache")]
    assert main(argv) == 3  # --format auto: the first line says OpenAI; exit 3: some lines are in the errors file
    first = out.read_text()
    errors = [json.loads(x) for x in errors_path(out).read_text().splitlines()]
    assert main(argv) == 3  # the same command again: every answer is done already, the errors are found again
    return [json.loads(x) for x in first.splitlines()], errors, out.read_text(), first


def by_custom_id(records):
    return {r["custom_id"]: r for r in records}


def test_answers_are_transformers_tokens_in_openai_shapes_that_the_openai_types_accept(answered, chat_checkpoint):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    records, _, _, _ = answered
    for r in records:
        check_envelope(r)
        assert r["error"] is None and answer_key(r) is not None  # the output holds answers only
    got = by_custom_id(records)
    tok = PreTrainedTokenizerFast.from_pretrained(chat_checkpoint)
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour.\nOne."}]
    chat_ids = list(tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=False))
    cases = {"chat": (chat_ids, 5), "text": (tok("Once upon a time")["input_ids"], 4), "ids": ([5, 6, 7, 8], 3)}
    for cid, (ids, limit) in cases.items():
        body = got[cid]["response"]["body"]
        parsed = (ChatCompletion if cid == "chat" else Completion).model_validate(body)
        want = hf_answer(chat_checkpoint, ids, limit)
        choice = parsed.choices[0]
        text = choice.message.content if cid == "chat" else choice.text
        assert text == tok.decode(want, skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if want[-1] == 2 else "length")
        assert parsed.usage.prompt_tokens == len(ids) and parsed.usage.completion_tokens == len(want)
        assert parsed.usage.total_tokens == len(ids) + len(want) and parsed.model == str(chat_checkpoint)
        assert parsed.object == ("chat.completion" if cid == "chat" else "text_completion")


def test_lines_that_cannot_run_are_error_lines_in_the_errors_file_naming_the_field_and_the_rest_runs(answered):
    from openai.types import BatchError

    records, error_lines, _, _ = answered
    for r in error_lines:
        check_envelope(r)
        assert r["error"] is not None and answer_key(r) is None  # an error line never makes its id done
    got = by_custom_id(records)
    errors = {r["custom_id"]: BatchError.model_validate(r["error"]) for r in error_lines}
    assert errors["n2"].line == 5 and errors["embed"].line == 7  # every error names its input line
    assert "gpt-4o-mini" in errors["other-model"].message and errors["other-model"].code == "model_not_found"
    assert "body.n" in errors["n2"].message
    assert "'tools'" in errors["tools"].message
    assert "/v1/embeddings" in errors["embed"].message
    assert errors[None].line == 8 and "custom_id" in errors[None].message  # no custom_id: known by its line
    assert set(got) == {"chat", "text", "ids"}


def test_a_rerun_answers_nothing_twice(answered):
    _, _, after, first = answered
    again = [json.loads(x) for x in after.splitlines()]
    answers = [r["custom_id"] for r in again if r["error"] is None]
    assert sorted(answers) == ["chat", "ids", "text"]  # each once: answer_key reads them back as done
    assert after == first


def tiny_format(tokenizer=None):
    return openai_batch.OpenAIBatch("org/Tiny-Chat", tokenizer or byte_tokenizer())


def test_body_model_may_be_the_full_name_or_its_last_part_in_any_case_but_nothing_else():
    fmt = tiny_format()
    for name, ok in (("org/Tiny-Chat", True), ("tiny-chat", True), ("TINY-CHAT", True), ("org/other", False),
                     ("gpt-4o-mini", False)):
        r = fmt.parse(json.dumps(batch_line("a", messages=CHAT) | {"body": {"model": name, "messages": CHAT}}), 1,
                      fmt.tokenizer)
        assert isinstance(r, Request) is ok, (name, r)


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 0}, "body.max_tokens"), ({"max_tokens": 3, "max_completion_tokens": 4}, "differ"),
    ({"temperature": "hot"}, "body.temperature"), ({"seed": 1.5}, "body.seed"), ({"stop": ["a"] * 5}, "body.stop"),
    ({"frequency_penalty": 0.5}, "body.frequency_penalty"), ({"stream": True}, "body.stream"),
    ({"logprobs": True}, "body.logprobs"), ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text parts"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "'name'"),
])
def test_what_the_engine_would_not_honour_is_refused_by_name(body, field):
    fmt = tiny_format()
    r = fmt.parse(json.dumps(batch_line("a", messages=CHAT) | {"body": {"model": "tiny-chat", "messages": CHAT,
                                                                         **body}}), 1, fmt.tokenizer)
    assert isinstance(r, LineError) and r.has_id and r.id == "a" and field in r.message, r


def test_body_fields_map_onto_the_request_and_unset_ones_take_the_run_defaults():
    fmt = tiny_format()
    defaults = Sampling(temperature=0.5, top_p=0.9, seed=11)
    line = batch_line("a", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=7, top_p=0.5,
                      seed=4, stop="\n")
    r = fmt.parse(json.dumps(line | {"body": line["body"] | {"model": "tiny-chat"}}), 1, fmt.tokenizer, defaults)
    assert r.id == "a" and r.max_tokens == 7 and r.sampling == Sampling(0.5, 0.5, 4) and r.stop == ("\n",)
    assert list(r.prompt_ids) == fmt.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                   add_generation_prompt=True, tokenize=True,
                                                                   return_dict=False)
    bare = batch_line("b", url="/v1/completions", prompt="hi")
    r = fmt.parse(json.dumps(bare | {"body": bare["body"] | {"model": "tiny-chat"}}), 1, fmt.tokenizer, defaults)
    assert r.max_tokens is None and (r.sampling.temperature, r.sampling.top_p) == (0.5, 0.9)
    native = parse_line(json.dumps({"id": "b", "prompt": "hi"}), 1, fmt.tokenizer, defaults)
    assert r.sampling.seed == native.sampling.seed  # the same default seed for the same id


def test_the_format_is_told_by_the_first_json_object_and_a_line_of_the_other_kind_is_an_error(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("\n{not json\n" + json.dumps(batch_line("a", messages=CHAT)) + "\n")
    assert openai_batch.detect(f) == "openai" and openai_batch.resolve_format("native", f) == "native"
    f.write_text(json.dumps({"id": 1, "prompt_ids": [3]}) + "\n")
    assert openai_batch.detect(f) == "native"
    native = parse_line(json.dumps(batch_line("a", messages=CHAT)), 4, None)
    # read as native by auto or --format native alike: the message names both, and blames no option
    assert native.id == "a" and native.has_id and "one file holds one format" in native.message
    assert "run with" not in native.message
    stray = tiny_format().parse(json.dumps({"id": 7, "prompt": "x"}), 2, None)
    assert stray.id == 7 and stray.has_id and "--format native" in stray.message
    # resuming keys: an input line and its answer line are known by the same key; an error line by none
    fmt = tiny_format()
    req = fmt.parse(json.dumps(batch_line("a", url="/v1/completions", prompt=[5, 6])), 1, fmt.tokenizer)
    assert line_key(json.dumps(batch_line("a")), 1) == answer_key(fmt.answer(req, [7, 2], "stop", "x"))
    assert answer_key(fmt.error(LineError(9, "line 9: x"))) is None
    assert answer_key(fmt.error(LineError(3, "x", "a", True))) is None


def test_openai_lines_meet_the_native_checks_and_their_errors_go_to_the_errors_file_in_openai_shape(tmp_path):
    """Token ids outside the vocabulary, seeds beyond 64 bits, non-finite numbers, bytes that are not UTF-8
    (refused by byte offset before either format reads the line): each named, as for native lines, in
    OpenAI's error shape in the errors file; the good line is routed."""
    from types import SimpleNamespace

    from flexgen_graph.app.jobs import JobSummary, OutputFile, plan_requests

    fmt = tiny_format()

    def line(cid, **body):
        return json.dumps(batch_line(cid, url="/v1/completions", **({"prompt": [5, 6]} | body))).encode() + b"\n"

    utf8 = line("latin1", stop="caf")
    lines = [line("ok"), line("oov", prompt=[5, 100]), line("seed", seed=2**64), line("neg", seed=-1),
             line("nan", temperature=float("nan")), utf8.replace(b"caf", b"caf\xe9")]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"".join(lines))
    plans = [SimpleNamespace(spec=SimpleNamespace(vocab=100), workload=SimpleNamespace(prompt_len=8, gen_len=4))]
    summary, f = JobSummary(), OutputFile(out)
    routed = plan_requests(inp, plans, fmt.tokenizer, f, Sampling(), summary, fmt=fmt)
    f.close()
    assert routed == [[(0, 1)]] and summary.errors == 5 and not out.read_bytes()
    errs = [json.loads(x) for x in errors_path(out).read_text().splitlines()]
    for r in errs:
        check_envelope(r)
    got = {r["error"]["line"]: (r["custom_id"], r["error"]["message"]) for r in errs}
    assert got[2] == ("oov", "prompt token 1 is id 100, outside the model's vocabulary [0, 100)")
    assert got[3][0] == "seed" and "body.seed must be in [0, 2**64)" in got[3][1] and "[0, 2**64)" in got[4][1]
    assert got[5][0] == "nan" and "body.temperature must be finite" in got[5][1]
    at = sum(map(len, lines[:5])) + utf8.index(b"caf") + 3
    assert got[6][0] is None and f"invalid UTF-8 at byte {at - sum(map(len, lines[:5]))} of the line (byte {at} " \
        "of the file)" in got[6][1]
