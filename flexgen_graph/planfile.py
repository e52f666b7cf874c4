"""The plan file (.fgplan): a msgpack array [format, version, sha256(body), body], body a packed map.

Loading checks the format name, version and checksum before it decodes the body, and decodes
with bounded buffer sizes so a crafted length cannot force a huge allocation.

    >>> import tempfile, os
    >>> # see tests/test_plan_format.py for the round trip
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from flexgen_graph.errors import UserError
from flexgen_graph.hardware import BadProfileError, HardwareProfile
from flexgen_graph.hazards import PlanHazardError, verify
from flexgen_graph.ir import Stage, Workload
from flexgen_graph.lower import check_stage
from flexgen_graph.policy import Policy
from flexgen_graph.program import Buffer, Op, Programs
from flexgen_graph.spec import ModelSpec

PLAN_FORMAT = "flexgen-graph-plan"
PLANSET_FORMAT = "flexgen-graph-planset"  # several plans of one model and profile, one per prompt length
PLAN_VERSION = 6  # 2: policy.group_size; compressed buffers at their compressed sizes. 3: pipeline stages.
# 4: profile version 2 (its calibration and machine). 5: profile version 3 (prefill scale, cache compress rate)
# 6: compression as op kinds (dequant_weight, *_qcache) and an op's scratch buffer; scratch counted as buffers
MAX_PLAN_BYTES = 256 << 20


class BadPlanFileError(UserError):
    """The file is not a plan this version can read (truncated, corrupt, wrong format or version)."""


class PlanMismatchError(UserError):
    """The plan was compiled for another model, profile or workload than the one at hand."""


@dataclass(frozen=True, slots=True)
class Plan:
    spec: ModelSpec
    profile: HardwareProfile
    workload: Workload
    weights_source: str  # where `run` finds the weights: "default", "dummy:SEED", "hf:PATH", "gguf:PATH"
    policy: Policy
    predictions: dict[str, Any]
    programs: Programs
    stage: Stage | None = None  # one stage of a pipeline (its programs name only the stage's layers)

    @property
    def layers(self) -> range:
        """The graph layers this plan's programs run."""
        return range(self.stage.first_layer, self.stage.end_layer) if self.stage else range(self.spec.num_graph_layers)

    @property
    def block_size(self) -> int:
        return self.policy.gpu_batch_size * self.policy.num_gpu_batches

    def body(self) -> dict[str, Any]:
        return {
            "model": self.spec.to_dict(),
            "model_fingerprint": self.spec.fingerprint(),
            "profile": self.profile.to_dict(),
            "profile_fingerprint": self.profile.fingerprint(),
            "workload": self.workload.to_dict(),
            "weights_source": self.weights_source,
            "policy": self.policy.to_dict(),
            "predictions": self.predictions,
            "buffers": [b.to_list() for b in self.programs.buffers],
            "prefill": [op.to_list() for op in self.programs.prefill],
            "decode": [op.to_list() for op in self.programs.decode],
            "stage": self.stage.to_list() if self.stage else None,
        }


def _seal(fmt: str, body: bytes) -> bytes:
    return msgpack.packb([fmt, PLAN_VERSION, hashlib.sha256(body).hexdigest(), body], use_bin_type=True)


def dumps(plan: Plan) -> bytes:
    return _seal(PLAN_FORMAT, msgpack.packb(plan.body(), use_bin_type=True))


def save(plan: Plan, path: str | Path) -> None:
    save_set([plan], path)


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_PLAN_BYTES,
                               max_str_len=1 << 20, max_array_len=1 << 24, max_map_len=1 << 16)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # corrupt input raises any of these
        raise BadPlanFileError(f"{what} is not valid msgpack ({type(e).__name__}: {e})") from None


def _open(data: bytes, name: str) -> tuple[str, bytes]:
    """(format, body) of a sealed plan or plan set, after the size, header, version and checksum checks."""
    if len(data) > MAX_PLAN_BYTES:
        raise BadPlanFileError(f"{name}: {len(data)} bytes is larger than any plan ({MAX_PLAN_BYTES})")
    outer = _unpack(data, name)
    if not (isinstance(outer, list) and len(outer) == 4):
        raise BadPlanFileError(f"{name}: not a flexgen-graph plan (expected a 4-element header array)")
    fmt, version, checksum, body = outer
    if fmt not in (PLAN_FORMAT, PLANSET_FORMAT):
        raise BadPlanFileError(f"{name}: format is {fmt!r}, expected {PLAN_FORMAT!r}")
    if version != PLAN_VERSION:
        raise BadPlanFileError(f"{name}: plan version {version!r}, this flexgen-graph reads version {PLAN_VERSION}")
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != checksum:
        raise BadPlanFileError(f"{name}: checksum mismatch (the file is corrupt or was edited)")
    return fmt, body


