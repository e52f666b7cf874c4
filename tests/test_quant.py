"""Group-wise quantizer: error bounds per group, packing, exactness on grid values, layout, errors.

Error bound used throughout: with s, mn the stored float16 step and minimum (as float32) and
L = 2**bits - 1, every element satisfies |x - x_hat| <= s/2 + 8 * 2**-23 * (|mn| + L*s).
Why the float32 term: x - mn, its division by s and mn + q*s each round once in float32 (relative
error 2**-24 of a magnitude at most |mn| + L*s; q*s itself is exact: an 8-bit code times an 11-bit
float16 significand fits float32's 24 bits); a rounded quotient can move the chosen code across a
half-integer by at most its own error times s. Four roundings at 2**-24 each are under 8 * 2**-23.
The range of codes covers [mn, mn + L*s] by construction, so no value is clamped further than that.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.quant import (
    QTensor,
    QuantConfig,
    QuantError,
    compressed_nbytes,
    dequantize,
    fake_quantize,
    pack_into,
    quantize,
    unpack_from,
)

EPS32 = 2.0 ** -23


def _grouped(x: torch.Tensor, dim: int, cfg: QuantConfig) -> torch.Tensor:
    """x as [*rows, G, g] float32 (padded with NaN, so padding never takes part in a check)."""
    xf = x.movedim(dim, -1).float()
    n = xf.shape[-1]
    pad = -(-n // cfg.group_size) * cfg.group_size - n
    xf = torch.cat([xf, torch.full((*xf.shape[:-1], pad), math.nan)], -1)
    return xf.unflatten(-1, (-1, cfg.group_size))


def _by_row(stat: torch.Tensor, q: QTensor) -> torch.Tensor:
    """A [*pre, G, *post] statistic as [*rows, G], lined up with _grouped."""
    return stat.movedim(q.dim, -1)


def _check_bound(x: torch.Tensor, dim: int, cfg: QuantConfig) -> tuple[QTensor, torch.Tensor]:
    """Assert the per-element bound; return q and the error in units of each group's step."""
    q = quantize(x, dim, cfg)
    xh = dequantize(q)
    assert xh.shape == x.shape and xh.dtype == torch.float32
    err = _grouped((x.float() - xh).abs(), dim, cfg)  # [*rows, G, g]
    s, mn = _by_row(q.scale, q).float()[..., None], _by_row(q.mn, q).float()[..., None]
    bound = s / 2 + 8 * EPS32 * (mn.abs() + cfg.levels * s)
    real = ~err.isnan()
    assert bool((err[real] <= bound.expand_as(err)[real]).all()), \
        f"max excess {(err - bound)[real].max().item()} over the bound"
    return q, err / s.clamp_min(1e-30)


def _check_stats_tight(x: torch.Tensor, dim: int, q: QTensor) -> None:
    """mn is the largest float16 <= the group minimum; the step is the smallest covering one (to a float16 ulp)."""
    g = _grouped(x, dim, q.cfg)
    lo = torch.where(g.isnan(), math.inf, g).amin(-1)
    hi = torch.where(g.isnan(), -math.inf, g).amax(-1)
    mn16 = _by_row(q.mn, q)
    mn, s = mn16.float(), _by_row(q.scale, q).float()
    assert bool((mn <= lo).all())
    assert bool((torch.nextafter(mn16, torch.full_like(mn16, math.inf)).float() > lo).all())
    assert bool((mn + q.cfg.levels * s >= hi - 4 * EPS32 * (hi.abs() + mn.abs())).all())  # covers the max
    need = (hi - mn) / q.cfg.levels
    assert bool((s <= need * (1 + 2 ** -9) + 2 ** -24).all()), "step wider than one float16 ulp over the need"


CASES = [  # (shape, dim, bits, group_size)
    ((96, 256), -1, 4, 64),  # a weight [out, in], grouped along in
    ((96, 256), -1, 4, 32),
    ((7, 2, 3, 4, 64), -1, 4, 64),  # a KV cache [S, 2, B, KV, D], grouped along the head dim
    ((5, 100), -1, 4, 64),  # 100 = 64 + 36: padded last group
    ((100, 5), 0, 4, 64),  # groups along a leading dim
    ((3, 70, 4), 1, 4, 6),  # a group size that is no power of two and does not divide 70
    ((96, 256), -1, 8, 64),
    ((5, 100), 1, 8, 7),  # 8 bits allow odd group sizes
]


