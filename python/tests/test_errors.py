"""Wrong arrays and arguments give clear exceptions with the tpla_status name, never a crash;
every array protocol the package accepts gives the same answers."""

from __future__ import annotations

import numpy as np
import pytest

import tpla
from test_decode import engine, make_context


@pytest.fixture()
def step():
    rng = np.random.default_rng(4)
    ctx, _ = make_context(rng)
    pool, _, table, seqlens = engine(rng, ctx, [30, 9])
    q = rng.standard_normal((2, 1, 4, ctx.row_width)).astype(np.float32)
    return ctx, pool, table, seqlens, q, tpla.decode_plan(seqlens, ctx)


def expect(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match) as e:
        fn(*args, **kw)
    assert isinstance(e.value, tpla.TplaError)
    assert e.value.status.startswith("TPLA_STATUS_")
    return e.value


def test_wrong_dtypes_shapes_strides(step):
    ctx, pool, table, seqlens, q, plan = step
    kv = pool.kv
    d = tpla.decode
    e = expect(ValueError, "q must be float32 or bfloat16 or float16, got float64",
               d, q.astype(np.float64), kv, table, seqlens, plan)
    assert e.status == "TPLA_STATUS_INVALID_ARGUMENT"
    expect(ValueError, r"q must have shape \[batch, 1, heads=4, 48\]", d, q[..., :40].copy(),
           kv, table, seqlens, plan)
    expect(ValueError, "q must be C-contiguous", d, np.swapaxes(np.swapaxes(q, 0, 2).copy(), 0, 2),
           kv, table, seqlens, plan)
    expect(ValueError, "block_table must be int32, got int64", d, q, kv, table.astype(np.int64),
           seqlens, plan)
    expect(ValueError, "block_table must be C-contiguous", d, q, kv,
           np.asfortranarray(table), seqlens, plan)
    expect(ValueError, r"block_table must have shape \[batch=2", d, q, kv, table[:1], seqlens,
           plan)
    expect(ValueError, "cache_seqlens must be int32", d, q, kv, table,
           seqlens.astype(np.float32), plan)
    expect(ValueError, r"kv_cache must be bfloat16, float16 or float32 \(or uint8 with "
           r"kv_dtype='fp8_e4m3'\), got float64", d, q,
           kv.astype(np.float64), table, seqlens, plan)
    expect(ValueError, "kv_cache is uint16: pass kv_dtype", d, q, kv.view(np.uint16)[..., :48],
           table, seqlens, plan)
    expect(ValueError, "kv_cache must have shape", d, q, kv[:, :, 0, 0].copy(), table, seqlens, plan)
    expect(ValueError, "each page's rows contiguously", d, q, kv[:, ::2], table, seqlens, plan)
    wide = np.zeros(kv.shape[:3] + (40,), np.float32)
    e = expect(tpla.MismatchError, "paged cache's rows are 40 values", d, q, wide, table,
               seqlens, plan)
    assert e.status == "TPLA_STATUS_MISMATCH"
    expect(ValueError, "must be an array", d, "q", kv, table, seqlens, plan)
    expect(ValueError, "absorb=True needs q_rope", d, q, kv, table, seqlens, plan, absorb=True)


