"""Scenario C1: OPT-1.3B with at most 1 GiB of weights in RAM, against transformers and accelerate (CPU).

Systems, all in this process on the same seeded dummy weights (greedy, EOS ignored, exactly
--gen-len new tokens per prompt), alternating within every repetition:

  ours              our engine; every weight on the disk tier (the only placement that keeps its
                    weights in RAM under --weights-ram-gib: its two weight slots alone take 0.80 GiB
                    in float32), block size, cache and activation placement chosen by the planner
  ours-cold         the same plan; every weight read evicts its pages from the page cache
  transformers      `generate` with the whole model in RAM, batches of --peer-batch
  accelerate        `dispatch_model` with accelerate's `infer_auto_device_map(max_memory={"cpu": cap})`:
                    the modules that do not fit the cap live in an offload folder and are read
                    from it on every forward; batches of --peer-batch
  accelerate-cold   the same; the offload folder's pages are dropped before every forward

Throughput = generated tokens / wall time of the system's whole job (prefill + decode). The
table gives medians over the repetitions, ratios to transformers and to accelerate (same page
cache state), the plan's predicted tokens/s, and for our engine how busy each stream was.

    python bench/c1.py                                   # the scenario: 128 prompts, float32
    python bench/c1.py --dtype bfloat16 --prompts 32 --reps 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flexgen_graph.app.api import compile_plan  # noqa: E402
from flexgen_graph.app.models import default_cache_dir, open_store  # noqa: E402
from flexgen_graph.catalog import catalog_spec  # noqa: E402
from flexgen_graph.ir import Workload  # noqa: E402
from flexgen_graph.policy import Placement  # noqa: E402
from planner.predict import BlockRun, predict_plan  # noqa: E402

SYSTEMS = ("ours", "ours-cold", "transformers", "accelerate", "accelerate-cold")
GIB = 2**30


# -- helpers -------------------------------------------------------------------------------------
def disk_read_bytes() -> int:
    """Bytes this process made the block layer read (page-cache hits do not count); 0 where unknown."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def drop_page_cache(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def matmul_rate(dtype: torch.dtype) -> float:
    """FLOP/s of a prefill-sized matmul ([4096, 2048] @ [2048, 8192]) on this machine, best of a few."""
    a, w = torch.randn(4096, 2048, dtype=dtype), torch.randn(2048, 8192, dtype=dtype)
    a @ w
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ w
        best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 2048 * 8192 / best


def flops_per_sequence(spec, prompt_len: int, gen_len: int) -> float:
    """Matmul FLOPs of one sequence: every decoder matmul for every token, the LM head once per new token."""
    h, f = spec.hidden, spec.ffn
    per_token = spec.num_layers * 2 * (4 * h * h + 2 * h * f)
    attn = sum(spec.num_layers * 4 * h * ctx for ctx in range(1, prompt_len + gen_len + 1))
    return (prompt_len + gen_len) * per_token + attn + gen_len * 2 * h * spec.vocab


def opt_config(spec, dtype: torch.dtype):
    from transformers import OPTConfig

    return OPTConfig(hidden_size=spec.hidden, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                     ffn_dim=spec.ffn, vocab_size=spec.vocab, max_position_embeddings=spec.max_positions,
                     word_embed_proj_dim=spec.hidden, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                     dtype=dtype)


def hf_generate(model, prompts: list[list[int]], batch: int, gen_len: int, before_forward=None) -> int:
    n = 0
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[s:s + batch])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                                 min_new_tokens=gen_len, do_sample=False, pad_token_id=1)
            assert out.shape[1] - ids.shape[1] == gen_len
            n += gen_len * len(ids)
    return n