@pytest.mark.parametrize("shape,dim,bits,gs", CASES)
@pytest.mark.parametrize("dist", ["normal", "offset", "heavy"])
def test_error_within_half_a_step_per_group(shape, dim, bits, gs, dist):
    gen = torch.Generator().manual_seed(hash((shape, dim, bits, gs, dist)) % 2**31)
    x = torch.randn(shape, generator=gen)
    if dist == "offset":  # all values far from zero: the minimum, not zero, anchors the grid
        x = 7.0 + 0.1 * x
    elif dist == "heavy":  # outliers, as in real activations
        x = x * torch.rand(shape, generator=gen).pow(-2).clamp_max(1000.0) * 0.01
    cfg = QuantConfig(bits, gs)
    q, rel = _check_bound(x, dim, cfg)
    _check_stats_tight(x, dim, q)
    # the bound is reached, not vacuous: with many random values some land near a half step
    assert rel[~rel.isnan()].max().item() > 0.4


def test_eight_bits_is_finer_than_four():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    e4 = (fake_quantize(x, -1, QuantConfig(4)) - x).abs().mean()
    e8 = (fake_quantize(x, -1, QuantConfig(8)) - x).abs().mean()
    assert 10 < (e4 / e8).item() < 25  # the step shrinks by 255 / 15 = 17


