"""Compute on packed 4- and 8-bit weights (runtime.packed): the int4 kernel's layout has the compressed layout's
sizes, its matmul equals a matmul by the weights it stands for within bfloat16 rounding, and generation
with a packed plan equals transformers run on those same weights."""

import copy

import pytest
import torch
from test_compressed import generate_within_peaks, tiny_store
from test_numerics import GEN_LEN, POLICIES, PROMPT_LEN, hf_generate, prompts_for

from flexgen_graph.app.api import compile_plan
from flexgen_graph.errors import UserError
from flexgen_graph.hardware import load_profile
from flexgen_graph.ir import Workload
from flexgen_graph.hardware import packed_suffix
from flexgen_graph.layout import (
    compressed_nbytes,
    packed_geometry,
    packed_kernel_fits,
)
from runtime.compressed import compressed_layers
from runtime.engine import Engine
from runtime.packed import (
    PackedWeight,
    RowTable,
    TiledWeight,
    packed_layer_views,
    packed_matmul,
    packed_weight,
)
from runtime.quant import QuantConfig, dequantize, quantize


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (64, 32), (96, 64)])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layout_has_the_compressed_size(shape, group, bits):
    cfg = QuantConfig(bits, group)
    if not packed_kernel_fits(shape, cfg):
        pytest.skip(f"{shape} at group {group} is not the kernel's")
    assert sum(packed_geometry(shape, cfg)) == compressed_nbytes(shape, 0, cfg)


def test_packed_kernel_fits_says_no_where_the_kernel_cannot():
    assert not packed_kernel_fits((64, 1000), QuantConfig(4, 32))  # out not a multiple of 16
    assert not packed_kernel_fits((48, 64), QuantConfig(4, 32))  # in not a multiple of the group
    assert not packed_kernel_fits((64, 64), QuantConfig(4, 16))  # the kernel's groups are 32 to 256
    assert not packed_kernel_fits((512, 64), QuantConfig(8, 256))  # 8 bits: a kernel group of 512
    assert packed_kernel_fits((64, 64), QuantConfig(8, 32)) and packed_kernel_fits((64, 64), QuantConfig(8, 16))


# out: blocks of 64 (the AVX-512 kernel's) and 32 (AVX2's, scalar's) with tails of 16, 32 and 48
@pytest.mark.parametrize("shape", [(256, 96), (64, 208), (128, 16), (64, 48), (64, 80)])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_kernels_weights_read_through_it_are_what_it_multiplies_by(shape, bits):
    """PackedWeight.dequantize reads the codes through the kernel with a unit table and applies the real one
    itself: it must equal the kernel applied to the identity with the real table (one bfloat16 rounding)."""
    torch.manual_seed(0)
    pk = packed_weight(quantize(torch.randn(*shape) * 0.05, 0, QuantConfig(bits, 32)))
    kernel = pk.kernel(pk.kernel_input(torch.eye(shape[0], dtype=torch.bfloat16))).float()
    assert torch.allclose(pk.dequantize(), kernel, rtol=2 ** -8, atol=0)
    codes = pk.kernel_codes(0, 2 * pk.kernel_group)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15, "codes are nibbles"


@pytest.mark.parametrize("rows", [1, 5, 64, 1000])  # the kernel at every number of rows (blocks of 4 rows)
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (8, 64), (8, 128)])
def test_packed_matmul_is_a_matmul_by_the_weights_it_stands_for(rows, bits, group):
    torch.manual_seed(0)
    w = torch.randn(256, 96) * 0.05
    q = quantize(w, 0, QuantConfig(bits, group))
    pk = packed_weight(q)
    wk = pk.dequantize()
    # the kernel's weights: the FlexGen values with scale and zero rounded to bfloat16, and no offset beyond it
    off = wk - dequantize(q)
    assert off.abs().max() <= 2 ** -8 * w.abs().max()
    assert (off / q.scale.float().repeat_interleave(group, 0)).mean().abs() <= 0.02  # in quantization steps
    x = torch.randn(rows, 256)
    ref, flexgen = x @ wk, x @ dequantize(q)
    got = x @ pk  # PackedWeight.__rmatmul__
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    # bfloat16 activations and result: each output within about 2**-8 of the largest term sum
    assert (got - ref).abs().max() <= 2 ** -7 * (x.abs() @ wk.abs()).max()
    assert (got - flexgen).abs().max() <= 2 ** -6 * (x.abs() @ w.abs()).max()
    assert torch.equal(got, packed_matmul(x, pk))