def loads(data: bytes, name: str = "plan") -> Plan:
    fmt, body = _open(data, name)
    if fmt != PLAN_FORMAT:
        raise BadPlanFileError(f"{name}: format is {fmt!r} (several plans), expected one {PLAN_FORMAT!r}")
    return _plan_from_body(body, name)


def _plan_from_body(body: bytes, name: str) -> Plan:
    d = _unpack(body, f"{name} body")
    try:
        spec = ModelSpec.from_dict(d["model"])
        profile = HardwareProfile.from_dict(d["profile"])
        plan = Plan(
            spec=spec, profile=profile, workload=Workload(**d["workload"]),
            weights_source=str(d["weights_source"]), policy=Policy.from_dict(d["policy"]),
            predictions=dict(d["predictions"]),
            programs=Programs(tuple(Buffer.from_list(b) for b in d["buffers"]),
                              tuple(Op.from_list(o) for o in d["prefill"]),
                              tuple(Op.from_list(o) for o in d["decode"])),
            stage=None if d["stage"] is None else Stage.from_list(d["stage"]),
        )
        _check_predictions(plan.predictions)
        if not isinstance(d["weights_source"], str):
            raise ValueError(f"weights_source must be a string, got {d['weights_source']!r}")
    except (KeyError, TypeError, ValueError, BadProfileError) as e:
        raise BadPlanFileError(f"{name}: malformed field ({type(e).__name__}: {e})") from None
    if d.get("model_fingerprint") != spec.fingerprint():
        raise BadPlanFileError(f"{name}: model fingerprint does not match its model description")
    if d.get("profile_fingerprint") != profile.fingerprint():
        raise BadPlanFileError(f"{name}: profile fingerprint does not match its hardware profile")
    _check_programs(plan, name)
    return plan


def _check_predictions(pred: dict) -> None:
    for key in ("tokens_per_s", "prefill_s", "decode_step_s", "total_s"):
        if type(pred.get(key)) not in (int, float) or not pred[key] >= 0:
            raise ValueError(f"predictions.{key} must be a non-negative number, got {pred.get(key)!r}")
    if not isinstance(pred.get("binding", ""), str):
        raise ValueError(f"predictions.binding must be a string, got {pred.get('binding')!r}")


def _check_programs(plan: Plan, name: str) -> None:
    """A decoded plan must also make sense: layers and batches in range, buffers and events that
    exist, no hazards (the verifier), so nothing is allocated for a plan that cannot run."""
    layers, nb = plan.layers, plan.policy.num_gpu_batches
    if plan.stage is not None:
        try:
            check_stage(plan.spec, plan.stage)
        except ValueError as e:
            raise BadPlanFileError(f"{name}: {e}") from None
    if plan.workload.score and plan.programs.decode:
        raise BadPlanFileError(f"{name}: a scoring plan has a decode program (it runs its prefill alone)")
    for phase, ops in (("prefill", plan.programs.prefill), ("decode", plan.programs.decode)):
        if not ops and not (phase == "decode" and plan.workload.score):
            raise BadPlanFileError(f"{name}: the {phase} program is empty")
        for i, op in enumerate(ops):
            if op.layer not in layers or not -1 <= op.batch < nb:
                raise BadPlanFileError(f"{name}: {phase} op {i} ({op.node}) names layer {op.layer} / batch "
                                       f"{op.batch}, outside this plan's layers {layers.start}..{layers.stop - 1} "
                                       f"x {nb} gpu batches")
    totals = {"gpu": 0, "cpu": 0, "disk": 0}
    for i, b in enumerate(plan.programs.buffers):
        if b.id != i:
            raise BadPlanFileError(f"{name}: buffer {i} carries id {b.id}")
        totals[b.tier.value] += b.nbytes
    peaks = plan.predictions.get("peak_bytes")
    if not isinstance(peaks, dict):
        raise BadPlanFileError(f"{name}: predictions lack peak_bytes")
    caps = {"gpu": plan.profile.gpu_bytes, "cpu": plan.profile.cpu_bytes, "disk": plan.profile.disk_bytes}
    for tier, n in totals.items():
        peak = peaks.get(tier)
        if type(peak) is not int or not n <= peak <= caps[tier]:
            raise BadPlanFileError(f"{name}: {tier} buffers of {n} bytes, predicted peak {peak!r}, capacity "
                                   f"{caps[tier]}: inconsistent (buffers <= peak <= capacity must hold)")
    try:
        verify(plan.programs)
    except PlanHazardError as e:
        raise BadPlanFileError(f"{name}: {e}") from None


