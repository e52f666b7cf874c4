"""Predictions for the work a plan actually runs: the cost model (planner.cost) evaluated on the blocks
as they ran, where a plan's own prediction assumes full blocks of full-length generations.

A block of `sequences` prompts fills its gpu batches in order (runtime.driver): k full ones, then maybe
one of r rows. It runs prefill at the plan's prompt length, then decode steps until its longest
generation stops (early stops included), at the contexts those steps had. The runtime runs the ops of
unfilled gpu batches as no-ops and computes a partly filled one on its r rows, while that batch's
cache records move whole. So a step's cost terms are those of k + 1 full gpu batches, with the compute
terms of one of them replaced by those of a gpu batch of r rows: a step's terms are a part per step
(the weights) plus a part per gpu batch, so the difference of two blocks isolates one batch's part.

    >>> from planner.predict import BlockRun, predict_plan
    >>> full = BlockRun(plan.block_size, plan.workload.gen_len - 1)
    >>> predict_plan(plan, [full]).tokens_per_s == plan.predictions["tokens_per_s"]   # to 6 digits
    True
    >>> predict_plan(plan, [BlockRun(3, 10, tokens=25)]).seconds   # 3 prompts, the last stopped at 11 tokens

Only planner.cost's public functions price a step (phase_costs, StepCost.time_s), so a calibration of
the cost model reaches these figures as it reaches the plan's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from flexgen_graph.hardware import HardwareProfile
from flexgen_graph.ir import Block, Stage, Workload
from flexgen_graph.lower import lower
from flexgen_graph.planfile import Plan
from flexgen_graph.policy import Policy
from flexgen_graph.spec import ModelSpec
from planner.cost import STREAMS, TERMS, Flags, Linear, PhaseCosts, StepCost, phase_costs, policy_fracs
from planner.figures import FigureModel
from planner.memory import Compression, policy_compression

# what `run` prints after a predicted figure, so a reader knows what it stands for
HOW = "cost model on the blocks run: their sequences, the plan's prompt length, decode steps to each block's last stop"
_COMPUTE_TERMS = frozenset(STREAMS["compute"])  # what a partly filled gpu batch does at its filled rows


@dataclass(frozen=True, slots=True)
class BlockRun:
    """One block as it ran: its prompts, the decode steps it ran (a block stops when its longest
    generation does: 0..gen_len - 1), and the tokens it generated (-1: every sequence made
    decode_steps + 1)."""

    sequences: int
    decode_steps: int
    tokens: int = -1

    def __post_init__(self) -> None:
        if self.sequences < 1 or self.decode_steps < 0:
            raise ValueError(f"a block runs >= 1 sequences and >= 0 decode steps, got {self}")

    @property
    def generated(self) -> int:
        return self.tokens if self.tokens >= 0 else self.sequences * (self.decode_steps + 1)


@dataclass(frozen=True, slots=True)
class WorkPrediction:
    """Predicted seconds of some blocks of one plan, and the tokens they generated."""

    prefill_s: float
    decode_s: float
    tokens: int
    blocks: int

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def full_block(plan: Plan) -> BlockRun:
    """The block a plan's own prediction is for: every sequence generates gen_len tokens."""
    return BlockRun(plan.block_size, plan.workload.gen_len - 1)


