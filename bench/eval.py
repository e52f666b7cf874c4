"""The local lm-eval tasks through our backend and through lm-eval's own `hf` backend, in one run.

Both evaluate the embedded SmolLM2-135M-Instruct (float32) on the same weights: the GGUF imported once into
the weight store, and that store written back as a Hugging Face folder for the `hf` backend. Each backend's
wall time covers its whole `lm_eval.simple_evaluate` call (loading the model included); the run checks that
both gave the same generations, log-likelihoods within 1e-4 and the same metrics, and prints a markdown table.
Needs lm-eval and accelerate (pip install -e '.[eval,bench]').

    python bench/eval.py --profile auto --hf-batch-size 8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("flexgen_local_mc", "flexgen_local_gen", "flexgen_local_ppl")
METRICS = {"flexgen_local_mc": "acc,none", "flexgen_local_gen": "exact_match,last_word",
           "flexgen_local_ppl": "word_perplexity,none"}


def hf_folder(dest: Path) -> Path:
    """The embedded model's imported store as a Hugging Face checkpoint folder."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from flexgen_graph.app.models import default_cache_dir, open_store, resolve_model
    from flexgen_graph.catalog import DEFAULT_MODEL
    from runtime.weight_store import hf_state_dict

    spec, source = resolve_model(DEFAULT_MODEL, "float32")
    store = open_store(source, spec, default_cache_dir())
    model = LlamaForCausalLM(AutoConfig.from_pretrained(store.path / "hf")).eval()
    model.load_state_dict(hf_state_dict(store), strict=True)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(store.path / "hf").save_pretrained(dest)
    return dest


def evaluate(model: str, model_args: str, tasks: list[str], **kw) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ROOT / "tests" / "lm_eval_tasks"), include_defaults=False)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=tm, log_samples=True,
                                  **kw)
    return out, time.perf_counter() - t0


def compare(ours: dict, hf: dict, tasks: list[str]) -> list[str]:
    """What differs between the two runs, request by request (empty: the same)."""
    bad = []
    for task in tasks:
        for x, y in zip(ours["samples"][task], hf["samples"][task], strict=True):
            for (u,), (v,) in zip(x["resps"], y["resps"], strict=True):
                if isinstance(u, str) or isinstance(v, str):
                    same = u == v
                else:
                    u, v = (u, False) if isinstance(u, float) else u, (v, False) if isinstance(v, float) else v
                    same = abs(u[0] - v[0]) <= 1e-4 and u[1] == v[1]
                if not same:
                    bad.append(f"{task} doc {x['doc_id']}: {u!r} vs {v!r}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="auto", help="our backend's hardware profile (default: auto)")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="lm-eval hf backend's batch size (default 8)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated local tasks")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)  # the tasks name their JSONL files from the repository root
    import flexgen_graph.app.lmeval  # noqa: F401  (registers the backend)

    tasks = args.tasks.split(",")
    with tempfile.TemporaryDirectory(prefix="smollm2-hf-") as d:
        folder = hf_folder(Path(d))
        ours, ours_s = evaluate("flexgen-graph", f"profile={args.profile}", tasks)
        hf, hf_s = evaluate("hf", f"pretrained={folder},dtype=float32", tasks, device="cpu", batch_size=args.hf_batch_size)
    bad = compare(ours, hf, tasks)
    requests = {t: sum(len(s["resps"]) for s in ours["samples"][t]) for t in tasks}
    print(f"\n{sum(requests.values())} requests ({', '.join(f'{t}: {n}' for t, n in requests.items())}); "
          f"per request {'the same' if not bad else f'{len(bad)} differ: ' + '; '.join(bad[:5])}\n")
    print("| backend | wall s | " + " | ".join(f"{t} {METRICS[t].split(',')[0]}" for t in tasks) + " |")
    print("|---|---|" + "---|" * len(tasks))
    for name, res, s in (("flexgen-graph", ours, ours_s), (f"hf (batch {args.hf_batch_size})", hf, hf_s)):
        vals = " | ".join(f"{res['results'][t][METRICS[t]]:.4g}" for t in tasks)
        print(f"| {name} | {s:.1f} | {vals} |")
    print(f"\nhf wall / flexgen-graph wall = {hf_s / ours_s:.2f}x")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
