"""The GPU engine path (tpla.DeviceEngine) on torch CUDA tensors, against the NumPy float64
reference (tests/reference.py) and the CPU backend: decode on a shuffled paged pool of
mixed lengths, append then decode, a torch.cuda.graphs capture replayed with new tokens,
FP8 pools (appends and row copies on any GPU, decode on a Hopper one), bad inputs, and
(with TPLA_FLASHMLA_SO naming a built flash_mla_dense.so) agreement with FlashMLA at g=1.

Every test skips, saying why, without torch, without a CUDA device or in a build without
the cargo feature `cuda` (the FP8 decode tests also on a GPU other than Hopper); one test
checks the clear error of a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

import tpla
from reference import (Pool, append_rows, decode_fp8_rows, decode_ref, fp8_row_bytes,
                       from_bf16_bits, rel_l2)

try:
    import torch
except ImportError:  # pragma: no cover - depends on the machine
    torch = None

HEADS, D_C, D_R, D_N, D_V = 64, 512, 64, 64, 64
PAGE = 64


def _why_not() -> str | None:
    if not tpla.cuda_enabled():
        return "this tpla build has no CUDA support (cargo feature `cuda` off)"
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


WHY = _why_not()
if WHY is not None:
    print(f"test_cuda.py: GPU tests skipped: {WHY}", file=sys.stderr)
needs_gpu = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def _why_not_fp8_decode() -> str | None:
    if WHY is not None:
        return WHY
    if torch.cuda.get_device_capability() != (9, 0):
        return "FP8 pools decode on the Hopper kernel only (compute capability 9.0)"
    return None


WHY_FP8 = _why_not_fp8_decode()
needs_fp8_decode = pytest.mark.skipif(WHY_FP8 is not None, reason=WHY_FP8 or "")


def test_no_gpu_is_a_clear_error():
    if WHY is None:
        pytest.skip("a GPU is present: the GPU tests below run instead")
    rng = np.random.default_rng(0)
    ctx = make_context(rng, layers=1)
    try:
        tpla.DeviceEngine(ctx)
    except NotImplementedError as e:
        assert isinstance(e, tpla.UnsupportedError)
        assert e.status == "TPLA_STATUS_UNSUPPORTED" and e.message
        print(f"DeviceEngine without a GPU: {e}")
    else:
        pytest.skip("a DeviceEngine could be made (a GPU without torch)")


def test_an_unknown_kv_dtype_is_refused_before_a_gpu_is_looked_for():
    if not tpla.cuda_enabled():
        pytest.skip("this tpla build has no CUDA support (cargo feature `cuda` off)")
    ctx = make_context(np.random.default_rng(0), layers=1)
    with pytest.raises(tpla.InvalidArgumentError, match="element type 'int8'"):
        tpla.DeviceEngine(ctx, kv_dtype="int8")


# ---- helpers -------------------------------------------------------------------------


def make_context(rng, groups=4, group=None, layers=2, scale=None, identity=False):
    dims = tpla.ModelDims(HEADS, D_C, D_R, D_N, D_V,
                          scale if scale is not None else 1.0 / np.sqrt(128.0))
    plan = tpla.ShardPlan(dims, groups, groups - 1 if group is None else group)
    ctx = tpla.RankContext(dims, plan, layers, threads=2)
    w = plan.slice_width
    for layer in range(layers):
        t = (tpla.Transform.identity(D_C) if identity or layer % 2 else
             tpla.Transform.hadamard(D_C, seed=3 + layer))
        wk = (0.1 * rng.standard_normal((HEADS, w, D_N))).astype(np.float32)
        wv = (0.1 * rng.standard_normal((HEADS, w, D_V))).astype(np.float32)
        ctx.install_layer(layer, wk, wv, t, mu=1.0 if identity else 1.0 + 0.1 * layer)
    return ctx


_ENGINES: dict = {}


def engine_for(groups=4, identity=False, scale=None, kv_dtype="bfloat16"):
    """(context, engine), made once per configuration (kernel compilation is slow)."""
    key = (groups, identity, scale, kv_dtype)
    if key not in _ENGINES:
        ctx = make_context(np.random.default_rng(100 + groups), groups=groups,
                           identity=identity, scale=scale)
        _ENGINES[key] = (ctx, tpla.DeviceEngine(ctx, 0, kv_dtype=kv_dtype))
    return _ENGINES[key]


def bits_to_cuda(bits: np.ndarray):
    """bf16 bits (uint16) -> a bfloat16 CUDA tensor of the same shape."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(
        torch.bfloat16).cuda()


def cuda_to_bits(t) -> np.ndarray:
    return t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)


def scaled_rows(engine, q, layer):
    """Query rows as the device decode reads them (latent part * softmax_scale * mu, RoPE
    part * softmax_scale)."""
    lat, rope = engine.query_scales(layer)
    w = engine.slice_width
    s = torch.full((engine.row_width,), rope, dtype=torch.float32, device=q.device)
    s[:w] = lat
    return (q * s).contiguous()


def table_with_padding(pool, seqs, width):
    t = pool.table(seqs, width)
    t[t >= len(pool.kv)] = -1
    return t