def _grid_tensor(shape, dim, cfg, seed) -> torch.Tensor:
    """Values mn + q * s with float16-exact mn and s, every group holding code 0 and code L."""
    gen = torch.Generator().manual_seed(seed)
    d = dim % len(shape)
    rows = shape[:d] + shape[d + 1:]
    groups = -(-shape[d] // cfg.group_size)
    mn = torch.randint(-1000, 1000, (*rows, groups, 1), generator=gen) * 2.0 ** -6
    s = torch.randint(1, 2048, (*rows, groups, 1), generator=gen) * 2.0 ** -12
    codes = torch.randint(0, cfg.levels + 1, (*rows, groups, cfg.group_size), generator=gen)
    n = shape[d]
    for gi in range(groups):  # each group's real values hold both extreme codes
        first, last = gi * cfg.group_size, min(n, (gi + 1) * cfg.group_size) - 1
        if first < last:
            codes[..., gi, 0], codes[..., gi, last - first] = 0, cfg.levels
    x = (mn + codes * s).flatten(-2)[..., :n]
    return x.movedim(-1, d).contiguous()


@pytest.mark.parametrize("shape,dim,bits,gs", CASES)
def test_round_trip_is_exact_on_grid_values(shape, dim, bits, gs):
    cfg = QuantConfig(bits, gs)
    x = _grid_tensor(shape, dim, cfg, seed=3)
    assert torch.equal(dequantize(quantize(x, dim, cfg)), x)


@pytest.mark.parametrize("bits", [4, 8])
def test_requantizing_a_dequantized_tensor_is_exact(bits):
    cfg = QuantConfig(bits, 64)
    x = torch.randn(32, 320, generator=torch.Generator().manual_seed(5))
    xh = fake_quantize(x, -1, cfg)
    assert not torch.equal(xh, x)
    q2 = quantize(xh, -1, cfg)
    assert torch.equal(dequantize(q2), xh)
    q1 = quantize(x, -1, cfg)
    assert torch.equal(q2.data, q1.data) and torch.equal(q2.scale, q1.scale) and torch.equal(q2.mn, q1.mn)


def test_constant_group_is_exact_with_zero_step():
    x = torch.full((4, 128), 0.3125)
    x[1] = -2.5
    q = quantize(x, -1, QuantConfig())
    assert torch.equal(q.scale, torch.zeros_like(q.scale))
    assert torch.equal(dequantize(q), x)


def _same(a: QTensor, b: QTensor) -> bool:
    return (torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and torch.equal(a.mn, b.mn)
            and a.shape == b.shape and a.dim == b.dim and a.cfg == b.cfg)


@pytest.mark.parametrize("shape,dim,bits,gs", CASES)
def test_pack_into_unpack_from_round_trip(shape, dim, bits, gs):
    cfg = QuantConfig(bits, gs)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    q = quantize(x, dim, cfg)
    nbytes = compressed_nbytes(shape, dim, cfg)
    assert q.data.numel() + 2 * q.scale.numel() + 2 * q.mn.numel() == nbytes == q.nbytes
    assert q.data.dtype == torch.uint8 and q.scale.dtype == q.mn.dtype == torch.float16
    # an odd-sized neighbour before it: offsets into a shared arena must work when even
    arena = torch.full((nbytes + 10,), 0xAB, dtype=torch.uint8)
    buf = arena[6:6 + nbytes]
    pack_into(q, buf)
    assert torch.equal(arena[:6], torch.full((6,), 0xAB, dtype=torch.uint8))
    assert torch.equal(arena[6 + nbytes:], torch.full((4,), 0xAB, dtype=torch.uint8))
    q2 = unpack_from(buf, shape, dim, cfg)
    assert _same(q2, q)
    assert q2.data.data_ptr() >= buf.data_ptr()  # views into buf, no copy
    assert torch.equal(dequantize(q2), dequantize(q))


def test_byte_layout_by_hand():
    cfg = QuantConfig(4, 4)
    x = torch.tensor([[0.0, 1.0, 2.0, 15.0], [-1.0, -1.0, 0.875, -1.0]])  # steps 1 and 0.125, minimums 0 and -1
    q = quantize(x, -1, cfg)
    buf = torch.empty(compressed_nbytes(x.shape, -1, cfg), dtype=torch.uint8)
    assert buf.numel() == 2 * (2 + 2 + 2)
    pack_into(q, buf)
    assert torch.equal(buf[:4].view(torch.float16), torch.tensor([1.0, 0.125], dtype=torch.float16))
    assert torch.equal(buf[4:8].view(torch.float16), torch.tensor([0.0, -1.0], dtype=torch.float16))
    # row 0 codes 0, 1, 2, 15: byte i holds value i (low nibble) and value i + 2 (high nibble)
    assert buf[8:10].tolist() == [0 | 2 << 4, 1 | 15 << 4]
    assert buf[10:12].tolist() == [0 | 15 << 4, 0 | 0 << 4]
    # grouped along dim 0, the group stays a column: data [G, b, *post], stats [G, *post]
    qt = quantize(x.t().contiguous(), 0, cfg)
    assert qt.data.shape == (1, 2, 2) and qt.scale.shape == (1, 2)
    assert qt.data[0].tolist() == [[0 | 2 << 4, 0 | 15 << 4], [1 | 15 << 4, 0 | 0 << 4]]
    assert torch.equal(dequantize(qt), dequantize(q).t())


def test_step_widens_when_float16_rounding_would_clip_the_maximum():
    x = torch.tensor([[-1.0, 0.5]])  # need 1.5 / 15 = 0.1; float16's nearest 0.1 is below it
    q = quantize(x, -1, QuantConfig(4, 2))
    h = torch.tensor(0.1, dtype=torch.float16)
    assert h.float() < 0.1 and q.scale.item() == torch.nextafter(h, torch.tensor(1.0, dtype=torch.float16)).item()
    assert dequantize(q)[0, 1].item() >= 0.5


def test_compressed_nbytes_by_hand():
    assert compressed_nbytes((3, 100), -1, QuantConfig(4, 64)) == 3 * 2 * (4 + 32)
    assert compressed_nbytes((2, 5, 130), 1, QuantConfig(8, 64)) == 2 * 130 * 1 * (4 + 64)
    assert compressed_nbytes((576, 576), 1, QuantConfig()) == 576 * 9 * 36  # about 0.28 of float16
    assert compressed_nbytes((0, 64), -1, QuantConfig()) == 0


def test_padding_does_not_widen_the_last_group():
    x = 5.0 + torch.rand(3, 100, generator=torch.Generator().manual_seed(2))  # far from zero
    q = quantize(x, -1, QuantConfig(4, 64))
    alone = quantize(x[:, 64:].contiguous(), -1, QuantConfig(4, 36))
    assert torch.equal(q.scale[:, 1], alone.scale[:, 0]) and torch.equal(q.mn[:, 1], alone.mn[:, 0])
    assert torch.equal(dequantize(q)[:, 64:], dequantize(alone))


def test_grouping_along_a_leading_dim_equals_the_transposed_last_dim():
    x = torch.randn(130, 6, generator=torch.Generator().manual_seed(4))
    cfg = QuantConfig(4, 64)
    assert torch.equal(dequantize(quantize(x, 0, cfg)), dequantize(quantize(x.t().contiguous(), -1, cfg)).t())


def test_deterministic_and_input_untouched():
    x = torch.randn(48, 200, generator=torch.Generator().manual_seed(6))
    x0 = x.clone()
    a, b = quantize(x, -1, QuantConfig()), quantize(x, -1, QuantConfig())
    assert _same(a, b)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_out_and_input_dtypes(dtype):
    x = torch.randn(16, 192, generator=torch.Generator().manual_seed(8)).to(dtype)
    q = quantize(x, -1, QuantConfig())
    ref = dequantize(q)
    out = torch.empty(16, 192, dtype=dtype)
    ptr = out.data_ptr()
    got = dequantize(q, out=out)
    assert got is out and out.data_ptr() == ptr
    assert torch.equal(out, ref.to(dtype))
    assert dequantize(q, dtype=dtype).dtype == dtype
    with pytest.raises(QuantError, match=r"out has shape \(192, 16\)"):
        dequantize(q, out=torch.empty(192, 16))


def test_errors_name_the_fault():
    with pytest.raises(QuantError, match="bits is 3"):
        QuantConfig(bits=3)
    with pytest.raises(QuantError, match="group_size is 63"):
        QuantConfig(bits=4, group_size=63)
    QuantConfig(bits=8, group_size=63)
    with pytest.raises(QuantError, match="dim 2 is out of range"):
        quantize(torch.zeros(4, 4), 2, QuantConfig())
    with pytest.raises(QuantError, match="0-dim"):
        quantize(torch.tensor(1.0), 0, QuantConfig())
    q = quantize(torch.randn(4, 64), -1, QuantConfig())
    with pytest.raises(QuantError, match="holds 143 bytes, the quantized tensor is 144"):
        pack_into(q, torch.empty(143, dtype=torch.uint8))
    with pytest.raises(QuantError, match="odd byte offset 1"):
        pack_into(q, torch.empty(145, dtype=torch.uint8)[1:])
    with pytest.raises(QuantError, match="flat contiguous uint8"):
        unpack_from(torch.empty(72, dtype=torch.int16), (4, 64), -1, QuantConfig())


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), dim_pick=st.integers(0, 2),
       bits=st.sampled_from([4, 8]), half_group=st.integers(1, 65), seed=st.integers(0, 2**31 - 1),
       offset=st.floats(-100, 100), spread=st.floats(1e-3, 100))