def load(path: str | Path) -> Plan:
    plans = load_set(path)
    if len(plans) != 1:
        raise BadPlanFileError(f"{path} holds {len(plans)} plans (a plan set); expected one")
    return plans[0]


def _order(p: Plan) -> tuple[int, int, int]:
    return (p.workload.prompt_len, p.workload.gen_len, p.stage.index if p.stage else 0)


def check_stages(plans: list[Plan], name: str = "plan") -> None:
    """Plans of a set are all single-process plans, or all stages of pipelines of one size, each
    workload's stages 0..count-1 once, splitting the model the same way."""
    staged = {p.stage is not None for p in plans}
    if len(staged) > 1:
        raise BadPlanFileError(f"{name}: mixes pipeline stages with single-process plans")
    if staged == {False}:
        return
    counts = {p.stage.count for p in plans}
    if len(counts) > 1:
        raise BadPlanFileError(f"{name}: pipelines of {sorted(counts)} stages in one file")
    by_workload: dict[tuple[int, int], list[Stage]] = {}
    for p in plans:
        by_workload.setdefault((p.workload.prompt_len, p.workload.gen_len), []).append(p.stage)
    for (pl, gl), stages in by_workload.items():
        stages = sorted(stages, key=lambda s: s.index)
        if [s.index for s in stages] != list(range(len(stages))) or len(stages) != stages[0].count \
                or any(a.end_layer != b.first_layer for a, b in zip(stages, stages[1:])):
            raise BadPlanFileError(f"{name}: the stages of prompt {pl} / gen {gl} are not stages 0..{stages[0].count - 1} "
                                   f"of one pipeline ({[s.to_list() for s in stages]})")


def dumps_set(plans: list[Plan]) -> bytes:
    """One plan as a plain plan file; several as a plan set (sorted by prompt length)."""
    if not plans:
        raise ValueError("a plan set needs at least one plan")
    if len(plans) == 1:
        return dumps(plans[0])
    plans = sorted(plans, key=_order)
    return _seal(PLANSET_FORMAT, msgpack.packb([dumps(p) for p in plans], use_bin_type=True))


def save_set(plans: list[Plan], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dumps_set(plans))
    tmp.replace(path)  # a reader never sees a half-written plan


def loads_set(data: bytes, name: str = "plan") -> list[Plan]:
    """The plans of a plan file or plan set, sorted by prompt length, checked to agree on model and profile."""
    fmt, body = _open(data, name)  # the envelope is decoded once, for plans and sets alike
    if fmt == PLAN_FORMAT:
        plans = [_plan_from_body(body, name)]
        check_stages(plans, name)
        return plans
    items = _unpack(body, f"{name} body")
    if not (isinstance(items, list) and items and all(isinstance(i, bytes) for i in items)):
        raise BadPlanFileError(f"{name}: a plan set must hold a non-empty list of plans")
    plans = [loads(item, f"{name}[{i}]") for i, item in enumerate(items)]
    first = plans[0]
    for i, p in enumerate(plans[1:], 1):
        if p.spec != first.spec or p.profile != first.profile or p.weights_source != first.weights_source:
            raise BadPlanFileError(f"{name}[{i}]: plans of a set must share model, profile and weights")
    check_stages(plans, name)
    return sorted(plans, key=_order)


def load_set(path: str | Path) -> list[Plan]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadPlanFileError(f"cannot read plan {path}: {e.strerror}") from None
    return loads_set(data, name=str(path))


def check_model(plan: Plan, spec: ModelSpec) -> None:
    """Refuse weights of another architecture than the plan's, naming the fields that differ."""
    if plan.spec.fingerprint() == spec.fingerprint():
        return
    a, b = plan.spec.to_dict(), spec.to_dict()
    diffs = [f"{k}: plan {a[k]!r} vs weights {b[k]!r}" for k in a if k != "name" and a[k] != b.get(k)]
    raise PlanMismatchError(
        f"plan was compiled for {plan.spec.name!r} but the weights are {spec.name!r} ({'; '.join(diffs[:4])})"
    )