def test_packed_8bit_weights_are_the_8bit_codes_not_4bit_ones():
    """The 8-bit kernel weights resolve what 4 bits cannot: far closer to w than 4-bit packing of the same w."""
    torch.manual_seed(0)
    w = torch.randn(256, 96) * 0.05
    err = {b: (packed_weight(quantize(w, 0, QuantConfig(b, 32))).dequantize() - w).abs().max() for b in (4, 8)}
    assert err[8] < err[4] / 4


def test_tiled_weight_and_row_table_equal_the_dequantized_tensor():
    torch.manual_seed(0)
    cfg = QuantConfig(8, 32)
    w = torch.randn(96, 1000)
    q = quantize(w, 0, cfg)
    x = torch.randn(3, 96)
    assert torch.allclose(x @ TiledWeight.from_qtensor(q), x @ dequantize(q), atol=1e-5, rtol=1e-5)
    table = quantize(torch.randn(50, 64), -1, cfg)
    ids = torch.tensor([[3, 49], [0, 3]])
    assert torch.equal(RowTable(table, torch.float32)[ids], dequantize(table)[ids])


def packed_reference(store, cfg: QuantConfig):
    """The HF model with every matrix replaced by the numbers a packed run computes with: the int4
    kernel's weights where it takes the matrix, else runtime.quant's fake-quantized ones."""
    model, spec = copy.deepcopy(store.model), store.spec
    layers = compressed_layers(store, cfg, packed=True)
    sd = model.state_dict()
    kinds = set()
    with torch.no_grad():
        for j in range(spec.num_graph_layers):
            buf = torch.empty(layers.layer_nbytes(j), dtype=torch.uint8)
            layers.read_layer_into(j, buf)
            views = packed_layer_views(spec, j, buf, cfg)
            for t in spec.checkpoint_tensors(j):
                v = views[t.name]
                kinds.add(type(v))
                if isinstance(v, PackedWeight):
                    sd[t.hf].copy_(v.dequantize().T)
                elif isinstance(v, TiledWeight):
                    sd[t.hf].copy_(dequantize(v.q).T)
                elif isinstance(v, RowTable):
                    sd[t.hf].copy_(dequantize(v.q))
    return model, kinds


NEAR_TIE = 2e-2  # of the logits' scale: bfloat16 activations move a tiny model's logits about this much


def assert_agrees_but_at_near_ties(model, prompts, got: list[list[int]], expected: list[list[int]]) -> None:
    """Each sequence equals the reference's up to its first differing token, and there the reference's own
    logits for the two tokens lie within NEAR_TIE (a tie bfloat16 rounding may break either way; a wrong
    weight would show as a decisive gap)."""
    for p, g, e in zip(prompts, got, expected, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), min(len(g), len(e)))
        if g == e:
            continue
        assert n < min(len(g), len(e)), f"one sequence is a prefix of the other: {g} {e}"
        with torch.no_grad():
            logits = model(torch.tensor([p + e[:n]])).logits[0, -1]
        gap = (logits[e[n]] - logits[g[n]]).abs().item()
        assert gap <= NEAR_TIE * logits.abs().max().item(), f"token {n} of {p}: {g} != {e}, logit gap {gap}"


