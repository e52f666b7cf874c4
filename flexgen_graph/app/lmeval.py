"""lm-evaluation-harness backend: `flexgen-graph` as an lm-eval model (pip install 'flexgen-graph[eval]').

    python -m flexgen_graph.app.lmeval --model flexgen-graph --model_args profile=cpu-small \\
        --tasks flexgen_local_mc --include_path tests/lm_eval_tasks

This is lm-eval's own command line (every flag of `lm_eval`) with the model registered first (installed:
`flexgen-graph-lm-eval`): lm-eval 0.4 discovers no third-party models (its registry reads no entry point
group), so a model is registered by importing its module.
From Python, importing this module registers it for `lm_eval.simple_evaluate(model="flexgen-graph", ...)`.

model_args: model (a catalog id with weights, a checkpoint folder or a .gguf; default: the embedded
SmolLM2-135M-Instruct), weights, profile (default auto), plan, dtype, compress, device, cache_dir,
offload_dir, max_block_size, max_length (default: the model's positions), max_gen_toks (default 256).
Requests run as flexgen_graph.LLM runs them: sorted longest first (as lm-eval's HF backend sorts them),
in blocks under plans compiled for them; log-likelihoods come from scoring plans. A request no plan can
take is an error naming it, never truncated.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    import lm_eval.models  # noqa: F401  (lm-eval registers its own models lazily when its registry is empty: first)
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(f"the lm-eval backend needs lm-eval: pip install 'flexgen-graph[eval]' ({e})") from e
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from flexgen_graph.app.llm import LLM, SamplingParams
from flexgen_graph.errors import UserError

NAME = "flexgen-graph"
LLM_ARGS = ("model", "weights", "profile", "plan", "dtype", "compress", "device", "cache_dir", "offload_dir",
            "max_block_size")
# what lm-eval's command line passes every model; the plan picks the block, so batch sizes are not used
HARNESS_ARGS = ("batch_size", "max_batch_size")
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "seed"}


class FlexGenLM(TemplateLM):
    """An lm-eval model over flexgen_graph.LLM: generate_until, loglikelihood, loglikelihood_rolling."""

    def __init__(self, max_length: int | None = None, max_gen_toks: int = 256, **kwargs: Any) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(LLM_ARGS) - set(HARNESS_ARGS))
        if unknown:
            raise UserError(f"{NAME}: unknown model_args key {unknown[0]!r} (known: "
                            f"{', '.join(LLM_ARGS + ('max_length', 'max_gen_toks'))})")
        args = {k: str(v) if k in ("model", "weights", "plan", "dtype", "profile") else v
                for k, v in kwargs.items() if k in LLM_ARGS and v is not None}
        if "device" in args:
            args["device"] = _device(str(args["device"]))
        self.llm = LLM(**args)
        self.tokenizer = self.llm.tokenizer
        if self.tokenizer is None:
            raise UserError(f"{NAME}: the weights of {self.llm.spec.name} come without a tokenizer, which lm-eval needs")
        self._max_length = int(max_length) if max_length is not None else self.llm.spec.max_positions
        self.max_gen_toks = int(max_gen_toks)

    # -- what lm-eval reads ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes (as lm-eval's HF backend: BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As lm-eval's HF backend: the tokenizer's own special tokens unless told, none when the text
        already starts with the prefix token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and prefix and string.startswith(prefix):
            special = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- requests --------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, is_greedy) per (key, context tokens, continuation tokens), in order."""
        for i, (key, ctx, cont) in enumerate(requests):
            what = f"loglikelihood request {i}" + (f" (context ...{key[0][-40:]!r}, continuation {key[1]!r})"
                                                   if key else "")
            if not cont:
                raise UserError(f"{what}: the continuation is empty (after tokenization)")
            if len(ctx) + len(cont) - 1 > self.max_length:
                raise UserError(f"{what}: context {len(ctx)} + continuation {len(cont)} tokens is longer than "
                                f"max_length {self.max_length} + 1 (flexgen-graph does not truncate)")
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        try:
            out = self.llm.score([list(c) for _, c, _ in requests], [list(x) for _, _, x in requests], progress=bar)
        finally:
            bar.close()
        for (key, _, _), ans in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text scored whole, in windows of max_length tokens as lm-eval's HF backend cuts them."""
        windows, counts = [], []
        for (string,) in (r.args for r in requests):
            ws = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            windows += [(None, ctx, cont) for ctx, cont in ws]
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        out, at = [], 0
        for r, n in zip(requests, counts):
            total = sum(s for s, _ in scores[at:at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generations cut at their `until` strings (and EOS), each request with its own generation kwargs."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params = [], []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            unknown = sorted(set(gen_kwargs) - GEN_KWARGS - {"max_new_tokens", "max_tokens", "max_completion_tokens"})
            if unknown:
                raise UserError(f"generate_until request {i}: generation kwarg {unknown[0]!r} is not supported "
                                f"(supported: {', '.join(sorted(GEN_KWARGS))})")
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kw.pop("until", None), eos=eos) if s]
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = self.tok_encode(context)
            if len(ids) + kw["max_gen_toks"] > self.max_length:
                raise UserError(f"generate_until request {i} (context ...{context[-40:]!r}): {len(ids)} context tokens "
                                f"+ max_gen_toks {kw['max_gen_toks']} is longer than max_length {self.max_length} "
                                "(flexgen-graph does not truncate)")
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=kw["max_gen_toks"], temperature=temperature,
                                         top_p=float(kw.get("top_p", 1.0)), seed=kw.get("seed"), stop=tuple(until)))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        try:
            outs = self.llm.generate(prompts, params, progress=bar)
        finally:
            bar.close()
        for r, o in zip(requests, outs):
            self.cache_hook.add_partial("generate_until", r.args, o.text)
        return [o.text for o in outs]


def _device(name: str) -> str:
    """lm-eval's device ("cuda:0", which its command line passes unless told otherwise; "cpu") as the engine's."""
    import torch

    dev = name.split(":")[0]
    if dev not in ("auto", "cpu", "cuda"):
        raise UserError(f"{NAME}: device {name!r} is not one of auto, cpu, cuda")
    if dev == "cuda" and not torch.cuda.is_available():
        print(f"{NAME}: device {name} (lm-eval's default unless --device is given) but no CUDA device is visible: "
              "the plan runs on the CPU backend", file=sys.stderr)
        return "auto"
    return dev


# lazily, by module path: run as __main__ or imported, this module registers the same target, which lm-eval
# imports (as flexgen_graph.app.lmeval) when the model is asked for
model_registry.register(NAME, target="flexgen_graph.app.lmeval:FlexGenLM")


def main() -> None:
    """lm-eval's command line, with flexgen-graph registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
