"""Hazard check of a plan's programs: what loading a plan verifies before anything is allocated.

Ops on one stream run in program order; ops on different streams are ordered only through
waits. From that, a happens-before relation; then for every buffer access:
- a wait names an earlier op (an event something records before);
- a read is ordered after the buffer's last writer (a slot must have one in the program);
- a write is ordered after the previous writer and every read since (no load overwrites a
  slot that a pending op still reads).
A program run ends with a drain, so steps do not overlap and each program is checked once.
The dequantization scratch (program.SCRATCH_ROLES) is written by DEQUANT_WEIGHT and by compressed-cache
computes (their `scratch`) and read by compute ops, all on the compute stream: checked like any buffer.
"""

from __future__ import annotations

from typing import Iterator

from flexgen_graph.program import COMPUTE_KINDS, BufferRole, Op, OpKind, Programs

SLOT_ROLES = frozenset({BufferRole.WEIGHT_SLOT, BufferRole.CACHE_SLOT, BufferRole.HIDDEN_SLOT})
_WRITES_CACHE = frozenset({OpKind.DECODER_PREFILL, OpKind.DECODER_PREFILL_QCACHE})  # never read what was there


class PlanHazardError(AssertionError):
    """A program could read a buffer before it is written, or overwrite it while it is read."""


def accesses(op: Op) -> tuple[list[int], list[int]]:
    """(buffers read, buffers written) by an op."""
    if op.kind in COMPUTE_KINDS:
        # prefill writes the cache rows it then reads: for it the cache is output only
        reads = [op.weight] + ([op.cache] if op.cache >= 0 and op.kind not in _WRITES_CACHE else [])
        if op.kind is not OpKind.EMBED:
            reads.append(op.hidden)
        heads = (OpKind.HEAD, OpKind.HEAD_SCORE)  # a head's output is the engine's, not a plan buffer
        writes = ([op.cache] if op.cache >= 0 else []) + ([op.hidden] if op.kind not in heads else []) \
            + ([op.scratch] if op.scratch >= 0 else [])
        return reads, writes
    if op.kind in (OpKind.LOAD_WEIGHT, OpKind.RECV_HIDDEN):
        return [], [op.dst]  # the weight store, or another process, is the source
    if op.kind is OpKind.SEND_HIDDEN:
        return [op.src], []
    if op.kind in (OpKind.SEND_TOKENS, OpKind.RECV_TOKENS):
        return [], []  # the engine's token ids, not a plan buffer
    return [op.src], [op.dst]


def happens_before(program: tuple[Op, ...]) -> list[int]:
    """hb[i]: bitset of the ops that finish before op i starts."""
    hb: list[int] = []
    last_on_stream: dict = {}
    for i, op in enumerate(program):
        bits = 0
        preds = list(op.waits)
        if op.stream in last_on_stream:
            preds.append(last_on_stream[op.stream])
        for p in preds:
            if not 0 <= p < i:
                raise PlanHazardError(f"op {i} ({op.node}) waits on op {p}, which is not earlier in the program")
            bits |= hb[p] | (1 << p)
        hb.append(bits)
        last_on_stream[op.stream] = i
    return hb


def hazards(program: tuple[Op, ...], programs: Programs, name: str) -> Iterator[str]:
    """Every hazard of one program, in program order."""
    n_bufs = len(programs.buffers)
    slots = {b.id for b in programs.buffers if b.role in SLOT_ROLES}
    try:
        hb = happens_before(program)
    except PlanHazardError as e:
        yield f"{name} {e}"
        return
    last_write: dict[int, int] = {}
    reads_since: dict[int, list[int]] = {}

    def before(a: int, b: int) -> bool:
        return bool(hb[b] >> a & 1)

    for i, op in enumerate(program):
        reads, writes = accesses(op)
        bad = [buf for buf in reads + writes if not 0 <= buf < n_bufs]
        if bad:
            yield f"{name} op {i} ({op.node}) names buffer {bad[0]}, which does not exist"
            continue
        for buf in reads:
            w = last_write.get(buf)
            if w is None and buf in slots:
                yield f"{name} op {i} ({op.node}) reads slot buffer {buf} before anything loads it"
            if w is not None and w != i and not before(w, i):
                yield (f"{name} op {i} ({op.node}) may read buffer {buf} before op {w} "
                       f"({program[w].node}) finishes writing it")
        for buf in writes:
            prior = reads_since.get(buf, []) + ([last_write[buf]] if buf in last_write else [])
            for p in prior:
                if p != i and not before(p, i):
                    yield (f"{name} op {i} ({op.node}) may overwrite buffer {buf} while op {p} "
                           f"({program[p].node}) still uses it")
            last_write[buf] = i
            reads_since[buf] = []
        for buf in reads:
            if buf not in writes:
                reads_since.setdefault(buf, []).append(i)


def verify_program(program: tuple[Op, ...], programs: Programs, name: str) -> None:
    for h in hazards(program, programs, name):
        raise PlanHazardError(h)


def verify(programs: Programs) -> None:
    verify_program(programs.prefill, programs, "prefill")
    verify_program(programs.decode, programs, "decode")