def test_outputs_plans_scales_layers(step):
    ctx, pool, table, seqlens, q, plan = step
    kv, d = pool.kv, tpla.decode
    out = np.zeros((2, 1, 4, 32), np.float32)
    out.flags.writeable = False
    expect(ValueError, "out is read-only", d, q, kv, table, seqlens, plan, out=out)
    expect(ValueError, "out must have shape", d, q, kv, table, seqlens, plan,
           out=np.zeros((2, 1, 4, 31), np.float32))
    expect(ValueError, "out must be float32 or bfloat16", d, q, kv, table, seqlens, plan,
           out=np.zeros((2, 1, 4, 32), np.float64))
    expect(ValueError, "lse must be float32", d, q, kv, table, seqlens, plan,
           lse=np.zeros((2, 4, 1), np.float64))
    buf = np.zeros(2 * 4 * 48 + 2 * 4 * 32, np.float32)
    qa, oa = buf[: 2 * 4 * 48].reshape(q.shape), buf[2 * 4 * 32 :][: 2 * 4 * 32].reshape(2, 1, 4, 32)
    qa[:] = q
    expect(ValueError, "out overlaps q", d, qa, kv, table, seqlens, plan, out=oa)
    expect(ValueError, "no lse", d, q, kv, table, seqlens, plan, project=True,
           lse=np.zeros((2, 4, 1), np.float32))
    # a plan for other lengths or another batch
    other = tpla.decode_plan(np.array([31, 9], np.int32), ctx)
    expect(ValueError, "plan again", d, q, kv, table, seqlens, other)
    three = tpla.decode_plan(np.array([1, 2, 3], np.int32), ctx)
    expect(ValueError, "plan", d, q, kv, table, seqlens, three)
    expect(ValueError, "negative", tpla.decode_plan, np.array([3, -1], np.int32), ctx)
    expect(ValueError, "softmax scale must be finite", d, q, kv, table, seqlens, plan, -1.0)
    expect(IndexError, "layer 5 is out of range", d, q, kv, table, seqlens, plan, layer=5)
    expect(ValueError, "rms must be", tpla.append, np.zeros((1, 64), np.float32),
           np.zeros((1, 16), np.float32), kv, np.zeros(1, np.int32), context=ctx, rms="x")
    expect(ValueError, r"k_pe must have shape \[1, d_r=16\]", tpla.append,
           np.zeros((1, 64), np.float32), np.zeros((2, 16), np.float32), kv,
           np.zeros(1, np.int32), context=ctx)
    ro = kv.copy()
    ro.flags.writeable = False
    expect(ValueError, "read-only", tpla.append, np.zeros((1, 64), np.float32),
           np.zeros((1, 16), np.float32), ro, np.zeros(1, np.int32), context=ctx)
    e = expect(ValueError, "non-finite|finite|represent", tpla.append,
               np.full((1, 64), np.inf, np.float32), np.zeros((1, 16), np.float32), kv,
               np.zeros(1, np.int32), context=ctx)
    assert e.status == "TPLA_STATUS_INVALID_ARGUMENT"
    expect(NotImplementedError, "tpla.DeviceEngine", tpla.RankContext, ctx.dims, ctx.plan, 1,
           backend="cuda")


class DLPackOnly:
    def __init__(self, a, device=(1, 0)):
        self.a, self.device = a, device

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.device


class InterfaceOnly:
    def __init__(self, a):
        self.a = a
        self.__array_interface__ = a.__array_interface__


def test_dlpack_and_array_interface_give_the_same_answers(step):
    ctx, pool, table, seqlens, q, plan = step
    base, bl = tpla.decode(q, pool.kv, table, seqlens, plan)
    for wrap in (DLPackOnly, InterfaceOnly):
        out, lse = tpla.decode(wrap(q), wrap(pool.kv), wrap(table), wrap(seqlens), plan)
        assert isinstance(out, np.ndarray)
        assert np.array_equal(out, base) and np.array_equal(lse, bl)
    sliced = InterfaceOnly(q[:, :, :, ::2])
    expect(ValueError, "C-contiguous|shape", tpla.decode, sliced, pool.kv, table, seqlens, plan)
    e = expect(NotImplementedError, "CUDA tensor", tpla.decode, DLPackOnly(q, (2, 0)), pool.kv,
               table, seqlens, plan)
    assert e.status == "TPLA_STATUS_UNSUPPORTED"


def test_errors_carry_status_and_message():
    with pytest.raises(tpla.InvalidArgumentError) as e:
        tpla.ModelDims.preset("gpt-2")
    assert e.value.status == "TPLA_STATUS_INVALID_ARGUMENT"
    assert "unknown model preset 'gpt-2'" in e.value.message
    assert str(e.value).startswith("TPLA_STATUS_INVALID_ARGUMENT: ")
    with pytest.raises(OSError) as e:
        tpla.RankContext.from_weights_file("/nonexistent/w.tplaw")
    assert e.value.status == "TPLA_STATUS_IO"