class HostRows:
    """decode_ref's view of a device pool copied back (bf16 bits, or FP8 bytes of a latent
    slice of `fp8_width` values: dequantised)."""

    def __init__(self, bits, pages_of, fp8_width=None):
        self.bits, self.pages_of, self.fp8_width = bits, pages_of, fp8_width

    def rows(self, seq, length):
        pages = self.pages_of[seq]
        if length == 0:
            return np.zeros((0, self.bits.shape[-1]))
        r = np.concatenate([self.bits[p, :, 0] for p in pages])[:length]
        if self.fp8_width is not None:
            return decode_fp8_rows(r, self.fp8_width, D_R)
        return from_bf16_bits(r).astype(np.float64)


def check_outputs(out, lse, ro, rl, tol=1e-2):
    out = out.detach().cpu().numpy().astype(np.float64)
    lse = lse.detach().cpu().numpy().astype(np.float64).reshape(rl.shape)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert rel_l2(out, ro) < tol, rel_l2(out, ro)
    finite = np.isfinite(rl)
    assert np.array_equal(np.isfinite(lse), finite)
    assert np.allclose(lse[finite], rl[finite], atol=2e-2, rtol=1e-3)


# ---- decode --------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("seed", [1, 2])
def test_decode_on_shuffled_pool_of_mixed_lengths(seed):
    rng = np.random.default_rng(seed)
    ctx, engine = engine_for()
    w, rw = engine.slice_width, engine.row_width
    lens = [0, 1, 63, 64, 65, 4096, int(rng.integers(100, 2000))]
    rng.shuffle(lens)
    pages = sum(-(-n // PAGE) for n in lens) + 9
    pool = Pool(rng, rw, PAGE, pages, "bfloat16")
    seqs = list(range(len(lens)))
    for s, n in zip(seqs, lens):
        pool.add(s, n)
    width = max(-(-n // PAGE) for n in lens) + 1
    table_np = table_with_padding(pool, seqs, width)
    kv = bits_to_cuda(pool.backing)
    table = torch.from_numpy(table_np).cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    b = len(lens)
    plan = tpla.decode_plan(seqlens, engine, block_table_width=width)
    assert isinstance(plan, tpla.DevicePlan) and plan.batch == b
    assert plan.workspace_bytes == engine.workspace_bytes(b, width)
    cpu_plan = tpla.decode_plan(seqlens.cpu(), ctx)
    for layer in range(engine.layers):
        q = torch.randn(b, 1, HEADS, rw, device="cuda")
        rows = scaled_rows(engine, q, layer)
        out = torch.full((b, 1, HEADS, w), float("nan"), device="cuda")
        lse = torch.full((b, HEADS, 1), float("nan"), device="cuda")
        o, l = tpla.decode(rows, kv, table, seqlens, plan, layer=layer, out=out, lse=lse)
        assert o is out and l is lse
        torch.cuda.synchronize()
        ro, rl = decode_ref(pool, seqs, lens, q.cpu().numpy(), w, ctx.dims.softmax_scale,
                            ctx.mu(layer))
        check_outputs(out, lse, ro, rl)
        # the empty entry: zeros and -inf
        e = lens.index(0)
        assert torch.all(out[e] == 0) and torch.all(torch.isinf(lse[e]))
        # the same step through the engine method, outputs allocated: the same bits
        o2, l2 = engine.decode(rows, kv, table, seqlens, plan, layer=layer)
        assert o2.shape == (b, 1, HEADS, w) and l2.shape == (b, HEADS, 1)
        assert torch.equal(o2, out) and torch.equal(l2, lse)
        # on an explicitly named stream (torch's current one)
        o3, _ = engine.decode(rows, kv, table, seqlens, plan, layer=layer,
                              stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert torch.equal(o3, out)
        # and the CPU backend on the same pool and queries
        oc, lc = tpla.decode(q.cpu().numpy(), pool.kv, table_np, np.array(lens, np.int32),
                             cpu_plan, layer=layer, kv_dtype="bfloat16")
        assert rel_l2(out.cpu().numpy(), oc) < 1e-2


@needs_gpu
def test_absorbed_queries_and_projection_match_the_cpu_context():
    rng = np.random.default_rng(5)
    ctx, engine = engine_for()
    rw = engine.row_width
    lens = [70, 1, 300]
    pool = Pool(rng, rw, PAGE, 20, "bfloat16")
    for s, n in enumerate(lens):
        pool.add(s, n)
    width = 6
    table_np = table_with_padding(pool, [0, 1, 2], width)
    kv, table = bits_to_cuda(pool.backing), torch.from_numpy(table_np).cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    plan = tpla.decode_plan(seqlens, engine, block_table_width=width)
    q_nope = torch.randn(3, 1, HEADS, D_N, device="cuda")
    q_pe = torch.randn(3, 1, HEADS, D_R, device="cuda")
    heads, none = tpla.decode(q_nope, kv, table, seqlens, plan, layer=1, q_rope=q_pe,
                              absorb=True, project=True)
    assert none is None and heads.shape == (3, 1, HEADS, D_V)
    cpu_plan = tpla.decode_plan(seqlens.cpu(), ctx)
    hc, _ = tpla.decode(q_nope.cpu().numpy(), pool.kv, table_np, seqlens.cpu().numpy(),
                        cpu_plan, layer=1, q_rope=q_pe.cpu().numpy(), absorb=True,
                        project=True, kv_dtype="bfloat16")
    torch.cuda.synchronize()
    assert rel_l2(heads.cpu().numpy(), hc) < 1e-2
    rows = engine.absorb_queries(q_nope, q_pe, layer=1)
    assert rows.shape == (3, 1, HEADS, rw)
    latent, _ = engine.decode(rows, kv, table, seqlens, plan, layer=1)
    f32_heads = engine.project(latent, layer=1)
    assert torch.allclose(f32_heads, heads, rtol=1e-4, atol=1e-5)
    # bfloat16 head outputs: the float32 ones rounded to nearest even, bit for bit (a
    # batch this small is one cuBLAS product, the float32 call's)
    bf = torch.empty(3, 1, HEADS, D_V, dtype=torch.bfloat16, device="cuda")
    assert engine.project(latent, layer=1, out=bf) is bf
    h16, _ = tpla.decode(q_nope, kv, table, seqlens, plan, layer=1, q_rope=q_pe, absorb=True,
                         project=True, out=torch.empty_like(bf))
    torch.cuda.synchronize()
    assert torch.equal(bf, f32_heads.to(torch.bfloat16))
    assert torch.equal(h16, heads.to(torch.bfloat16))
    with pytest.raises(tpla.InvalidArgumentError, match="float32 or bfloat16"):
        engine.project(latent, layer=1, out=bf.half())


# ---- append --------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_append_then_decode(dtype):
    rng = np.random.default_rng(11)
    ctx, engine = engine_for()
    w, rw, start = engine.slice_width, engine.row_width, ctx.plan.slice_start
    pages = 16
    kv = torch.zeros(pages, PAGE, 1, rw, dtype=torch.bfloat16, device="cuda")
    order = list(rng.permutation(pages))
    lens = [1, 70, 130]
    pages_of = {s: [int(order.pop()) for _ in range(-(-n // PAGE))] for s, n in enumerate(lens)}
    slots = np.array([pages_of[s][t // PAGE] * PAGE + t % PAGE
                      for s, n in enumerate(lens) for t in range(n)], np.int32)
    n = len(slots)
    lat = (rng.standard_normal((n, D_C)) * (1 + np.arange(D_C) % 5)).astype(np.float32)
    kr = rng.standard_normal((n, D_R)).astype(np.float32)
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    lat_t, kr_t = torch.from_numpy(lat).cuda().to(tdt), torch.from_numpy(kr).cuda().to(tdt)
    lat_in, kr_in = lat_t.float().cpu().numpy(), kr_t.float().cpu().numpy()
    faults = torch.zeros(1, dtype=torch.int32, device="cuda")
    for layer in range(engine.layers):
        kv.zero_()
        # a skipped slot (-1) and one past the pool (BAD_SLOT) ride along
        sl = np.concatenate([slots, [-1, pages * PAGE + 5]]).astype(np.int32)
        la = torch.cat([lat_t, lat_t[:2]])
        ka = torch.cat([kr_t, kr_t[:2]])
        r = tpla.append(la, ka, kv, torch.from_numpy(sl).cuda(), context=engine, layer=layer,
                        faults=faults)
        assert r is None
        torch.cuda.synchronize()
        assert int(faults.item()) & tpla.Faults.BAD_SLOT
        faults.zero_()
        bits = cuda_to_bits(kv)
        got = from_bf16_bits(bits.reshape(-1, rw)[slots]).astype(np.float64)
        want = append_rows(lat_in, kr_in, ctx.transform(layer).matrix(), start, w)
        assert rel_l2(got, want) < 1e-2
        written = np.zeros(pages * PAGE, bool)
        written[slots] = True
        assert not bits.reshape(-1, rw)[~written].any()
        # the CPU append of the same tokens: the same rows to bf16 rounding
        host = np.zeros((pages, PAGE, 1, rw), np.uint16)
        ctx.append(lat_in, kr_in, host, slots, layer=layer, kv_dtype="bfloat16")
        cpu = from_bf16_bits(host.reshape(-1, rw)[slots]).astype(np.float64)
        assert rel_l2(got, cpu) < 1e-2
        # decode what was appended
        width = 3
        table = np.full((3, width), -1, np.int32)
        for s in range(3):
            table[s, : len(pages_of[s])] = pages_of[s]
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        plan = engine.plan(seqlens, width)
        q = torch.randn(3, 1, HEADS, rw, device="cuda")
        out, lse = engine.decode(scaled_rows(engine, q, layer), kv, torch.from_numpy(table).cuda(),
                                 seqlens, plan, layer=layer)
        torch.cuda.synchronize()
        ro, rl = decode_ref(HostRows(bits, pages_of), [0, 1, 2], lens, q.cpu().numpy(), w,
                            ctx.dims.softmax_scale, ctx.mu(layer))
        check_outputs(out, lse, ro, rl)


@needs_gpu
def test_copy_rows_hands_a_prefill_over():
    rng = np.random.default_rng(13)
    _, engine = engine_for()
    rw = engine.row_width
    src = torch.randn(3, PAGE, 1, rw, device="cuda").to(torch.bfloat16)  # a packed prefill
    dst = torch.zeros(10, PAGE, 1, rw, dtype=torch.bfloat16, device="cuda")
    n = 150
    pages = rng.permutation(10)[:3]
    dst_np = np.array([pages[t // PAGE] * PAGE + t % PAGE for t in range(n)], np.int32)
    dst_np[7] = -1  # skipped
    faults = torch.zeros(1, dtype=torch.int32, device="cuda")
    engine.copy_rows(dst, torch.from_numpy(dst_np).cuda(), src,
                     torch.arange(n, dtype=torch.int32, device="cuda"), faults=faults)
    torch.cuda.synchronize()
    assert int(faults.item()) == 0
    keep = dst_np >= 0
    d = dst.view(-1, rw).view(torch.int16).cpu().numpy()
    s = src.view(-1, rw).view(torch.int16).cpu().numpy()
    assert np.array_equal(d[dst_np[keep]], s[:n][keep])
    written = np.zeros(len(d), bool)
    written[dst_np[keep]] = True
    assert not d[~written].any()
    one = torch.zeros(1, dtype=torch.int32, device="cuda")
    engine.copy_rows(dst, torch.full((1,), 10 * PAGE, dtype=torch.int32, device="cuda"), src,
                     one, faults=faults)
    torch.cuda.synchronize()
    assert int(faults.item()) & tpla.Faults.BAD_SLOT


# ---- CUDA graphs ---------------------------------------------------------------------


@needs_gpu
def test_graph_capture_replayed_with_new_tokens():
    rng = np.random.default_rng(21)
    ctx, engine = engine_for()
    w, rw, start = engine.slice_width, engine.row_width, ctx.plan.slice_start
    steps, lens = 4, [10, 64, 127, 1]
    b = len(lens)
    width = -(-(max(lens) + steps) // PAGE) + 1
    pages = b * width + 3
    order = list(rng.permutation(pages))
    pages_of = {s: [int(order.pop()) for _ in range(width)] for s in range(b)}
    table_np = np.array([pages_of[s] for s in range(b)], np.int32)
    kv = torch.zeros(pages, PAGE, 1, rw, dtype=torch.bfloat16, device="cuda")
    # prefill: every sequence's first tokens, outside the graph
    pre = [(s, t) for s in range(b) for t in range(lens[s])]
    pre_slots = torch.tensor([pages_of[s][t // PAGE] * PAGE + t % PAGE for s, t in pre],
                             dtype=torch.int32, device="cuda")
    engine.append(torch.randn(len(pre), D_C, device="cuda"),
                  torch.randn(len(pre), D_R, device="cuda"), kv, pre_slots)
    # static buffers of the captured step
    table = torch.from_numpy(table_np).cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    lat = torch.zeros(b, D_C, device="cuda")
    kr = torch.zeros(b, D_R, device="cuda")
    slots = torch.full((b,), -1, dtype=torch.int32, device="cuda")
    rows = torch.zeros(b, 1, HEADS, rw, device="cuda")
    out = torch.zeros(b, 1, HEADS, w, device="cuda")
    lse = torch.zeros(b, HEADS, 1, device="cuda")
    workspace = torch.empty(engine.workspace_bytes(b, width), dtype=torch.uint8, device="cuda")
    faults = torch.zeros(1, dtype=torch.int32, device="cuda")

    def step():
        plan = tpla.decode_plan(seqlens, engine, block_table_width=width, workspace=workspace)
        tpla.append(lat, kr, kv, slots, context=engine, layer=0, faults=faults)
        tpla.decode(rows, kv, table, seqlens, plan, layer=0, out=out, lse=lse, faults=faults)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up, slots all -1: writes nothing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    host_lens = list(lens)
    for _ in range(steps):
        new_lat = torch.randn(b, D_C, device="cuda")
        new_kr = torch.randn(b, D_R, device="cuda")
        new_slots = [pages_of[s][host_lens[s] // PAGE] * PAGE + host_lens[s] % PAGE
                     for s in range(b)]
        host_lens = [n + 1 for n in host_lens]
        q = torch.randn(b, 1, HEADS, rw, device="cuda")
        lat.copy_(new_lat)
        kr.copy_(new_kr)
        slots.copy_(torch.tensor(new_slots, dtype=torch.int32))
        seqlens.copy_(torch.tensor(host_lens, dtype=torch.int32))
        rows.copy_(scaled_rows(engine, q, 0))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert int(faults.item()) == 0
        bits = cuda_to_bits(kv)
        got = from_bf16_bits(bits.reshape(-1, rw)[new_slots]).astype(np.float64)
        want = append_rows(new_lat.cpu().numpy(), new_kr.cpu().numpy(),
                           ctx.transform(0).matrix(), start, w)
        assert rel_l2(got, want) < 1e-2
        ro, rl = decode_ref(HostRows(bits, pages_of), list(range(b)), host_lens,
                            q.cpu().numpy(), w, ctx.dims.softmax_scale, ctx.mu(0))
        check_outputs(out, lse, ro, rl)


# ---- bad inputs ----------------------------------------------------------------------


@needs_gpu
def test_bad_inputs_raise_the_right_errors():
    rng = np.random.default_rng(3)
    ctx, engine = engine_for()
    w, rw = engine.slice_width, engine.row_width
    pool = Pool(rng, rw, PAGE, 8, "bfloat16")
    pool.add(0, 100)
    pool.add(1, 5)
    kv = bits_to_cuda(pool.backing)
    table = torch.from_numpy(table_with_padding(pool, [0, 1], 3)).cuda()
    seqlens = torch.tensor([100, 5], dtype=torch.int32, device="cuda")
    plan = tpla.decode_plan(seqlens, engine, block_table_width=3)
    q = torch.randn(2, 1, HEADS, rw, device="cuda")

    def expect(exc, status, pattern, *args, **kw):
        with pytest.raises(exc, match=pattern) as e:
            tpla.decode(*args, **kw)
        assert isinstance(e.value, tpla.TplaError) and e.value.status == status
        return e.value

    inv, uns, mis = ("TPLA_STATUS_INVALID_ARGUMENT", "TPLA_STATUS_UNSUPPORTED",
                     "TPLA_STATUS_MISMATCH")
    # a CPU tensor where a CUDA one is expected
    expect(ValueError, inv, "host memory", q.cpu(), kv, table, seqlens, plan)
    expect(ValueError, inv, "host memory", q, kv, table.cpu(), seqlens, plan)
    expect(ValueError, inv, "host memory", q, kv, table, seqlens.cpu().numpy(), plan)
    # wrong dtypes
    expect(ValueError, inv, "float32", q.double(), kv, table, seqlens, plan)
    expect(ValueError, inv, "float32", q.bfloat16(), kv, table, seqlens, plan)
    expect(NotImplementedError, uns, "bfloat16", q, kv.float(), table, seqlens, plan)
    expect(ValueError, inv, "int32", q, kv, table.long(), seqlens, plan)
    expect(ValueError, inv, "int32", q, kv, table, seqlens.long(), plan)
    # shapes, strides, the plan
    expect(ValueError, inv, "shape", q[:, :, :8].contiguous(), kv, table, seqlens, plan)
    expect(ValueError, inv, "C-contiguous",
           q.transpose(0, 2).contiguous().transpose(0, 2), kv, table, seqlens, plan)
    expect(ValueError, inv, "shape", q[:1].contiguous(), kv, table[:1], seqlens, plan)
    expect(ValueError, inv, "plan again", q[:1].contiguous(), kv, table[:1].contiguous(),
           seqlens[:1].contiguous(), plan)
    expect(ValueError, inv, "plan again", q, kv, torch.zeros(2, 4, dtype=torch.int32,
                                                              device="cuda"), seqlens, plan)
    expect(NotImplementedError, uns, "scale", q, kv, table, seqlens, plan, 0.1)
    inside_q = q.view(-1)[: 2 * HEADS * w].view(2, 1, HEADS, w)
    expect(ValueError, inv, "overlaps", q, kv, table, seqlens, plan, out=inside_q)
    with pytest.raises(IndexError):
        tpla.decode(q, kv, table, seqlens, plan, layer=engine.layers)
    cpu_plan = tpla.decode_plan(seqlens.cpu(), ctx)
    with pytest.raises(ValueError, match="GPU arguments"):
        tpla.decode(q.cpu().numpy(), pool.kv, table.cpu().numpy(), seqlens.cpu().numpy(),
                    cpu_plan, stream=0, kv_dtype="bfloat16")
    # a CUDA tensor handed to the CPU path
    with pytest.raises(NotImplementedError, match="CUDA tensor"):
        tpla.decode(q, pool.kv, table.cpu(), seqlens.cpu(), cpu_plan, kv_dtype="bfloat16")
    # append: int64 slots, mixed dtypes, host slots
    lat, kr = torch.randn(2, D_C, device="cuda"), torch.randn(2, D_R, device="cuda")
    sl = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="int32"):
        engine.append(lat, kr, kv, sl.long())
    with pytest.raises(ValueError, match="dtype"):
        engine.append(lat, kr.bfloat16(), kv, sl)
    with pytest.raises(ValueError, match="host memory"):
        engine.append(lat, kr, kv, sl.cpu())
    # the wrong device
    if torch.cuda.device_count() < 2:
        return
    e = expect(ValueError, mis, "cuda:1", q.to("cuda:1"), kv, table, seqlens, plan)
    assert isinstance(e, tpla.MismatchError)
    with pytest.raises(tpla.MismatchError):
        engine.append(lat, kr, kv.to("cuda:1"), sl)


# ---- FP8 pools -----------------------------------------------------------------------


def fp8_append_case(rng, pages, lens):
    """Shuffled pages for sequences of `lens`, their slots in token order, and their
    tokens' pre-norm latents and RoPE keys (float32)."""
    order = list(rng.permutation(pages))
    pages_of = {s: [int(order.pop()) for _ in range(-(-n // PAGE))] for s, n in enumerate(lens)}
    slots = np.array([pages_of[s][t // PAGE] * PAGE + t % PAGE
                      for s, n in enumerate(lens) for t in range(n)], np.int32)
    lat = (rng.standard_normal((len(slots), D_C)) * (1 + np.arange(D_C) % 5)).astype(np.float32)
    kr = rng.standard_normal((len(slots), D_R)).astype(np.float32)
    return pages_of, slots, lat, kr


def check_fp8_rows_equal_the_cpu_append(dev, host, slots, w):
    """Device FP8 rows against the CPU's append of the same tokens: the RoPE keys equal
    byte for byte; codes and scales equal but for a few (the order of the RMS sums moves
    a value in its last bits, so a code may land one e4m3 step away)."""
    d, c = dev.reshape(-1, dev.shape[-1])[slots], host.reshape(-1, host.shape[-1])[slots]
    rope = w + 4 * -(-w // 128)
    assert np.array_equal(d[:, rope:], c[:, rope:])
    differ = int(np.count_nonzero(d[:, :rope] != c[:, :rope]))
    assert differ * 1000 <= max(d[:, :rope].size, 1000), differ


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_appends_and_row_copies_on_any_gpu(dtype):
    # a bfloat16 engine writes and copies FP8 rows (no FP8 decode kernels needed); the
    # uint8 pools must then be named with kv_dtype
    rng = np.random.default_rng(43)
    ctx, engine = engine_for()
    w, start = engine.slice_width, ctx.plan.slice_start
    rb = fp8_row_bytes(w, D_R)
    pages = 12
    pages_of, slots, lat, kr = fp8_append_case(rng, pages, [1, 70, 130])
    tdt = torch.float32 if dtype == "float32" else torch.bfloat16
    lat_t, kr_t = torch.from_numpy(lat).cuda().to(tdt), torch.from_numpy(kr).cuda().to(tdt)
    lat_in, kr_in = lat_t.float().cpu().numpy(), kr_t.float().cpu().numpy()
    kv = torch.zeros(pages, PAGE, 1, rb, dtype=torch.uint8, device="cuda")
    faults = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(tpla.InvalidArgumentError, match="kv_dtype='fp8_e4m3'"):
        tpla.append(lat_t, kr_t, kv, torch.from_numpy(slots).cuda(), context=engine)
    for layer in range(engine.layers):
        kv.zero_()
        # a skipped slot (-1) and one past the pool (BAD_SLOT) ride along
        sl = np.concatenate([slots, [-1, pages * PAGE + 5]]).astype(np.int32)
        tpla.append(torch.cat([lat_t, lat_t[:2]]), torch.cat([kr_t, kr_t[:2]]), kv,
                    torch.from_numpy(sl).cuda(), context=engine, layer=layer,
                    kv_dtype="fp8_e4m3", faults=faults)
        torch.cuda.synchronize()
        assert int(faults.item()) == tpla.Faults.BAD_SLOT
        faults.zero_()
        dev = kv.cpu().numpy()
        # the stored rows: the appended ones, to e4m3's precision (3 mantissa bits)
        got = decode_fp8_rows(dev.reshape(-1, rb)[slots], w, D_R)
        want = append_rows(lat_in, kr_in, ctx.transform(layer).matrix(), start, w)
        assert rel_l2(got[:, :w], want[:, :w]) < 4e-2
        assert rel_l2(got[:, w:], want[:, w:]) < 4e-3  # the key in bfloat16
        written = np.zeros(pages * PAGE, bool)
        written[slots] = True
        assert not dev.reshape(-1, rb)[~written].any()
        host = np.zeros((pages, PAGE, 1, rb), np.uint8)
        assert ctx.append(lat_in, kr_in, host, slots, layer=layer, kv_dtype="fp8_e4m3") == 0
        check_fp8_rows_equal_the_cpu_append(dev, host, slots, w)
    # the rows handed over into another pool (padded pages: 4 rows keep the page stride
    # a multiple of 16 bytes), byte for byte
    backing = torch.full((pages, PAGE + 4, 1, rb), 0x7F, dtype=torch.uint8, device="cuda")
    dst = backing[:, :PAGE]
    dst_np = rng.permutation(pages * PAGE)[: len(slots)].astype(np.int32)
    dst_np[5] = -1  # skipped
    engine.copy_rows(dst, torch.from_numpy(dst_np).cuda(), kv, torch.from_numpy(slots).cuda(),
                     kv_dtype="fp8_e4m3", faults=faults)
    torch.cuda.synchronize()
    assert int(faults.item()) == 0
    keep = dst_np >= 0
    got = dst.cpu().numpy().reshape(-1, rb)
    assert np.array_equal(got[dst_np[keep]], kv.cpu().numpy().reshape(-1, rb)[slots[keep]])
    untouched = np.ones(pages * PAGE, bool)
    untouched[dst_np[keep]] = False
    assert (got[untouched] == 0x7F).all()
    assert (backing[:, PAGE:].cpu().numpy() == 0x7F).all()
    # pools of two row types: the bytes cannot be copied
    bf16_pool = torch.zeros(pages, PAGE, 1, engine.row_width, dtype=torch.bfloat16,
                            device="cuda")
    with pytest.raises(tpla.InvalidArgumentError, match="fp8_e4m3"):
        engine.copy_rows(bf16_pool, torch.from_numpy(dst_np).cuda(), kv,
                         torch.from_numpy(slots).cuda(), kv_dtype="fp8_e4m3")


@needs_fp8_decode
def test_fp8_engine_appends_and_decodes_as_the_reference_and_the_cpu():
    rng = np.random.default_rng(47)
    ctx, engine = engine_for(kv_dtype="fp8_e4m3")
    assert engine.kv_dtype == "fp8_e4m3" and "fp8_e4m3" in repr(engine)
    w, rw, start = engine.slice_width, engine.row_width, ctx.plan.slice_start
    rb = fp8_row_bytes(w, D_R)
    pages = 20
    lens = [1, 64, 65, 300, 0]
    pages_of, slots, lat, kr = fp8_append_case(rng, pages, lens)
    b = len(lens)
    width = max(len(p) for p in pages_of.values()) + 1
    table_np = np.full((b, width), -1, np.int32)
    for s in range(b):
        table_np[s, : len(pages_of[s])] = pages_of[s]
    table = torch.from_numpy(table_np).cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    plan = tpla.decode_plan(seqlens, engine, block_table_width=width)
    assert plan.workspace_bytes == engine.workspace_bytes(b, width)
    cpu_plan = tpla.decode_plan(seqlens.cpu(), ctx)
    kv = torch.zeros(pages, PAGE, 1, rb, dtype=torch.uint8, device="cuda")
    for layer in range(engine.layers):
        kv.zero_()
        # the engine's own uint8 pools need no kv_dtype
        engine.append(torch.from_numpy(lat).cuda(), torch.from_numpy(kr).cuda(), kv,
                      torch.from_numpy(slots).cuda(), layer=layer)
        torch.cuda.synchronize()
        dev = kv.cpu().numpy()
        host = np.zeros((pages, PAGE, 1, rb), np.uint8)
        assert ctx.append(lat, kr, host, slots, layer=layer, kv_dtype="fp8_e4m3") == 0
        check_fp8_rows_equal_the_cpu_append(dev, host, slots, w)
        # decode: the f64 reference over the dequantised rows, and the CPU's FP8 decode
        q = torch.randn(b, 1, HEADS, rw, device="cuda")
        out, lse = tpla.decode(scaled_rows(engine, q, layer), kv, table, seqlens, plan,
                               layer=layer, kv_dtype="fp8_e4m3")
        torch.cuda.synchronize()
        ro, rl = decode_ref(HostRows(dev, pages_of, fp8_width=w), list(range(b)), lens,
                            q.cpu().numpy(), w, ctx.dims.softmax_scale, ctx.mu(layer))
        check_outputs(out, lse, ro, rl)
        e = lens.index(0)
        assert torch.all(out[e] == 0) and torch.all(torch.isinf(lse[e]))
        oc, _ = tpla.decode(q.cpu().numpy(), dev, table_np, np.array(lens, np.int32), cpu_plan,
                            layer=layer, kv_dtype="fp8_e4m3")
        assert rel_l2(out.cpu().numpy(), oc) < 1e-2
        # what an engine has in hand: q_nope and q_rope in, partial head outputs out
        q_nope = torch.randn(b, 1, HEADS, D_N, device="cuda")
        q_pe = torch.randn(b, 1, HEADS, D_R, device="cuda")
        heads, _ = tpla.decode(q_nope, kv, table, seqlens, plan, layer=layer, q_rope=q_pe,
                               absorb=True, project=True)
        hc, _ = tpla.decode(q_nope.cpu().numpy(), dev, table_np, np.array(lens, np.int32),
                            cpu_plan, layer=layer, q_rope=q_pe.cpu().numpy(), absorb=True,
                            project=True, kv_dtype="fp8_e4m3")
        torch.cuda.synchronize()
        assert rel_l2(heads.cpu().numpy(), hc) < 1e-2
    # a bfloat16 pool is not what this engine decodes
    bf16_pool = torch.zeros(pages, PAGE, 1, rw, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(tpla.MismatchError, match="fp8_e4m3"):
        engine.decode(scaled_rows(engine, q, 0), bf16_pool, table, seqlens, plan)


@needs_gpu
def test_fp8_bad_inputs_raise_the_right_errors():
    rng = np.random.default_rng(53)
    ctx, engine = engine_for()
    w, rw = engine.slice_width, engine.row_width
    rb = fp8_row_bytes(w, D_R)
    # the engine's row type: one of the two the kernels read, by its name
    with pytest.raises(tpla.UnsupportedError, match="f16"):
        tpla.DeviceEngine(ctx, 0, kv_dtype="float16")
    if WHY_FP8 is not None:
        with pytest.raises(tpla.UnsupportedError, match="Hopper"):
            tpla.DeviceEngine(ctx, 0, kv_dtype="fp8_e4m3")
    pool = Pool(rng, rw, PAGE, 4, "bfloat16")
    pool.add(0, 100)
    table = torch.from_numpy(table_with_padding(pool, [0], 3)).cuda()
    seqlens = torch.tensor([100], dtype=torch.int32, device="cuda")
    plan = engine.plan(seqlens, 3)
    q = torch.randn(1, 1, HEADS, rw, device="cuda")
    kv8 = torch.zeros(4, PAGE, 1, rb, dtype=torch.uint8, device="cuda")
    # uint8 pools given to a bfloat16 engine: named, then refused by its decode
    with pytest.raises(tpla.InvalidArgumentError, match="kv_dtype='fp8_e4m3'"):
        engine.decode(q, kv8, table, seqlens, plan)
    with pytest.raises(tpla.MismatchError, match="fp8_e4m3"):
        engine.decode(q, kv8, table, seqlens, plan, kv_dtype="fp8_e4m3")
    with pytest.raises(tpla.MismatchError, match="fp8_e4m3"):
        tpla.decode(q, kv8, table, seqlens, plan, kv_dtype="fp8_e4m3")
    # rows of another size, a dtype that is not the pool's
    lat, kr = torch.randn(1, D_C, device="cuda"), torch.randn(1, D_R, device="cuda")
    sl = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(tpla.InvalidArgumentError, match="bytes"):
        engine.append(lat, kr, kv8[..., :-4], sl, kv_dtype="fp8_e4m3")
    with pytest.raises(tpla.InvalidArgumentError, match="cannot be read"):
        engine.append(lat, kr, kv8, sl, kv_dtype="bfloat16")
    with pytest.raises(tpla.InvalidArgumentError, match="cannot be read"):
        engine.append(lat, kr, bits_to_cuda(pool.backing), sl, kv_dtype="fp8_e4m3")
    with pytest.raises(tpla.InvalidArgumentError, match="shape"):
        engine.append(lat, kr, kv8.view(4, PAGE, rb // 4, 4), sl, kv_dtype="fp8_e4m3")


# ---- FlashMLA ------------------------------------------------------------------------


def load_flashmla():
    path = os.environ.get("TPLA_FLASHMLA_SO")
    if not path:
        pytest.skip("TPLA_FLASHMLA_SO does not name a built flash_mla_dense.so")
    if not os.path.exists(path):
        pytest.skip(f"TPLA_FLASHMLA_SO={path} does not exist")
    spec = importlib.util.spec_from_file_location("flash_mla_dense", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_gpu
def test_g1_agrees_with_flashmla():
    fm = load_flashmla()
    rng = np.random.default_rng(31)
    scale = 576 ** -0.5
    ctx, engine = engine_for(groups=1, identity=True, scale=scale)
    assert engine.row_width == 576 and engine.slice_width == 512
    lat, rope = engine.query_scales(0)
    assert np.isclose(lat, scale) and np.isclose(rope, scale)
    lens = [1, 65, 1000, 4096, 777]
    pool = Pool(rng, 576, PAGE, sum(-(-n // PAGE) for n in lens) + 5, "bfloat16")
    for s, n in enumerate(lens):
        pool.add(s, n)
    width = max(-(-n // PAGE) for n in lens)
    table_np = pool.table(list(range(len(lens))), width)
    table_np[table_np >= len(pool.kv)] = 0  # FlashMLA may read padding entries
    kv = bits_to_cuda(pool.backing)
    table = torch.from_numpy(table_np).cuda()
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    b = len(lens)
    q = torch.randn(b, 1, HEADS, 576, device="cuda").bfloat16()
    fo, fl, _, _ = fm.dense_decode_fwd(q, kv, 512, seqlens, table, scale, False, None, None)
    plan = tpla.decode_plan(seqlens, engine, block_table_width=width)
    out, lse = tpla.decode((q.float() * scale).contiguous(), kv, table, seqlens, plan)
    torch.cuda.synchronize()
    err = rel_l2(out.cpu().numpy(), fo.float().reshape(b, 1, HEADS, 512).cpu().numpy())
    print(f"libtpla g=1 vs FlashMLA: rel L2 {err:.3e}")
    assert err < 1e-2
    assert torch.allclose(lse.reshape(b, HEADS), fl.float().reshape(b, HEADS), atol=2e-2)


@needs_gpu
def test_sequence_merges_on_engine_buffers_match_the_cpu_merges():
    """DeviceEngine.sequence_* (the rank's merge steps between the engine's own
    collectives) against the CPU merges on the same random outputs of three shards; (b)
    unpacked from the packs summed on the host equals (a)'s sum; a bound far below an lse
    sets the error word, which sequence_merge_error raises."""
    rng = np.random.default_rng(17)
    ctx, engine = engine_for()
    w, rw = D_C // 4, engine.row_width
    shards, batch = 3, 2
    outs = [rng.standard_normal((batch, 1, HEADS, w)).astype(np.float32) for _ in range(shards)]
    lses = [(3 * rng.standard_normal((batch, 1, HEADS))).astype(np.float32)
            for _ in range(shards)]
    gathered = torch.from_numpy(np.stack(lses)).cuda()
    merged_a = np.zeros_like(outs[0])
    for shard in range(shards):
        want = outs[shard].copy()
        tpla.rescale_by_gathered_lse(want, shard, list(lses))
        got = torch.from_numpy(outs[shard]).cuda()
        engine.sequence_rescale(got, gathered, shard=shard)
        torch.cuda.synchronize()
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-6, atol=1e-7)
        merged_a += got.cpu().numpy()
    q = (0.1 * rng.standard_normal((batch, 1, HEADS, rw))).astype(np.float32)
    bound = engine.sequence_bounds(torch.from_numpy(q).cuda(), rope_key_norm=2.5)
    assert bound.dtype == torch.float64 and bound.shape == (batch, 1, HEADS)
    error = torch.zeros(1, dtype=torch.int32, device="cuda")
    summed = None
    for shard in range(shards):
        bound_np = bound.cpu().numpy()
        want = tpla.pack_against_bound(outs[shard], lses[shard], bound_np)
        got = engine.sequence_pack(torch.from_numpy(outs[shard]).cuda(),
                                   torch.from_numpy(lses[shard]).cuda(), bound, error=error)
        torch.cuda.synchronize()
        np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-12)
        summed = got if summed is None else summed + got
    merged_b = engine.sequence_unpack(summed, error=error)
    torch.cuda.synchronize()
    assert int(error.item()) == 0
    tpla.sequence_merge_error(0)
    np.testing.assert_allclose(merged_b.cpu().numpy(),
                               tpla.unpack_merged(summed.cpu().numpy()), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged_b.cpu().numpy(), merged_a, rtol=1e-5, atol=1e-6)
    low = bound.clone()
    low[0, 0, 5] = float(lses[0][0, 0, 5]) - 800.0
    engine.sequence_pack(torch.from_numpy(outs[0]).cuda(), torch.from_numpy(lses[0]).cuda(),
                         low, error=error)
    torch.cuda.synchronize()
    with pytest.raises(tpla.InvalidArgumentError, match="above its logit bound"):
        tpla.sequence_merge_error(int(error.item()))
    with pytest.raises(tpla.InvalidArgumentError, match="shape"):
        engine.sequence_rescale(torch.from_numpy(outs[0]).cuda(), gathered[:, :1], shard=0)
    with pytest.raises(tpla.InvalidArgumentError, match="shard 3 of"):
        engine.sequence_rescale(torch.from_numpy(outs[0]).cuda(), gathered, shard=3)
    with pytest.raises(tpla.InvalidArgumentError, match="int32"):
        engine.sequence_pack(torch.from_numpy(outs[0]).cuda(),
                             torch.from_numpy(lses[0]).cuda(), bound,
                             error=error.to(torch.float32))