@pytest.fixture(scope="module", params=["opt", "llama", "qwen2"])
def family_store(request, tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("policy,bits", [("all-gpu", 4), ("weights-disk", 4), ("all-gpu", 8),
                                         ("weights-50-cpu-50-disk+cache-50-gpu-50-cpu", 4),
                                         ("weights-50-cpu-50-disk+cache-50-gpu-50-cpu", 8)])
def test_packed_generation_equals_transformers_on_the_packed_numbers(family_store, policy, bits, tmp_path):
    store, cfg = family_store, QuantConfig(bits, 32)
    ref, kinds = packed_reference(store, cfg)
    assert PackedWeight in kinds, "no matrix went through the int4 kernel: the test would be void"
    prompts = prompts_for(store.model.config.vocab_size)
    expected = hf_generate(ref, prompts)
    w, c, h = POLICIES[policy]
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), gpu_batch_size=2,
                        num_gpu_batches=2, fixed={"weights": w, "cache": c, "hidden": h}, compress="weights",
                        group_size=32, compress_bits=bits, packed=True)
    assert plan.policy.packed_weights and plan.policy.compress_bits == bits
    got = generate_within_peaks(plan, store, prompts, tmp_path / "offload", policy)
    assert_agrees_but_at_near_ties(ref, prompts, got, expected)


def test_packed_is_refused_where_it_cannot_run():
    from flexgen_graph.catalog import catalog_spec
    spec, wl = catalog_spec("HuggingFaceTB/SmolLM2-135M-Instruct"), Workload(16, 8)
    with pytest.raises(UserError, match="group size"):
        compile_plan(spec, load_profile("cpu-small"), wl, compress="weights", compress_bits=8, group_size=256,
                     packed=True)
    with pytest.raises(UserError, match="group size"):
        compile_plan(spec, load_profile("cpu-small"), wl, compress="weights", group_size=16, packed=True)
    with pytest.raises(UserError, match="GPU"):
        compile_plan(spec, load_profile("t4-flexgen"), wl, compress="weights", packed=True)
    plan = compile_plan(spec, load_profile("cpu-small"), wl, compress="weights", packed=True)
    assert plan.policy.packed_weights and plan.policy.to_dict()["packed_weights"] is True


def _with_packed_curves(spec, factor: float):
    """A hand-made calibrated CPU profile whose packed curves are the dense ones times factor."""
    import dataclasses

    from flexgen_graph.hardware import Curve, LayerCurve
    from tests.test_calibration import calibrated
    prof = calibrated(spec)
    cal = prof.calibration
    packed = tuple(LayerCurve(lc.kind + packed_suffix(4), lc.weight_bytes, lc.model,
                              Curve(lc.rows.xs, tuple(y * factor for y in lc.rows.ys))) for lc in cal.layers)
    return dataclasses.replace(prof, calibration=dataclasses.replace(cal, layers=cal.layers + packed))


def test_auto_computes_on_packed_weights_exactly_where_measured_faster():
    from tests.test_planner import tiny_spec
    spec, wl = tiny_spec(), Workload(16, 8)
    faster = compile_plan(spec, _with_packed_curves(spec, 0.5), wl, compress="auto")
    assert faster.policy.compress_weights and faster.policy.packed_weights
    slower = compile_plan(spec, _with_packed_curves(spec, 2.0), wl, compress="auto")
    assert not slower.policy.packed_weights and not slower.policy.compress_weights
    # the prediction follows the curve: the packed plan's compute is the packed curves'
    off = compile_plan(spec, _with_packed_curves(spec, 0.5), wl, compress="off")
    assert faster.predictions["tokens_per_s"] > off.predictions["tokens_per_s"]
    # no packed curve for the model: auto never picks packed (nothing measured says it is faster)
    from tests.test_calibration import calibrated
    assert not compile_plan(spec, calibrated(spec), wl, compress="auto").policy.packed_weights


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_layers_compute_what_their_weights_say_within_bfloat16_rounding(family_store, bits):
    """Each layer on packed views against the same layer on the dense weights those views stand for (the
    reference's numbers): decoder outputs and head logits within 1e-2 of their scale (bfloat16 activations)."""
    from runtime import kernels
    store, cfg = family_store, QuantConfig(bits, 32)
    spec = store.spec
    layers = compressed_layers(store, cfg, packed=True)
    torch.manual_seed(0)
    h = torch.randn(3, 4, spec.hidden)
    pos = torch.arange(4).expand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    for j in (1, spec.num_graph_layers - 1):
        buf = torch.empty(layers.layer_nbytes(j), dtype=torch.uint8)
        layers.read_layer_into(j, buf)
        packed = packed_layer_views(spec, j, buf, cfg)
        dense = {k: v.dequantize() if isinstance(v, PackedWeight) else dequantize(v.q) if isinstance(v, TiledWeight)
                 else v for k, v in packed.items()}
        if j == 1:
            cache = torch.zeros(4, 2, 3, spec.num_kv_heads, spec.head_dim)
            got = kernels.decoder(spec, packed, h, cache.clone(), 0, pos, mask)
            ref = kernels.decoder(spec, dense, h, cache.clone(), 0, pos, mask)
        else:
            got, ref = kernels.head(spec, packed, h), kernels.head(spec, dense, h)
        assert (got - ref).abs().max() <= 1e-2 * ref.abs().max(), f"layer {j}"
        assert not torch.equal(got, ref) or j != 1, "bfloat16 arithmetic left no trace: is the kernel in use?"