# -- systems -------------------------------------------------------------------------------------
class Ours:
    def __init__(self, plan, store, cold: bool) -> None:
        self.plan, self.store, self.cold = plan, store, cold
        self.busy: dict[str, float] = {}

    def run(self, prompts: list[list[int]], gen_len: int) -> tuple[int, float]:
        from runtime.engine import Engine

        self.disk0 = disk_read_bytes()
        with tempfile.TemporaryDirectory() as off, Engine(self.plan, self.store, off, cold_weights=self.cold) as eng:
            busy = self._instrument(eng)
            t = time.perf_counter()
            n = 0
            for s in range(0, len(prompts), self.plan.block_size):
                gens = eng.generate(prompts[s:s + self.plan.block_size], ignore_eos=True)
                assert all(len(g.token_ids) == gen_len for g in gens)
                n += sum(len(g.token_ids) for g in gens)
            wall = time.perf_counter() - t
            self.peak = eng.peak_bytes
        self.busy = {k: v / wall for k, v in busy.items()}
        return n, wall

    @staticmethod
    def _instrument(eng) -> dict[str, float]:
        """Time every op where its stream's worker runs it: seconds busy per (stream, op kind).
        Wraps the engine's prepared dispatch list, so nothing in the runtime changes for this."""
        busy: dict[str, float] = {}
        dispatch = getattr(eng, "_dispatch", None)
        if dispatch is None:  # the runtime changed shape: run without the breakdown
            return busy
        for name, entries in dispatch.items():
            timed = []
            for stream, thunk, waits, done in entries:
                op = thunk.args[-1] if getattr(thunk, "args", None) else None
                key = f"{stream.value}:{op.kind.value}" if op is not None else stream.value
                busy.setdefault(key, 0.0)  # keys exist before the workers start: no dict growth across threads

                def run(thunk=thunk, key=key) -> None:
                    t = time.perf_counter()
                    thunk()
                    busy[key] += time.perf_counter() - t

                timed.append((stream, run, waits, done))
            dispatch[name] = timed
        return busy


class Transformers:
    def __init__(self, spec, store, dtype: torch.dtype, batch: int) -> None:
        self.spec, self.store, self.dtype, self.batch = spec, store, dtype, batch

    def run(self, prompts, gen_len):
        from transformers import OPTForCausalLM

        from runtime.weight_store import hf_state_dict

        # built per run and freed after it, so the 5 GB copy never squeezes the others' page cache
        with torch.device("meta"):
            model = OPTForCausalLM(opt_config(self.spec, self.dtype))
        model.load_state_dict(hf_state_dict(self.store), strict=True, assign=True)
        model.tie_weights()
        model.eval()
        assert not any(p.is_meta for p in model.parameters())
        self.in_ram = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head counted once
        self.disk0 = disk_read_bytes()  # loading the model is not the run
        t = time.perf_counter()
        n = hf_generate(model, prompts, self.batch, gen_len)
        wall = time.perf_counter() - t
        del model
        gc.collect()
        return n, wall


class Accelerate:
    """transformers' model dispatched by accelerate with a CPU memory cap; the rest in an offload folder."""

    def __init__(self, spec, store, dtype: torch.dtype, batch: int, cap_bytes: int, folder: Path) -> None:
        from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
        from accelerate.utils import offload_state_dict, set_module_tensor_to_device
        from transformers import OPTForCausalLM

        from runtime.weight_store import hf_state_dict

        self.batch, self.folder = batch, folder
        with init_empty_weights():
            model = OPTForCausalLM(opt_config(spec, dtype))
        model.tie_weights()
        dmap = infer_auto_device_map(model, max_memory={"cpu": cap_bytes},
                                     no_split_module_classes=["OPTDecoderLayer"], dtype=dtype)
        if "disk" not in dmap.values():
            raise ValueError(f"a cap of {cap_bytes} bytes leaves nothing on disk: not a disk-offload peer")

        def home(name: str) -> str:
            best = max((m for m in dmap if m == "" or name == m or name.startswith(m + ".")), key=len)
            return dmap[best]

        sd = hf_state_dict(store)
        on_disk = {k: v for k, v in sd.items() if home(k) == "disk"}
        offload_state_dict(str(folder), on_disk)  # what dispatch_model would write; written once, read every forward
        tied = model.lm_head.weight is model.model.decoder.embed_tokens.weight
        for k, v in sd.items():
            if home(k) != "disk" and not (tied and k == "lm_head.weight"):
                set_module_tensor_to_device(model, k, "cpu", value=v)
        if tied and home("lm_head.weight") != "disk":
            model.lm_head.weight = model.model.decoder.embed_tokens.weight  # one copy, as transformers keeps it
        del sd
        gc.collect()
        self.model = dispatch_model(model.eval(), device_map=dmap, offload_dir=str(folder))
        self.in_ram = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)
        self.on_disk = sum(v.numel() * v.element_size() for v in on_disk.values())
        self.n_disk_modules = sum(1 for d in dmap.values() if d == "disk")
        # the offloaded modules' parameters must be empty placeholders: their values come from the folder
        index = json.loads((folder / "index.json").read_text())
        assert all(k in index for k in on_disk), "an offloaded tensor is missing from the folder's index"
        self.drop_hook = None

    def set_cold(self, cold: bool) -> None:
        if self.drop_hook is not None:
            self.drop_hook.remove()
            self.drop_hook = None
        if cold:
            self.drop_hook = self.model.register_forward_pre_hook(lambda *_: drop_page_cache(self.folder))

    def run(self, prompts, gen_len):
        self.disk0 = disk_read_bytes()
        t = time.perf_counter()
        n = hf_generate(self.model, prompts, self.batch, gen_len)
        return n, time.perf_counter() - t