class Evaluator:
    """One policy's times on blocks of any fill and length, from a figure model of its workload's prompt
    length (planner.figures): what the search asks of a job, and what predict_work sums."""

    def __init__(self, model: FigureModel, profile: HardwareProfile, policy: Policy,
                 comp: Compression | None = None) -> None:
        self.model, self.profile, self.policy = model, profile, policy
        self.flags, self.comp = Flags.of(policy), comp
        self._memo: dict[tuple[int, int, int], PhaseCosts] = {}

    def _costs(self, size: int, count: int, gen_len: int) -> PhaseCosts:
        key = (size, count, gen_len)
        c = self._memo.get(key)
        if c is None:
            # a run of gen_len tokens: its decode steps at their average context (planner.cost.decode_ctx)
            figs = dataclasses.replace(self.model.at(Block(size, count)), gen_len=gen_len)
            c = self._memo[key] = phase_costs(figs, self.profile, self.flags, self.comp)
        return c

    def block_s(self, sequences: int, decode_steps: int) -> tuple[float, float]:
        """(prefill seconds, seconds of all decode steps) of one block of `sequences` prompts."""
        b, nb = self.policy.gpu_batch_size, self.policy.num_gpu_batches
        if not 1 <= sequences <= b * nb:
            raise ValueError(f"a block of {b} x {nb} holds 1..{b * nb} sequences, got {sequences}")
        k, r = divmod(sequences, b)
        gen = decode_steps + 1
        if r == 0:
            parts = [(self._costs(b, k, gen), 1.0)]
        else:  # k + 1 full gpu batches, the compute of one of them at r rows instead of b
            parts = [(self._costs(b, k + 1, gen), 1.0), (self._costs(b, 1, gen), -1.0), (self._costs(r, 1, gen), 1.0)]
        fracs = policy_fracs(self.policy)
        prefill = _phase_s([(c.prefill, w) for c, w in parts], fracs)
        decode = _phase_s([(c.decode, w) for c, w in parts], fracs) if decode_steps else 0.0
        return prefill, decode_steps * decode


def _phase_s(parts: list[tuple[tuple[StepCost, ...], float]], fracs: dict[str, float]) -> float:
    """One run of a phase: per graph layer, the weighted sum of the parts' terms (the link terms from the
    first part alone: a partly filled gpu batch moves what a full one does), then that layer's step time
    as the cost model takes it (StepCost.time_s)."""
    terms: dict[int, list[float]] = {}
    steps: dict[int, StepCost] = {}
    for i, (phase, weight) in enumerate(parts):
        for s in phase:
            t = s.term_times(fracs)
            for j in s.layers:
                steps.setdefault(j, s)
                acc = terms.setdefault(j, [0.0] * len(TERMS))
                for n, name in enumerate(TERMS):
                    if i == 0 or name in _COMPUTE_TERMS:
                        acc[n] += weight * t[name]
    return sum(dataclasses.replace(steps[j], terms=tuple(Linear(v) for v in acc)).time_s({})
               for j, acc in terms.items())


def predict_work(spec: ModelSpec, profile: HardwareProfile, workload: Workload, policy: Policy,
                 blocks: Iterable[BlockRun], stage: Stage | None = None) -> WorkPrediction:
    """Predicted times of `blocks` run under `policy` (compiled for `workload`, on `profile`)."""
    comp = policy_compression(spec, policy) if policy.compresses else None
    ev = Evaluator(FigureModel.sample(lambda blk: lower(spec, workload, blk, stage)), profile, policy, comp)
    prefill = decode = 0.0
    tokens = count = 0
    for blk in blocks:
        if blk.decode_steps >= workload.gen_len:
            raise ValueError(f"a block of a plan generating {workload.gen_len} tokens runs at most "
                             f"{workload.gen_len - 1} decode steps, got {blk.decode_steps}")
        p, d = ev.block_s(blk.sequences, blk.decode_steps)
        prefill, decode, tokens, count = prefill + p, decode + d, tokens + blk.generated, count + 1
    return WorkPrediction(prefill, decode, tokens, count)


def predict_plan(plan: Plan, blocks: Iterable[BlockRun]) -> WorkPrediction:
    """predict_work for a plan. A pipeline stage's plan knows the pipeline's times for a full block and its
    own: the pipeline's are scaled as this stage's own change with the work (the other stages alike)."""
    w = predict_work(plan.spec, plan.profile, plan.workload, plan.policy, blocks, plan.stage)
    pred = plan.predictions
    if plan.stage is None or plan.stage.count == 1 or not pred.get("stage_prefill_s"):
        return w
    fd = pred["decode_step_s"] / pred["stage_decode_step_s"] if pred.get("stage_decode_step_s") else 1.0
    return dataclasses.replace(w, prefill_s=w.prefill_s * pred["prefill_s"] / pred["stage_prefill_s"],
                               decode_s=w.decode_s * fd)
