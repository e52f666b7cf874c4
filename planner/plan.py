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

from flexgen_graph.ir import Workload
from flexgen_graph.spec import ModelSpec
from planner.hardware import BadProfileError, HardwareProfile
from planner.policy import Policy
from planner.program import Buffer, Op, Programs

PLAN_FORMAT = "flexgen-graph-plan"
PLAN_VERSION = 1
MAX_PLAN_BYTES = 256 << 20


class BadPlanFileError(ValueError):
    """The file is not a plan this version can read (truncated, corrupt, wrong format or version)."""


class PlanMismatchError(ValueError):
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
        }


def dumps(plan: Plan) -> bytes:
    body = msgpack.packb(plan.body(), use_bin_type=True)
    return msgpack.packb([PLAN_FORMAT, PLAN_VERSION, hashlib.sha256(body).hexdigest(), body], use_bin_type=True)


def save(plan: Plan, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dumps(plan))
    tmp.replace(path)  # a reader never sees a half-written plan


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_PLAN_BYTES,
                               max_str_len=1 << 20, max_array_len=1 << 24, max_map_len=1 << 16)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # corrupt input raises any of these
        raise BadPlanFileError(f"{what} is not valid msgpack ({type(e).__name__}: {e})") from None


def loads(data: bytes, name: str = "plan") -> Plan:
    if len(data) > MAX_PLAN_BYTES:
        raise BadPlanFileError(f"{name}: {len(data)} bytes is larger than any plan ({MAX_PLAN_BYTES})")
    outer = _unpack(data, name)
    if not (isinstance(outer, list) and len(outer) == 4):
        raise BadPlanFileError(f"{name}: not a flexgen-graph plan (expected a 4-element header array)")
    fmt, version, checksum, body = outer
    if fmt != PLAN_FORMAT:
        raise BadPlanFileError(f"{name}: format is {fmt!r}, expected {PLAN_FORMAT!r}")
    if version != PLAN_VERSION:
        raise BadPlanFileError(f"{name}: plan version {version!r}, this flexgen-graph reads version {PLAN_VERSION}")
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != checksum:
        raise BadPlanFileError(f"{name}: checksum mismatch (the file is corrupt or was edited)")
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
        )
    except (KeyError, TypeError, ValueError, BadProfileError) as e:
        raise BadPlanFileError(f"{name}: malformed field ({type(e).__name__}: {e})") from None
    if d.get("model_fingerprint") != spec.fingerprint():
        raise BadPlanFileError(f"{name}: model fingerprint does not match its model description")
    return plan


def load(path: str | Path) -> Plan:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadPlanFileError(f"cannot read plan {path}: {e.strerror}") from None
    return loads(data, name=str(path))


def check_model(plan: Plan, spec: ModelSpec) -> None:
    """Refuse weights of another architecture than the plan's, naming the fields that differ."""
    if plan.spec.fingerprint() == spec.fingerprint():
        return
    a, b = plan.spec.to_dict(), spec.to_dict()
    diffs = [f"{k}: plan {a[k]!r} vs weights {b[k]!r}" for k in a if k != "name" and a[k] != b.get(k)]
    raise PlanMismatchError(
        f"plan was compiled for {plan.spec.name!r} but the weights are {spec.name!r} ({'; '.join(diffs[:4])})"
    )