def test_packed_curves_are_measured_read_back_and_charged():
    """The profiler times each layer on packed weights of each bits (kinds + packed_suffix(bits)); a profile file
    reads them back; a packed decode step costs its bits' packed curve at its rows, and no dequantization."""
    import dataclasses
    import math

    from flexgen_graph.hardware import Curve, LayerCurve
    from flexgen_graph.ir import Block
    from flexgen_graph.lower import lower
    from planner.cost import Flags, phase_costs
    from planner.memory import compression_of
    from runtime.profiler import layer_curves, packed_layer_curves
    from tests.test_calibration import calibrated
    from tests.test_planner import tiny_spec

    spec = tiny_spec("llama", layers=1)
    dense = layer_curves(spec, torch.device("cpu"))
    packed = {bits: packed_layer_curves(spec, torch.device("cpu"), bits) for bits in (4, 8)}
    for bits, curves in packed.items():
        assert [c.kind for c in curves] == [c.kind + packed_suffix(bits) for c in dense]
        assert [c.weight_bytes for c in curves] == [c.weight_bytes for c in dense]
        assert all(math.isfinite(y) and y > 0 for c in curves for y in c.rows.ys)
        assert [LayerCurve.from_dict(c.to_dict(), "t") for c in curves] == curves
    # 8 bits priced by curves 3x the 4-bit ones: which curve a plan is charged cannot be mistaken
    packed[8] = [dataclasses.replace(c8, rows=Curve(c4.rows.xs, tuple(3 * y for y in c4.rows.ys)))
                 for c4, c8 in zip(packed[4], packed[8])]
    hw = calibrated(layers=tuple(dense + packed[4] + packed[8]), op_s=0.0)
    b, P, G = 4, 8, 2
    g = lower(spec, Workload(P, G), Block(b, 1))
    for bits in (4, 8):
        costs = phase_costs(g, hw, Flags(compress_weights=True, packed_weights=True), compression_of(spec, 32, bits))
        [step] = [s for s in costs.decode if s.figures.weight_full_bytes == spec.layer_bytes(1)]
        want = packed[bits][1].rows.at(b) + dense[1].attn_s * b * (P + G / 2)
        assert step.terms[0].const == pytest.approx(want, rel=1e-9), bits


def test_a_model_added_to_a_profile_later_gets_its_packed_curves_too():
    """`--profile auto` adds a model it has not timed (runtime.profiler.add_models): with packed curves, as
    `profile --model` times them, else --compress auto and packed predictions price that model without them."""
    from runtime.profiler import add_models
    from tests.test_calibration import calibrated
    from tests.test_planner import tiny_spec

    spec = tiny_spec("llama", layers=1).with_dtype("float32")
    hw = add_models(calibrated(layers=()), [spec])
    kinds = {(lc.kind, lc.weight_bytes) for lc in hw.calibration.layers}
    for bits in (4, 8):
        assert ("decoder" + packed_suffix(bits), spec.layer_bytes(1)) in kinds, bits


def test_a_packed_plan_runs_on_the_cpu_only(family_store, tmp_path):
    store = family_store
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), compress="weights",
                        group_size=32, packed=True)
    with pytest.raises(UserError, match="--device cpu"):
        Engine(plan, store, tmp_path / "offload", device="cuda")