# -- main ----------------------------------------------------------------------------------------
def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="facebook/opt-1.3b", help="an OPT catalog id (default: %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--prompts", type=int, default=128, help="prompts in our engine's job (default: %(default)s)")
    ap.add_argument("--peer-prompts", type=int, default=None,
                    help="prompts in each peer's job (default: --prompts); a peer runs them in batches of "
                         "--peer-batch one after another, so any multiple of --peer-batch gives its throughput")
    ap.add_argument("--peer-batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--profile", default="auto", help="hardware profile for the plan (default: %(default)s)")
    ap.add_argument("--weights-ram-gib", type=float, default=1.0,
                    help="weights our engine (and accelerate) may hold in RAM, GiB (default: %(default)s)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: " + ", ".join(SYSTEMS))
    ap.add_argument("--reps", type=int, default=2, help="repetitions of every warm system (default: %(default)s)")
    ap.add_argument("--cold-reps", type=int, default=None, help="repetitions of the cold systems (default: --reps)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="weight store folder (default: the user cache)")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"--systems: unknown system {s!r} (known: {', '.join(SYSTEMS)})")
    for name in ("prompts", "peer_batch", "prompt_len", "gen_len", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.model.startswith("facebook/opt-"):
        ap.error(f"--model: the peers are built as OPT models, got {args.model!r}")
    peer_prompts = args.peer_prompts or args.prompts
    cold_reps = args.reps if args.cold_reps is None else args.cold_reps
    dtype = getattr(torch, args.dtype)

    from flexgen_graph.app.cli import _profile

    spec = catalog_spec(args.model, dtype=args.dtype)
    t = time.perf_counter()
    store = open_store("dummy:0", spec, args.cache_dir or default_cache_dir())
    print(f"weight store ready in {time.perf_counter() - t:.1f} s", flush=True)
    prompts = [[(97 * i + 13 * j) % (spec.vocab - 3) + 3 for j in range(args.prompt_len)]
               for i in range(max(args.prompts, peer_prompts))]
    cap = int(args.weights_ram_gib * GIB)

    plan = compile_plan(spec, _profile(args.profile), Workload(args.prompt_len, args.gen_len),
                        max_block_size=args.prompts, fixed={"weights": Placement(0, 0, 1)},
                        weights_source="dummy:0")
    w_ram = sum(b.nbytes for b in plan.programs.buffers
                if b.role.value == "weight_slot" or (b.role.value == "weight_home" and b.tier.value != "disk"))
    if w_ram > cap:
        print(f"error: the plan holds {w_ram / GIB:.2f} GiB of weights in RAM, over --weights-ram-gib "
              f"{args.weights_ram_gib}", file=sys.stderr)
        return 2
    pol, pred = plan.policy, plan.predictions
    # the job's blocks as they run (every sequence to full length): planner.predict's figure for that work
    size, steps = plan.block_size, args.gen_len - 1
    job = [BlockRun(min(size, args.prompts - s), steps) for s in range(0, args.prompts, size)]
    job_pred = predict_plan(plan, job).tokens_per_s
    print(f"plan: block {pol.gpu_batch_size} x {pol.num_gpu_batches}, weights on disk ({w_ram / GIB:.2f} GiB of "
          f"weight slots in RAM), cache {pol.cache.as_tuple()}, cpu attention {pol.cpu_attention}; predicted "
          f"{pred['tokens_per_s']:.2f} tokens/s (prefill {pred['prefill_s']:.1f} s, decode step "
          f"{pred['decode_step_s']:.2f} s, bound by {pred['binding']})", flush=True)

    runners: dict[str, object] = {}
    off_tmp = None
    if "ours" in systems:
        runners["ours"] = Ours(plan, store, cold=False)
    if "ours-cold" in systems:
        runners["ours-cold"] = Ours(plan, store, cold=True)
    if "transformers" in systems:
        runners["transformers"] = Transformers(spec, store, dtype, args.peer_batch)
    if "accelerate" in systems or "accelerate-cold" in systems:
        off_tmp = tempfile.TemporaryDirectory(prefix="c1-accelerate-offload-")
        t = time.perf_counter()
        acc = Accelerate(spec, store, dtype, args.peer_batch, cap, Path(off_tmp.name))
        print(f"accelerate: {acc.n_disk_modules} modules ({acc.on_disk / GIB:.2f} GiB) in the offload folder, "
              f"{acc.in_ram / GIB:.2f} GiB of weights in RAM; ready in {time.perf_counter() - t:.1f} s", flush=True)
        for s in ("accelerate", "accelerate-cold"):
            if s in systems:
                runners[s] = acc

    results: dict[str, list[float]] = {s: [] for s in systems}
    busy: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    disk_gb: dict[str, list[float]] = {s: [] for s in systems}
    try:
        for rep in range(max(args.reps, cold_reps)):
            for s in systems:
                if rep >= (cold_reps if s.endswith("-cold") else args.reps):
                    continue
                r = runners[s]
                if isinstance(r, Accelerate):
                    r.set_cold(s.endswith("-cold"))
                gc.collect()
                n, wall = r.run(prompts[:args.prompts] if s.startswith("ours") else prompts[:peer_prompts],
                                args.gen_len)
                disk_gb[s].append((disk_read_bytes() - r.disk0) / 1e9)
                results[s].append(n / wall)
                if isinstance(r, Ours):
                    busy[s].append(r.busy)
                print(f"rep {rep + 1}: {s}: {n} tokens in {wall:.1f} s = {n / wall:.2f} tokens/s, "
                      f"{disk_gb[s][-1]:.1f} GB read from disk; load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if off_tmp is not None:
            off_tmp.cleanup()

    rate = matmul_rate(dtype)
    bound = args.gen_len / (flops_per_sequence(spec, args.prompt_len, args.gen_len) / rate)
    med = {s: statistics.median(v) for s, v in results.items() if v}
    print(f"\n{args.model} {args.dtype} dummy weights, prompt {args.prompt_len}, {args.gen_len} new tokens; our job "
          f"{args.prompts} prompts, peers' jobs {peer_prompts} prompts in batches of {args.peer_batch}; medians of "
          f"{args.reps} (cold: {cold_reps}); profile {plan.profile.name}")
    print("| system | tokens/s | runs | vs transformers | vs accelerate | predicted tokens/s | measured / predicted "
          "| weights in RAM | disk read per run |")
    print("|---|---|---|---|---|---|---|---|---|")
    label = {
        "ours": f"flexgen-graph, block {pol.gpu_batch_size} x {pol.num_gpu_batches}, weights on disk, warm",
        "ours-cold": f"flexgen-graph, block {pol.gpu_batch_size} x {pol.num_gpu_batches}, weights on disk, cold",
        "transformers": f"transformers, all in RAM, batch {args.peer_batch}",
        "accelerate": f"accelerate disk offload, batch {args.peer_batch}, warm",
        "accelerate-cold": f"accelerate disk offload, batch {args.peer_batch}, cold",
    }
    for s in systems:
        if s not in med:
            continue
        v = med[s]
        vs_hf = f"{v / med['transformers']:.2f}x" if "transformers" in med else "-"
        acc_key = "accelerate-cold" if s.endswith("-cold") else "accelerate"
        vs_acc = f"{v / med[acc_key]:.2f}x" if acc_key in med else "-"
        if s.startswith("ours"):
            p = f"{job_pred:.2f}"
            mp = f"{v / job_pred:.2f}"
            ram = f"{w_ram / GIB:.2f} GiB"
        else:
            p = mp = "-"
            ram = f"{runners[s].in_ram / GIB:.2f} GiB"
        runs = " / ".join(f"{x:.2f}" for x in results[s])
        print(f"| {label[s]} | {v:.2f} | {runs} | {vs_hf} | {vs_acc} | {p} | {mp} | {ram} | "
              f"{statistics.median(disk_gb[s]):.1f} GB |")
    print(f"\nCompute bound: {bound:.2f} tokens/s ({flops_per_sequence(spec, args.prompt_len, args.gen_len) / 1e9:.0f} "
          f"GFLOP per sequence at the {rate / 1e9:.0f} GFLOP/s this machine's {args.dtype} prefill-sized matmul "
          f"measured just now)" + "".join(f"; {s} {med[s] / bound:.0%} of it" for s in systems if s in med))
    for s in systems:
        if busy.get(s):
            keys = sorted(busy[s][0])
            share = {k: statistics.median(b[k] for b in busy[s]) for k in keys}
            streams: dict[str, float] = {}
            for k, f in share.items():
                streams[k.split(":")[0]] = streams.get(k.split(":")[0], 0.0) + f
            print(f"{s}: stream busy / wall: " + ", ".join(f"{k} {f:.0%}" for k, f in streams.items()) + " (" +
                  ", ".join(f"{k} {f:.0%}" for k, f in share.items() if f >= 0.005) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
