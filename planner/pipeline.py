"""Pipeline parallelism (FlexGen's multi-GPU mode): the layers split into stages, one process each.

Stage i computes gpu batch k while stage i+1 computes batch k-1. Prefill costs the stages' times for
one gpu batch, one after the other (the first batch's way through), plus the slowest stage's time for
each later batch (the pipeline full). In decode the last stage hands each gpu batch's tokens straight
to the first, so the steps overlap: a decode step costs the busiest stage's time for the whole block,
unless one gpu batch's way round all the stages is longer (too few gpu batches to keep them all busy).
So the split balances the stages' predicted times, and enough gpu batches keep the ring full.

    >>> split_layers([1, 4, 4, 4, 4, 1], 2, [False, True, True, True, True, False])
    ((0, 3), (3, 6))
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from flexgen_graph.errors import UserError
from flexgen_graph.hardware import Calibration, HardwareProfile, LayerCurve
from flexgen_graph.layout import ceil_div
from planner.cost import Predictions, sig


def split_layers(times: Sequence[float], stages: int, decoder: Sequence[bool],
                 weight_bytes: Sequence[int] | None = None, capacity: int | None = None) -> tuple[tuple[int, int], ...]:
    """Contiguous ranges [first, end) of the graph layers, one per stage, each holding a decoder layer
    (and, given them, weights of at most `capacity` bytes: a stage's weights stay on its GPU), that
    minimize the largest sum of `times` over a range (the earliest split among equals)."""
    n = len(times)
    if not 1 <= stages <= sum(decoder):
        raise UserError(f"{stages} stages for a model of {sum(decoder)} decoder layers: each stage needs one")
    prefix = [0.0]
    for t in times:
        prefix.append(prefix[-1] + t)
    has_dec, wsum = [0], [0]
    for d, w in zip(decoder, weight_bytes or [0] * n, strict=True):
        has_dec.append(has_dec[-1] + bool(d))
        wsum.append(wsum[-1] + w)
    inf = float("inf")
    # best[s][i]: the least largest sum splitting layers [0, i) into s stages; cut[s][i]: where the last begins
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(1, n + 1):
            for j in range(i):
                if best[s - 1][j] == inf or has_dec[i] == has_dec[j]:
                    continue
                if capacity is not None and wsum[i] - wsum[j] > capacity:
                    continue
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    if best[stages][n] == inf:
        gib = 1 << 30
        raise UserError(f"the weights ({wsum[n] / gib:.1f} GiB) do not split into {stages} stages of at most "
                         f"{capacity / gib:.2f} GiB each (a stage keeps its weights on its GPU): use at least "
                         f"{ceil_div(wsum[n], capacity)} stages, or a single-process plan, which streams the weights")
    out, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        out.append((j, i))
        i = j
    return tuple(reversed(out))


def step_s(stage_times: Sequence[float], num_gpu_batches: int) -> float:
    """One step (prefill or a decode step) of the pipeline, from each stage's time for the whole block:
    the first gpu batch passes every stage, then the slowest stage paces the others."""
    per_batch = [t / num_gpu_batches for t in stage_times]
    return sum(per_batch) + (num_gpu_batches - 1) * max(per_batch)


def ring_step_s(stage_times: Sequence[float], num_gpu_batches: int) -> float:
    """One decode step of the pipeline, from each stage's time for the whole block, when the tokens of
    each gpu batch go round (last stage to first) without waiting for the step to end."""
    return max(max(stage_times), sum(t / num_gpu_batches for t in stage_times))


def pipeline_predictions(stages: Sequence[Predictions], num_gpu_batches: int, block_size: int,
                         gen_len: int) -> dict:
    """The run's times and tokens/s from the stages' own predictions (each with its stage link)."""
    prefill = step_s([p.prefill_s for p in stages], num_gpu_batches)
    decode = ring_step_s([p.decode_step_s for p in stages], num_gpu_batches)
    total = prefill + (gen_len - 1) * decode
    return {"tokens_per_s": sig(block_size * gen_len / total) if total > 0 else float("inf"),
            "prefill_s": sig(prefill), "decode_step_s": sig(decode), "total_s": sig(total)}


def stage_predictions(own: Predictions, pipeline: dict) -> dict:
    """A stage plan's predictions: the pipeline's times (what `run` reports), the stage's own peaks and
    binding term, and its own times under stage_*."""
    d = own.to_dict()
    d.update({f"stage_{k}": d[k] for k in ("prefill_s", "decode_step_s")})
    d.update(pipeline)
    return d


def stage_share(profile: HardwareProfile, stages_per_machine: int) -> HardwareProfile:
    """What one stage may use when `stages_per_machine` stages share a machine: its GPU (a GPU each), and
    its share of host memory, disk and host compute. Without a GPU the "GPU" tier and the "GPU" compute
    are the host's too, so they are shared as well."""
    if stages_per_machine < 1:
        raise UserError(f"stages per machine must be >= 1, got {stages_per_machine}")
    if stages_per_machine == 1:
        return profile
    n = stages_per_machine
    shared = ["cpu_bytes", "disk_bytes", "cpu_matmul_flops_per_s", "cpu_mem_bytes_per_s", "cpu_dequant_bytes_per_s"]
    if not profile.has_gpu:
        shared += ["gpu_bytes", "gpu_matmul_flops_per_s", "gpu_attn_flops_per_s", "gpu_mem_bytes_per_s",
                   "gpu_dequant_bytes_per_s"]
    caps = {f: getattr(profile, f) // n if f.endswith("_bytes") else getattr(profile, f) / n for f in shared}
    if profile.calibration is not None and not profile.has_gpu:
        caps["calibration"] = shared_calibration(profile.calibration, n)
    return dataclasses.replace(profile, name=f"{profile.name} (1/{n} per stage)", **caps)


def shared_calibration(cal: Calibration, n: int) -> Calibration:
    """The calibration of one of n processes sharing a machine without a GPU: a layer's kernels at its curve
    measured with the cores so shared (LayerCurve.paired_rows, n == LayerCurve.PAIRED), else n times its own
    curve; every other measured time (attention, restores, the generic matmul, the cost per op) n times."""
    def share(lc: LayerCurve) -> LayerCurve:
        paired = lc.paired_rows if n == LayerCurve.PAIRED else None
        return dataclasses.replace(lc, rows=paired or lc.rows.scaled(n), paired_rows=None,
                                   **{k: getattr(lc, k) * n for k in LayerCurve.NUMBERS})
    return dataclasses.replace(cal, layers=tuple(share(lc) for lc in cal.layers),
                               matmul_s_per_flop=cal.matmul_s_per_flop.scaled(n), op_s=cal.op_s * n,
                               handoff_s=cal.handoff_s * n)