def test_a_packed_copy_is_made_for_the_kernel_that_reads_it(tmp_path, monkeypatch):
    """The kernel's layout is torch's own, per CPU capability: the copy's folder names the capability and its
    manifest the torch version; a copy for another capability is never read (its own folder), one from another
    torch is rebuilt."""
    import json

    import runtime.compressed as rc
    from runtime.packed import kernel_tag
    store, cfg = tiny_store(tmp_path, "llama"), QuantConfig(4, 32)
    here = compressed_layers(store, cfg, packed=True)
    tag = kernel_tag()
    assert here.path.name.endswith("-int4cpu-" + tag["capability"])
    meta = json.loads((here.path / "compressed.json").read_text())
    assert {k: meta[k] for k in tag} == tag
    before = {f.name: f.read_bytes() for f in here.path.iterdir()}
    monkeypatch.setattr(rc, "kernel_tag", lambda: {**tag, "capability": "elsewhere"})
    other = compressed_layers(store, cfg, packed=True)
    assert other.path != here.path and {f.name: f.read_bytes() for f in here.path.iterdir()} == before
    monkeypatch.setattr(rc, "kernel_tag", lambda: {**tag, "torch": "0.0.1"})
    (here.path / "1.bin").write_bytes(b"\0" * (here.path / "1.bin").stat().st_size)  # what another torch left
    again = compressed_layers(store, cfg, packed=True)
    assert json.loads((again.path / "compressed.json").read_text())["torch"] == "0.0.1"
    assert (again.path / "1.bin").read_bytes() == before["1.bin"], "rebuilt from the store, not kept"


def test_a_kernel_that_computes_wrong_is_refused_before_any_work(tmp_path, monkeypatch):
    """The start-up self-check: a repacking whose layout the kernel does not read as written (the fault an AVX-512
    layout read by an AVX2 kernel was) stops the engine in one line naming the capability, before the compressed
    copy is built."""
    import runtime.packed as rp
    store = tiny_store(tmp_path, "llama")
    plan = compile_plan(store.spec, load_profile("cpu-small"), Workload(PROMPT_LEN, GEN_LEN), compress="weights",
                        group_size=32, packed=True)
    right = rp._convert
    monkeypatch.setattr(rp, "_convert", lambda t: right(t.flip(0)))  # output channels in another order
    monkeypatch.setattr(rp, "_CHECKED", set())
    with pytest.raises(UserError, match=f"capability {rp.kernel_capability()}"):
        Engine(plan, store, tmp_path / "offload")
    assert not any(p.name.startswith("compressed-") for p in store.path.iterdir()), "work was done first"
    monkeypatch.setattr(rp, "_convert", right)
    Engine(plan, store, tmp_path / "offload").close()  # the real kernel passes


@pytest.mark.parametrize("slowdown", [1.0, 30.0])
def test_an_engine_names_a_dtype_measured_slower_than_float32_on_this_cpu(tmp_path, monkeypatch, capsys, slowdown):
    """bfloat16 and float16 matmuls run at a fraction of float32's speed on CPUs without AVX512-BF16 or AMX (28x on
    an AVX2 EPYC): the engine says so, with the measured figure, whenever it computes in such a dtype here."""
    from runtime import kernels
    from runtime.weight_store import make_dummy
    from tests.test_planner import tiny_spec
    monkeypatch.setattr(kernels, "cpu_matmul_slowdown", lambda dt: 1.0 if dt == torch.float32 else slowdown)
    spec = tiny_spec("llama")
    for dtype in ("float32", "bfloat16"):
        s = spec.with_dtype(dtype)
        store = make_dummy(s, tmp_path / dtype)
        Engine(compile_plan(s, load_profile("cpu-small"), Workload(8, 2)), store, tmp_path / f"off-{dtype}").close()
        err = capsys.readouterr().err
        assert ("bfloat16 matmuls run 30x slower than float32" in err) == (dtype == "bfloat16" and slowdown > 1.5)
        assert "float32 matmuls" not in err  # float32 itself is never named