def test_property_bound_layout_and_packing(shape, dim_pick, bits, half_group, seed, offset, spread):
    shape = tuple(shape)
    dim = dim_pick % len(shape) - len(shape)  # a negative dim, as callers write it
    cfg = QuantConfig(bits, 2 * half_group)
    x = offset + spread * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    q, _ = _check_bound(x, dim, cfg)
    _check_stats_tight(x, dim, q)
    nbytes = compressed_nbytes(shape, dim, cfg)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    pack_into(q, buf)
    assert _same(unpack_from(buf, shape, dim, cfg), q)
    assert torch.equal(dequantize(quantize(x, dim, cfg)), dequantize(q))


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), dim_pick=st.integers(0, 2),
       bits=st.sampled_from([4, 8]), half_group=st.integers(1, 40), strided=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_dequantize_in_place_equals_the_allocating_path(shape, dim_pick, bits, half_group, strided, seed):
    """The CPU's in-place restore (any group size, a padded last group apart, any out strides) gives
    exactly what the allocating path (mn + code * scale in one addcmul) gives."""
    shape = tuple(shape)
    dim = dim_pick % len(shape)
    cfg = QuantConfig(bits, 2 * half_group)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1
    q = quantize(x, dim, cfg)
    ref = dequantize(q)
    # a strided out: every other row of a taller buffer, so out is not contiguous
    out = torch.full((2 * shape[0], *shape[1:]), math.nan)[::2] if strided else torch.full(shape, math.nan)
    assert dequantize(q, out=out) is out
    assert torch.equal(out, ref)


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit():
    x = torch.randn(8, 2, 4, 3, 64, generator=torch.Generator().manual_seed(9))
    for cfg in (QuantConfig(4, 64), QuantConfig(8, 32), QuantConfig(4, 6)):
        qc, qg = quantize(x, -1, cfg), quantize(x.cuda(), -1, cfg)
        assert qg.data.is_cuda
        for a, b in ((qc.data, qg.data), (qc.scale, qg.scale), (qc.mn, qg.mn)):
            assert torch.equal(a, b.cpu())
        buf = torch.empty(compressed_nbytes(x.shape, -1, cfg), dtype=torch.uint8, device="cuda")
        pack_into(qg, buf)
        out = torch.empty(x.shape, device="cuda")
        dequantize(unpack_from(buf, x.shape, -1, cfg), out=out)
        assert torch.equal(out.cpu(), dequantize(qc))
