"""A torchrun entry point for tests/test_pipeline.py: rank R runs stage R of a pipeline plan file over a
block of prompts; rank 0 writes the generations (JSON) once every stage is done.

    torchrun --nproc-per-node S tests/pipeline_worker.py PLAN STORE PROMPTS.json OUT.json

PROMPTS.json: a list of prompts (token id lists), or {"prompts": [...], "max_new_tokens": [...]}.
Each rank also writes OUT.json.rankR: its tokens, its measured peak bytes and how many programs it ran.
"""

import json
import os
import sys

import torch.distributed as dist

from flexgen_graph import planfile
from runtime.engine import Engine
from runtime.stage_link import StageLink
from runtime.weight_store import WeightStore

plan_path, store_path, prompts_path, out_path = sys.argv[1:5]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
try:
    plan = planfile.load_set(plan_path)[rank]
    job = json.loads(open(prompts_path).read())
    prompts, limits = (job, None) if isinstance(job, list) else (job["prompts"], job["max_new_tokens"])
    with Engine(plan, WeightStore(store_path), link=StageLink(plan.stage), device="cpu") as engine:
        gens = engine.generate(prompts, limits)
        peak, runs = engine.peak_bytes, len(engine.step_times)
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([list(g.token_ids) for g in gens], f)
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump({"tokens": [list(g.token_ids) for g in gens], "peak": peak, "runs": runs}, f)
finally:
    dist.destroy_process_group()
