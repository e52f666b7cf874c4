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
import tempfile
import time
from pathlib import Path

import torch

from flexgen_graph.errors import UserError
from flexgen_graph.ir import TIERS, Tier
from flexgen_graph.planfile import Plan, check_model
from flexgen_graph.program import COMPUTE_KINDS, SCRATCH_ROLES, BufferRole, Op, OpKind
from flexgen_graph.layout import align_up, dequant_scratch
from runtime import driver, kernels, preflight
from runtime.backend import Backend, Buf, open_backend
from runtime.compressed import (
    CacheCodec,
    compressed_layers,
    decompress_layer,
    dense_cache_view,
)
from runtime.driver import BlockState, Generation
from runtime.packed import packed_layer_views
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
        # compression: weight homes hold the store's compressed copy, dequantized into a dense scratch just
        # before each compute, or (packed_weights) computed on as they are; cache buffers hold compressed rows
        self.qcfg = QuantConfig(pol.compress_bits, pol.group_size) if pol.compresses else None
        self.weights = compressed_layers(store, self.qcfg, pol.packed_weights) if pol.compress_weights else store
        # how compute ops see their weights, as the plan says: typed views of dense bytes, a dense copy
        # dequantized per layer, or the compressed bytes themselves (runtime.packed)
        self._weights = (self._packed_weights if pol.packed_weights else
                         self._dequantized_weights if pol.compress_weights else self._dense_weights)
        self.codec = CacheCodec(self.spec, self.b, self.qcfg) if pol.compress_cache else None
        self._tmp = None
        if offload_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="flexgen-offload-")
            offload_dir = self._tmp.name
        prof = plan.profile
        self.cold_weights = cold_weights
        budget = {Tier.GPU: prof.gpu_bytes, Tier.CPU: prof.cpu_bytes, Tier.DISK: prof.disk_bytes}
        if device == "auto":
            device = "cuda" if prof.has_gpu and torch.cuda.is_available() else "cpu"
        if not any(op.kind not in COMPUTE_KINDS for op in plan.programs.prefill + plan.programs.decode):
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
            return self.max_seq * self._row_bytes()
        if b.role in SCRATCH_ROLES:
            return self._scratch_need[b.role]
        return None

    _DEV_CACHE_KINDS = frozenset({OpKind.DECODER_PREFILL, OpKind.DECODER_DECODE})  # attend a cache on the device

    @functools.cached_property
    def _dense_w(self) -> bool:
        pol = self.plan.policy
        return pol.compress_weights and not pol.packed_weights

    @functools.cached_property
    def _scratch_need(self) -> dict[BufferRole, int]:
        """The largest layout.dequant_scratch of the plan's compute ops, per scratch role, in the runtime's
        own sizes (the planner's scratch buffers must match them)."""
        s, need = self.spec, {r: 0 for r in SCRATCH_ROLES}
        cache = self.max_seq * self.b * s.kv_bytes_per_token() if self.codec else 0
        for op in self.plan.programs.prefill + self.plan.programs.decode:
            if op.kind not in COMPUTE_KINDS:
                continue
            cpu = op.kind is OpKind.DECODER_DECODE_CPU_ATTN
            c = cache if op.kind in self._DEV_CACHE_KINDS or cpu else 0
            g, h = dequant_scratch(s.layer_bytes(op.layer) if self._dense_w else 0, c, cpu)
            need[BufferRole.DEQUANT_SCRATCH] = max(need[BufferRole.DEQUANT_SCRATCH], g)
            need[BufferRole.DEQUANT_HOST] = max(need[BufferRole.DEQUANT_HOST], h)
        return need

    def _allocate(self) -> None:
        """Every buffer the run holds is one of the plan's (the peak the planner predicted counts them all)."""
        have = {b.role for b in self.plan.programs.buffers}
        for role, n in self._scratch_need.items():
            if n and role not in have:
                raise UserError(f"the plan has no {role.value} buffer, the runtime needs {n} bytes there "
                                 f"(compression: weights {self.plan.policy.compress_weights}, cache "
                                 f"{self.plan.policy.compress_cache}); recompile the plan")
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
        """Views of the plan's dequantization scratch (layout.dequant_scratch): on the compute device a
        layer's dense weights, then (aligned after them) the dense cache of a decoder attending there; on
        the host, the cache of CPU-attended decode."""
        s, kinds = self.spec, {op.kind for op in self.plan.programs.prefill + self.plan.programs.decode}
        scratch = {b.role: self.bufs[b.id].tensor for b in self.plan.programs.buffers if b.role in SCRATCH_ROLES}
        dev, host = scratch.get(BufferRole.DEQUANT_SCRATCH), scratch.get(BufferRole.DEQUANT_HOST)
        self._dense_layer = -1  # the layer whose weights _wdense holds (decoder caches go after them)
        self._wdense = dev if self._dense_w else None
        w_dec = max((s.layer_bytes(j) for j in self.plan.layers if 0 < j < s.num_graph_layers - 1 and self._dense_w),
                    default=0)
        self._cdense = self._cdense_host = None
        if self.codec and kinds & self._DEV_CACHE_KINDS:
            self._cdense = dense_cache_view(dev[align_up(w_dec):], self.max_seq, self.b, s)
        if self.codec and OpKind.DECODER_DECODE_CPU_ATTN in kinds:
            self._cdense_host = dense_cache_view(host, self.max_seq, self.b, s)

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

    def _views(self, key: tuple, layer: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """A buffer's typed views for a layer, made once: views follow the buffer, whatever it holds, and
        rebuilding them per op showed in a profile of small-batch decode steps."""
        v = self._view_memo.get(key)
        if v is None:
            v = self._view_memo[key] = kernels.layer_views(self.spec, layer, buf)
        return v

    def _dense_weights(self, op: Op) -> dict[str, torch.Tensor]:
        return self._views((op.weight, op.layer), op.layer, self.bufs[op.weight].tensor)

    def _packed_weights(self, op: Op) -> dict[str, object]:
        key = ("packed", op.weight, op.layer)
        v = self._view_memo.get(key)
        if v is None:
            v = self._view_memo[key] = packed_layer_views(self.spec, op.layer, self.bufs[op.weight].tensor, self.qcfg)
        return v

    def _dequantized_weights(self, op: Op) -> dict[str, torch.Tensor]:
        buf = self.bufs[op.weight].tensor
        dense = self._wdense[: self.spec.layer_bytes(op.layer)]
        if self._dense_layer != op.layer:  # weights never change: the gpu batches of a layer share one copy
            decompress_layer(self.spec, op.layer, buf, self.qcfg, dense)
            self._dense_layer = op.layer
        return self._views(("dense", op.layer), op.layer, dense)

    # -- handlers ------------------------------------------------------------------------------
    def _load_weight(self, op: Op) -> None:
        src, dst = self.bufs[op.src], self.bufs[op.dst]
        if src is None:
            self.backend.read_layer(self.weights, op.layer, dst, drop_page_cache=self.cold_weights)
        else:
            self.backend.copy(dst, src, 0, self.weights.layer_nbytes(op.layer))

    def _row_bytes(self) -> int:
        """Cache bytes of one token of one gpu batch (the cache buffers are token-major)."""
        return self.codec.row_bytes if self.codec else self.b * self.spec.kv_bytes_per_token()

    def _load_cache(self, op: Op) -> None:
        self.backend.copy(self.bufs[op.dst], self.bufs[op.src], 0, self._start * self._row_bytes())

    def _store_cache(self, op: Op) -> None:
        rb = self._row_bytes()
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
        hv, w = self._hidden_view(op.hidden, r), self._weights(op)
        pos, mask = self.state.pos[k][:, a:a + t], self.state.mask[k][:, : a + t]
        if self.codec is None:
            out = kernels.decoder(self.spec, w, hv, self._cache_view(op.cache, r), a, pos, mask)
        else:
            q, kk, v = kernels.attention_inputs(self.spec, w, hv, pos)
            att = self._attend_compressed(q, kk, v, self.bufs[op.cache].tensor, self._cdense[:, :, :r], a, mask)
            out = kernels.attention_output_and_mlp(self.spec, w, hv, att)
        hv.copy_(out)

    def _attend_compressed(self, q, k, v, cbuf: torch.Tensor, dense: torch.Tensor, a: int,
                           mask: torch.Tensor) -> torch.Tensor:
        """attend over a compressed cache: store the new rows, restore rows [0, a), attend with the new
        k, v as they read back (so every token sees the same cache values, whenever it reads them)."""
        k, v = self.codec.store_new(cbuf, k, v, a)
        self.codec.load(cbuf, dense, a)
        return kernels.attend(self.spec, q, k, v, dense, a, mask)

    def _decoder_host_cache(self, op: Op) -> None:
        """The cache stays in host memory: decode attends there (q, k, v cross, the cache never does);
        prefill attends on the compute device over the new tokens, then writes their k, v home."""
        k, a, t, r = op.batch, self._start, self._t, self._rows(op)
        hv, cbuf = self._hidden_view(op.hidden, r), self.bufs[op.cache].tensor
        w = self._weights(op)
        mask = self.state.mask[k][:, : a + t]
        q, kk, v = kernels.attention_inputs(self.spec, w, hv, self.state.pos[k][:, a:a + t])
        if op.kind is OpKind.DECODER_DECODE_CPU_ATTN:
            host = cbuf.device
            q, kk, v, mask = q.to(host), kk.to(host), v.to(host), mask.to(host)
            if self.codec is None:
                att = kernels.attend(self.spec, q, kk, v, self._cache_view(op.cache, r), a, mask)
            else:
                att = self._attend_compressed(q, kk, v, cbuf, self._cdense_host[:, :, :r], a, mask)
        else:
            s = self.spec
            tmp = torch.empty((t, 2, r, s.num_kv_heads, s.head_dim), dtype=self.dtype, device=hv.device)
            if self.codec is not None:
                kk, v = self.codec.store_new(cbuf, kk, v, 0)
            att = kernels.attend(self.spec, q, kk, v, tmp, 0, mask)
            if self.codec is None:
                self._cache_view(op.cache, r)[:t].copy_(tmp)
        hv.copy_(kernels.attention_output_and_mlp(self.spec, w, hv, att.to(hv.device)))

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
        OpKind.DECODER_PREFILL_HOST_CACHE: _decoder_host_cache,
        OpKind.DECODER_DECODE_CPU_ATTN: _decoder_host_cache,
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
