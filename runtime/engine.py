"""The interpreter: allocates a plan's buffers once, then replays its programs block after block.

    with Engine(plan, store, offload_dir) as engine:
        results = engine.generate([[1, 2, 3], [4, 5]])   # token ids in, greedy generations out

`for op in program: HANDLERS[op.kind](self, op)` dispatches each op to its stream; a program
run ends with one drain (the head's tokens feed the next step's embedding). A block that is not
full (runtime.driver.BlockState.rows) costs what it holds: the ops of its unfilled gpu batches
record their events and do nothing (so every wait stays valid), and compute runs on the filled
rows of its buffers' views; transfers move the plan's bytes (a cache record holds every row).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexgen_graph.errors import UserError
from flexgen_graph.hazards import accesses
from flexgen_graph.ir import TIERS, Tier
from flexgen_graph.planfile import Plan, check_model
from flexgen_graph.program import QCACHE_KINDS, SCRATCH_ROLES, BufferRole, Op, OpKind, Stream
from flexgen_graph.layout import align_up, attend_chunk_rows, attend_scratch_bytes
from runtime import driver, kernels, preflight
from runtime.backend import Backend, Buf, open_backend
from runtime.compressed import (
    CacheCodec,
    compressed_layers,
    decompress_layer,
    dense_cache_view,
)
from runtime.driver import BlockState, Generation
from runtime.packed import check_kernel, packed_layer_views
from runtime.qattention import attend_quantized
from runtime.quant import QuantConfig
from runtime.sampling import Sampling, pick
from runtime.stage_link import StageLink
from runtime.weight_store import WeightStore


def _idle() -> None:
    """An op of a gpu batch the block does not fill."""


class NonFiniteLogitsError(RuntimeError):
    """The head computed a NaN or inf logit: the block stops with this error rather than emit a token from it."""


class Engine:
    def __init__(self, plan: Plan, store: WeightStore, offload_dir: str | Path | None = None, *,
                 overlap: bool = True, cold_weights: bool = False, device: str = "auto",
                 link: StageLink | None = None) -> None:
        """overlap=False serializes the streams (for benchmarks); cold_weights evicts weight files
        from the page cache after each disk read, so disk-tier weights really come from the disk;
        device: "cpu", "cuda", or "auto" (CUDA when the plan's profile has a GPU and one is visible);
        link: the other stages' processes, for a plan that is one stage of a pipeline."""
        check_model(plan, store.spec)
        if (plan.stage is not None and plan.stage.count > 1) != (link is not None) or \
                (link is not None and link.stage != plan.stage):
            raise UserError(f"plan stage {plan.stage} needs {'a' if plan.stage else 'no'} link to the other stages "
                             f"(got {link.stage if link else None}): launch a pipeline plan with torchrun, one "
                             "process per stage")
        self.link = link
        if link is not None:  # token messages: a gpu batch's ids and a stop flag (runtime.stage_link)
            n, nb = plan.policy.gpu_batch_size + 1, plan.policy.num_gpu_batches
            self._tok_in = [torch.zeros(n, dtype=torch.long) for _ in range(nb if link.stage.is_first else 0)]
            self._tok_out = [torch.zeros(n, dtype=torch.long) for _ in range(nb if link.stage.is_last else 0)]
        self.plan, self.store, self.spec = plan, store, plan.spec
        store.check()  # a missing or truncated tensor file is named now, not mid-run
        self.dtype = kernels.TORCH_DTYPES[self.spec.dtype]
        pol = plan.policy
        self.b, self.nb = pol.gpu_batch_size, pol.num_gpu_batches
        self.prompt_len, self.gen_len = plan.workload.prompt_len, plan.workload.gen_len
        self.max_seq = plan.workload.max_seq_len
        # compression, as the plan says: weight homes and slots hold the store's compressed copy; a compute
        # naming one computes on it as it is (runtime.packed: packed matmuls, embedding rows), one naming the
        # scratch reads the dense copy DEQUANT_WEIGHT restored there; the *_QCACHE computes keep compressed
        # cache rows (runtime.compressed.CacheCodec)
        self.qcfg = QuantConfig(pol.compress_bits, pol.group_size)
        if pol.packed_weights:
            check_kernel(self.qcfg)  # before any work: nothing silently wrong on a CPU nobody here has seen
        self.weights = compressed_layers(store, self.qcfg, pol.packed_weights) if pol.compress_weights else store
        self._compressed_bufs = frozenset(b.id for b in plan.programs.buffers if pol.compress_weights and b.role in (
            BufferRole.WEIGHT_HOME, BufferRole.WEIGHT_SLOT))
        self._ops = plan.programs.prefill + plan.programs.decode  # both programs, for the set-up checks
        self.codec = CacheCodec(self.spec, self.b, self.qcfg) if any(op.kind in QCACHE_KINDS for op in self._ops) \
            else None
        self._tmp = None
        if offload_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flexgen-offload-")
            offload_dir = self._tmp.name
        prof = plan.profile
        self.cold_weights = cold_weights
        budget = {Tier.GPU: prof.gpu_bytes, Tier.CPU: prof.cpu_bytes, Tier.DISK: prof.disk_bytes}
        if device == "auto":
            device = "cuda" if prof.has_gpu and torch.cuda.is_available() else "cpu"
        if all(op.stream is Stream.COMPUTE for op in self._ops):
            # nothing moves: no transfer to overlap, and the stream threads' hand-offs would only cost
            # (visible at batch 1, where a step is many tiny ops)
            overlap = False
        try:
            if pol.packed_weights and device != "cpu":
                raise UserError(f"the plan computes on packed {pol.compress_bits}-bit weights with the CPU int4 "
                                f"kernel; run it with --device cpu, not {device}")
            preflight.check(plan, Path(offload_dir), device)
            self.backend: Backend = open_backend(device, budget, Path(offload_dir), overlap)
            self.device = self.backend.device
            if self.device.type == "cpu" and (slow := kernels.cpu_matmul_slowdown(self.dtype)) > 1.5:
                print(f"note: {self.spec.dtype} matmuls run {slow:.0f}x slower than float32 on this CPU (capability "
                      f"{torch.backends.cpu.get_cpu_capability()}, measured just now): --dtype float32 computes faster "
                      "here", file=sys.stderr)
            self.bufs: dict[int, Buf | None] = {}
            self._view_memo: dict[tuple, dict[str, torch.Tensor]] = {}  # (buffer, layer) -> typed weight views
            self._allocate()
            self._scratch_views()
        except BaseException:
            self.close()  # nothing half-built stays behind: scratch files and temp folders go
            raise
        self.state: BlockState | None = None  # the running block's token ids, masks and tally (runtime.driver)
        self._filled = self.nb  # gpu batches the running block fills
        self._finite: list[torch.Tensor] = []  # per gpu batch, whose head logits were all finite this step
        self._has_head = {name: any(op.kind is OpKind.HEAD for op in ops)
                          for name, ops in (("prefill", plan.programs.prefill), ("decode", plan.programs.decode))}
        self.step_times: list[tuple[str, float]] = []  # (program, wall seconds) of every program run
        self._events = {name: self.backend.new_events(len(ops))
                        for name, ops in (("prefill", plan.programs.prefill), ("decode", plan.programs.decode))}
        # what each op submits, built once per number of filled gpu batches: the step loop only clears
        # events and submits
        self._dispatch: dict[tuple[str, int], list] = {}

    # -- setup ---------------------------------------------------------------------------------
    def _expected_nbytes(self, b) -> int | None:
        """What the runtime puts in a home, cache or scratch buffer; the plan's size must be exactly that."""
        if b.role is BufferRole.WEIGHT_HOME:
            return self.weights.layer_nbytes(b.layer)
        if b.role in (BufferRole.CACHE_HOME, BufferRole.CACHE_SLOT):
            return self.max_seq * (self.codec.row_bytes if self.codec else self.b * self.spec.kv_bytes_per_token())
        if b.role in SCRATCH_ROLES:
            return self._scratch_need.get(b.id, 0)
        return None

    @functools.cached_property
    def _chunk_at(self) -> dict[int, int]:
        """Scratch buffer -> where the chunk of cache rows its ops restore starts in it: after the largest
        decoder layer dequantized there (layout.dequant_scratch's layout)."""
        qlayers = {op.layer for op in self._ops if op.kind in QCACHE_KINDS}
        at = {op.scratch: 0 for op in self._ops if op.kind in QCACHE_KINDS and op.scratch >= 0}
        for op in self._ops:
            if op.kind is OpKind.DEQUANT_WEIGHT and op.dst in at and op.layer in qlayers:
                at[op.dst] = max(at[op.dst], align_up(self.spec.layer_bytes(op.layer)))
        return at

    @functools.cached_property
    def _chunk_bytes(self) -> int:
        """The chunk of dense cache rows attention over a compressed cache restores at a time (runtime.qattention)."""
        return attend_scratch_bytes(self.b * self.spec.kv_bytes_per_token(), self.max_seq)

    @functools.cached_property
    def _scratch_need(self) -> dict[int, int]:
        """Bytes the plan's ops use of each scratch buffer, in the runtime's own sizes (the planner's must
        match): a layer DEQUANT_WEIGHT restores there, or a chunk of cache rows after its offset."""
        need: dict[int, int] = {}
        for op in self._ops:
            if op.kind is OpKind.DEQUANT_WEIGHT:
                need[op.dst] = max(need.get(op.dst, 0), self.spec.layer_bytes(op.layer))
            elif op.kind in QCACHE_KINDS and op.scratch >= 0:
                need[op.scratch] = max(need.get(op.scratch, 0), self._chunk_at[op.scratch] + self._chunk_bytes)
        return need

    def _allocate(self) -> None:
        """Every buffer the run holds is one of the plan's (the peak the planner predicted counts them all)."""
        n = len(self.plan.programs.buffers)
        for op in self._ops:
            named = [i for side in accesses(op) for i in side]  # (a compute's scratch among its writes)
            if any(i >= n for i in named):
                raise UserError(f"op {op.node} names buffer {max(named)} the plan does not have ({n} buffers); "
                                "recompile the plan")
        for b in self.plan.programs.buffers:
            what = f"{b.role.value}-L{b.layer}-B{b.batch}-S{b.slot}"
            want = self._expected_nbytes(b)
            if want is not None and want != b.nbytes:
                raise UserError(f"plan buffer {what} has {b.nbytes} bytes, the runtime needs {want} "
                                 f"(compression: weights {self.plan.policy.compress_weights}, cache "
                                 f"{self.plan.policy.compress_cache}); recompile the plan")
            if b.role is BufferRole.WEIGHT_HOME and b.tier is Tier.DISK:
                self.backend.account(Tier.DISK, b.nbytes, what)  # read from the weight store on use
                self.bufs[b.id] = None
                continue
            buf = self.backend.alloc(b.tier, b.nbytes, what)
            self.bufs[b.id] = buf
            if b.role is BufferRole.WEIGHT_HOME:
                self.backend.read_layer(self.weights, b.layer, buf)

    def _scratch_views(self) -> None:
        """Where in each scratch buffer compressed-cache decode restores its chunks of rows."""
        self._chunk = {i: self.bufs[i].tensor[at:at + self._chunk_bytes] for i, at in self._chunk_at.items()}
        self._chunk_rows = min(self.max_seq, attend_chunk_rows(self.spec.kv_bytes_per_token(), self.b))

    def close(self) -> None:
        self.backend.close() if hasattr(self, "backend") else None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def peak_bytes(self) -> dict[str, int]:
        """Measured peak per tier: allocator accounting, and on CUDA the device's own peak for the GPU."""
        out = {t.value: self.backend.memory.peak[t] for t in TIERS}
        dev = self.backend.device_peak_bytes()
        if dev is not None:
            out["gpu"] = dev
        return out

    # -- views ---------------------------------------------------------------------------------
    def _typed(self, buf_id: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        t = self.bufs[buf_id].tensor
        return t[: n * self.spec.dtype_bytes].view(self.dtype).view(shape)

    def _cache_view(self, buf_id: int, rows: int) -> torch.Tensor:
        """The cache of a gpu batch's first `rows` sequences: [S, 2, rows, KV, D] (strided when rows < B)."""
        return dense_cache_view(self.bufs[buf_id].tensor, self.max_seq, self.b, self.spec)[:, :, :rows]

    def _hidden_view(self, buf_id: int, rows: int) -> torch.Tensor:
        return self._typed(buf_id, (rows, self._t, self.spec.hidden))  # [rows, T, H]: batch-major, a prefix

    def _rows(self, op: Op) -> int:
        """Filled rows of the op's gpu batch (its ops run only when there are some)."""
        return self.state.rows[op.batch]

    def _weights(self, op: Op) -> dict[str, object]:
        """What a compute op computes on: typed views of dense bytes, or the compressed bytes themselves. Made
        once per (buffer, layer): views follow the buffer, whatever it holds, and rebuilding them per op showed
        in a profile of small-batch decode steps."""
        key = (op.weight, op.layer)
        v = self._view_memo.get(key)
        if v is None:
            buf = self.bufs[op.weight].tensor
            v = self._view_memo[key] = packed_layer_views(self.spec, op.layer, buf, self.qcfg) \
                if op.weight in self._compressed_bufs else kernels.layer_views(self.spec, op.layer, buf)
        return v

    # -- handlers ------------------------------------------------------------------------------
    def _dequant_weight(self, op: Op) -> None:
        dense = self.bufs[op.dst].tensor[: self.spec.layer_bytes(op.layer)]
        decompress_layer(self.spec, op.layer, self.bufs[op.src].tensor, self.qcfg, dense)

    def _load_weight(self, op: Op) -> None:
        src, dst = self.bufs[op.src], self.bufs[op.dst]
        if src is None:
            self.backend.read_layer(self.weights, op.layer, dst, drop_page_cache=self.cold_weights)
        else:
            self.backend.copy(dst, src, 0, self.weights.layer_nbytes(op.layer))

    def _row_bytes(self, buf_id: int) -> int:
        """Cache bytes of one token of one gpu batch, compressed or not: cache buffers are token-major and
        hold max_seq rows (checked at allocation)."""
        return self.plan.programs.buffers[buf_id].nbytes // self.max_seq

    def _load_cache(self, op: Op) -> None:
        self.backend.copy(self.bufs[op.dst], self.bufs[op.src], 0, self._start * self._row_bytes(op.src))

    def _store_cache(self, op: Op) -> None:
        rb = self._row_bytes(op.src)
        self.backend.copy(self.bufs[op.dst], self.bufs[op.src], self._start * rb, self._t * rb)

    def _hidden_bytes(self, rows: int) -> int:
        return rows * self._t * self.spec.hidden * self.spec.dtype_bytes

    def _move_hidden(self, op: Op) -> None:
        self.backend.copy(self.bufs[op.dst], self.bufs[op.src], 0, self._hidden_bytes(self._rows(op)))

    def _last_filled(self, op: Op) -> bool:
        """The block's last filled gpu batch: its messages carry the stop flag (every stage knows the block)."""
        return op.batch == self._filled - 1

    def _recv_hidden(self, op: Op) -> None:
        self.link.recv_hidden(self.bufs[op.dst].tensor[: self._hidden_bytes(self._rows(op))], op.batch)
        if self._last_filled(op):  # the last gpu batch also brings what the first stage knows of the stop
            self.state.flag = self.link.recv_flag()

    def _send_hidden(self, op: Op) -> None:
        self.link.send_hidden(self.bufs[op.src].tensor[: self._hidden_bytes(self._rows(op))], op.batch)
        if self._last_filled(op):
            self.link.send_flag(self.state.flag)

    def _send_tokens(self, op: Op) -> None:
        k, msg, r = op.batch, self._tok_out[op.batch], self._rows(op)
        rows = slice(k * self.b, k * self.b + r)  # a done sequence is fed padding, as in one process
        msg[:r] = torch.where(self.state.tally.done[rows], self.state.tally.pad, self.state.next[k].cpu())
        msg[self.b] = 0
        if self._last_filled(op):  # every head of the step is done (one compute stream): is every sequence?
            msg[self.b] = int(self.state.tally.done_with(torch.cat(self.state.next).cpu(), self._token_index()))
        self.link.send_tokens(msg, k)

    def _recv_tokens(self, op: Op) -> None:
        k, msg, r = op.batch, self._tok_in[op.batch], self._rows(op)
        self.link.recv_tokens(msg, k)
        self.state.ids[k] = msg[:r].view(r, 1).to(self.device)
        if self._last_filled(op):
            self.state.flag = int(msg[self.b])

    def take_sent_tokens(self) -> None:
        """The first stage, after the last step: that step's token messages were sent all the same."""
        for k in range(self._filled):
            self.link.recv_tokens(self._tok_in[k], k)

    def _token_index(self) -> int:
        """Which generated token the running program produces (prefill: the first)."""
        return self._start - self.prompt_len + 1 if self._start else 0

    def _embed(self, op: Op) -> None:
        k, a, t = op.batch, self._start, self._t
        h = kernels.embed(self.spec, self._weights(op), self.state.ids[k], self.state.pos[k][:, a:a + t])
        self._hidden_view(op.hidden, self._rows(op)).copy_(h)

    def _decoder(self, op: Op) -> None:
        k, a, t, r = op.batch, self._start, self._t, self._rows(op)
        hv = self._hidden_view(op.hidden, r)
        pos, mask = self.state.pos[k][:, a:a + t], self.state.mask[k][:, : a + t]
        hv.copy_(kernels.decoder(self.spec, self._weights(op), hv, self._cache_view(op.cache, r), a, pos, mask))

    def _qkv(self, op: Op) -> tuple:
        """A decoder's first half: (hidden view, weights, q, k, v of the new tokens, mask)."""
        k, a, t = op.batch, self._start, self._t
        hv, w = self._hidden_view(op.hidden, self._rows(op)), self._weights(op)
        q, kk, v = kernels.attention_inputs(self.spec, w, hv, self.state.pos[k][:, a:a + t])
        return hv, w, q, kk, v, self.state.mask[k][:, : a + t]

    def _finish(self, hv: torch.Tensor, w, att: torch.Tensor) -> None:
        """A decoder's second half, back on the compute device."""
        hv.copy_(kernels.attention_output_and_mlp(self.spec, w, hv, att.to(hv.device)))

    def _decoder_qcache(self, op: Op) -> None:
        """Attends a compressed cache on the compute device, a chunk of rows at a time (runtime.qattention); a
        prefill (host-homed cache or not) stores its new rows and attends them as they read back."""
        hv, w, q, kk, v, mask = self._qkv(op)
        self._finish(hv, w, self._attend_compressed(op, q, kk, v, mask))

    def _attend_compressed(self, op: Op, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """attend over the op's compressed cache: the new rows stored, then every row restored a chunk at a
        time into the op's scratch (prefill: none) and attended as it reads back."""
        return attend_quantized(self.spec, self.codec, q, k, v, self.bufs[op.cache].tensor, self._start, mask,
                                self._chunk_rows, self._chunk.get(op.scratch))

    def _on_host(self, op: Op, *ts: torch.Tensor) -> list[torch.Tensor]:
        """CPU attention: q, k, v cross to the host cache's device (the cache never does)."""
        return [x.to(self.bufs[op.cache].tensor.device) for x in ts]

    def _decode_cpu_attn(self, op: Op) -> None:
        hv, w, *qkvm = self._qkv(op)
        q, kk, v, mask = self._on_host(op, *qkvm)
        self._finish(hv, w, kernels.attend(self.spec, q, kk, v, self._cache_view(op.cache, self._rows(op)),
                                           self._start, mask))

    def _decode_cpu_attn_qcache(self, op: Op) -> None:
        hv, w, *qkvm = self._qkv(op)
        self._finish(hv, w, self._attend_compressed(op, *self._on_host(op, *qkvm)))

    def _new_kv(self, op: Op, hv: torch.Tensor) -> torch.Tensor:
        """k, v of the op's new tokens alone, [t, 2, rows, KV, D]: the op's own work memory."""
        s = self.spec
        return torch.empty((self._t, 2, self._rows(op), s.num_kv_heads, s.head_dim), dtype=self.dtype,
                           device=hv.device)

    def _prefill_host_cache(self, op: Op) -> None:
        """The cache stays in host memory: prefill attends on the compute device over the new tokens, then
        writes their k, v home."""
        hv, w, q, kk, v, mask = self._qkv(op)
        kv = self._new_kv(op, hv)
        att = kernels.attend(self.spec, q, kk, v, kv, 0, mask)
        self._cache_view(op.cache, self._rows(op))[: self._t].copy_(kv)
        self._finish(hv, w, att)

    def _decoder_score(self, op: Op) -> None:
        """A scoring plan's decoder: no cache, the prompt's k, v live only while the op runs."""
        k, t, s, r = op.batch, self._t, self.spec, self._rows(op)
        hv = self._hidden_view(op.hidden, r)
        kv = torch.empty((t, 2, r, s.num_kv_heads, s.head_dim), dtype=self.dtype, device=hv.device)
        hv.copy_(kernels.decoder(s, self._weights(op), hv, kv, 0, self.state.pos[k][:, :t], self.state.mask[k][:, :t]))

    def _head_score(self, op: Op) -> None:
        k = op.batch
        self.state.scored[k] = kernels.score_head(self.spec, self._weights(op), self._hidden_view(op.hidden, self._rows(op)),
                                                  self.state.targets[k], self.state.cont[k])

    def _head(self, op: Op) -> None:
        k, r = op.batch, self._rows(op)
        logits = kernels.head(self.spec, self._weights(op), self._hidden_view(op.hidden, r))
        # argmax takes a NaN or +inf as the maximum, so the picked logit says whether a row can give a token
        # (B values, checked after the program's drain: no host sync, no extra pass over the logits)
        best = logits.argmax(dim=-1)
        self._finite[k] = finite = torch.isfinite(logits.gather(-1, best[:, None])).squeeze(1)
        if self.state.all_greedy:
            self.state.next[k] = best
        else:
            rows = slice(k * self.b, k * self.b + r)
            self.state.next[k] = pick(torch.where(finite[:, None], logits, 0.0), self.state.sampling[rows],
                                      self.state.gens[rows])

    HANDLERS = {
        OpKind.LOAD_WEIGHT: _load_weight,
        OpKind.LOAD_CACHE: _load_cache,
        OpKind.LOAD_HIDDEN: _move_hidden,
        OpKind.STORE_CACHE: _store_cache,
        OpKind.STORE_HIDDEN: _move_hidden,
        OpKind.EMBED: _embed,
        OpKind.DECODER_PREFILL: _decoder,
        OpKind.DECODER_DECODE: _decoder,
        OpKind.DECODER_PREFILL_HOST_CACHE: _prefill_host_cache,
        OpKind.DECODER_DECODE_CPU_ATTN: _decode_cpu_attn,
        OpKind.DECODER_PREFILL_QCACHE: _decoder_qcache,
        OpKind.DECODER_DECODE_QCACHE: _decoder_qcache,
        OpKind.DECODER_PREFILL_HOST_QCACHE: _decoder_qcache,
        OpKind.DECODER_DECODE_CPU_ATTN_QCACHE: _decode_cpu_attn_qcache,
        OpKind.DEQUANT_WEIGHT: _dequant_weight,
        OpKind.HEAD: _head,
        OpKind.DECODER_SCORE: _decoder_score,
        OpKind.HEAD_SCORE: _head_score,
        OpKind.RECV_HIDDEN: _recv_hidden,
        OpKind.SEND_HIDDEN: _send_hidden,
        OpKind.SEND_TOKENS: _send_tokens,
        OpKind.RECV_TOKENS: _recv_tokens,
    }

    def run_program(self, name: str, start: int, t: int) -> None:
        """One run of the prefill or decode program, tokens [start, start + t) of every sequence of the block."""
        t0 = time.perf_counter()
        self._start, self._t = start, t
        self._filled = sum(1 for r in self.state.rows if r)
        events = self._events[name]
        for ev in events:
            ev.clear()
        if self._has_head[name]:
            self._finite = [None] * self._filled  # the unfilled gpu batches run no head
        for stream, thunk, waits, done in self._dispatch_for(name, self._filled):
            self.backend.submit(stream, thunk, waits, done)
        self.backend.drain(events)
        if self._has_head[name]:
            finite = torch.cat(self._finite).cpu()  # after the drain: the device is done, this copies 16 bytes
            if not bool(finite.all()):
                rows = (~finite).nonzero().flatten().tolist()
                raise NonFiniteLogitsError(f"the head computed NaN or inf logits for sequence(s) {rows} of the block "
                                           f"at token {self._token_index() + 1}: the block is stopped rather than "
                                           "answer with tokens picked from them")
        self.step_times.append((name, time.perf_counter() - t0))

    def _dispatch_for(self, name: str, filled: int) -> list:
        """What each op of a program submits when the block fills `filled` gpu batches: the ops of the
        others (and only those: weight loads serve every batch) submit nothing to do, with their waits."""
        d = self._dispatch.get((name, filled))
        if d is None:
            ops, events = getattr(self.plan.programs, name), self._events[name]
            d = self._dispatch[(name, filled)] = [
                (op.stream, functools.partial(self.HANDLERS[op.kind], self, op) if op.batch < filled else _idle,
                 [events[w] for w in op.waits], events[i]) for i, op in enumerate(ops)]
        return d

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int] | None = None,
                 sampling: list[Sampling] | None = None, ignore_eos: bool = False,
                 on_step=None, stops: list[driver.StopStrings | None] | None = None) -> list[Generation]:
        """Generation for up to one block of prompts (runtime.driver; on_step: its per-step callback)."""
        return driver.generate(self, prompts, max_new_tokens, sampling, ignore_eos, on_step, stops)

    def score(self, contexts: list[list[int]], continuations: list[list[int]]) -> list[driver.Scored]:
        """Log-probabilities of up to one block of continuations after their contexts (runtime.driver)."""
        return driver.score(self, contexts, continuations)
