"""The tpla package on the CPU against the NumPy float64 reference (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

import tpla
from reference import Pool, append_rows, decode_fp8_rows, decode_ref, from_bf16_bits, rel_l2

TOL = {"float32": 2e-5, "float16": 2e-5, "bfloat16": 1e-2}


def make_context(rng, heads=4, d_c=64, d_r=16, d_n=16, d_v=8, groups=2, group=1,
                 layers=2, transform="hadamard", threads=2, backend="cpu"):
    dims = tpla.ModelDims(heads, d_c, d_r, d_n, d_v, 0.2)
    plan = tpla.ShardPlan(dims, groups, group)
    ctx = tpla.RankContext(dims, plan, layers, threads=threads, backend=backend)
    w = plan.slice_width
    weights = []
    for layer in range(layers):
        t = (tpla.Transform.hadamard(d_c, seed=layer) if transform == "hadamard"
             else tpla.Transform.identity(d_c))
        wk = rng.standard_normal((heads, w, d_n)).astype(np.float32)
        wv = rng.standard_normal((heads, w, d_v)).astype(np.float32)
        ctx.install_layer(layer, wk, wv, t, mu=1.0 + 0.1 * layer)
        weights.append((wk, wv, t))
    return ctx, weights


def engine(rng, ctx, lens, dtype="float32", page_size=16, pad_rows=0, extra_pages=7):
    pages = sum(-(-n // page_size) for n in lens) + extra_pages
    pool = Pool(rng, ctx.row_width, page_size, pages, dtype, pad_rows)
    seqs = list(range(len(lens)))
    for s, n in zip(seqs, lens):
        pool.add(s, n)
    width = max(-(-n // page_size) for n in lens) + 2
    return pool, seqs, pool.table(seqs, width), np.array(lens, np.int32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decode_matches_reference_on_shuffled_pages(dtype, seed):
    rng = np.random.default_rng(seed)
    heads = int(rng.choice([1, 4, 8]))
    groups = int(rng.choice([1, 2, 4]))
    ctx, _ = make_context(rng, heads=heads, groups=groups, group=groups - 1)
    page_size = int(rng.choice([1, 16, 64]))
    lens = list(rng.integers(1, 300, size=int(rng.integers(1, 7))))
    lens[0] = 1
    pool, seqs, table, seqlens = engine(rng, ctx, lens, dtype, page_size,
                                        pad_rows=int(rng.integers(0, 3)))
    w = ctx.plan.slice_width
    q = rng.standard_normal((len(lens), 1, heads, ctx.row_width)).astype(np.float32)
    plan = tpla.decode_plan(seqlens, ctx)
    kv_dtype = "bfloat16" if dtype == "bfloat16" else None
    for layer in range(ctx.layers):
        out, lse = tpla.decode(q, pool.kv, table, seqlens, plan, layer=layer, kv_dtype=kv_dtype)
        assert out.shape == (len(lens), 1, heads, w) and out.dtype == np.float32
        assert lse.shape == (len(lens), heads, 1)
        ro, rl = decode_ref(pool, seqs, lens, q, w, 0.2, ctx.mu(layer))
        assert rel_l2(out, ro) < TOL[dtype]
        assert np.allclose(lse, rl, atol=TOL[dtype] * 10)
        assert ctx.last_faults == 0


def test_query_forms_scales_outputs_and_projection_agree():
    rng = np.random.default_rng(7)
    ctx, weights = make_context(rng)
    lens = [5, 70, 33]
    pool, seqs, table, seqlens = engine(rng, ctx, lens)
    d, w = ctx.dims, ctx.plan.slice_width
    plan = ctx.decode_plan(seqlens)
    q = rng.standard_normal((3, 1, d.heads, ctx.row_width)).astype(np.float32)
    out, lse = tpla.decode(q, pool.kv, table, seqlens, plan, 0.3, layer=1, mu=0.9)
    ro, rl = decode_ref(pool, seqs, lens, q, w, 0.3, 0.9)
    assert rel_l2(out, ro) < 2e-5 and np.allclose(lse, rl, atol=1e-4)

    # latent part and RoPE part given apart: the same numbers
    o2, l2 = tpla.decode(np.ascontiguousarray(q[..., :w]), pool.kv, table, seqlens, plan, 0.3,
                         layer=1, mu=0.9, q_rope=np.ascontiguousarray(q[..., w:]))
    assert np.array_equal(o2, out) and np.array_equal(l2, lse)

    # q_nope absorbed by the context through W'_UK
    wk, wv, _ = weights[1]
    q_nope = rng.standard_normal((3, 1, d.heads, d.d_n)).astype(np.float32)
    q_rope = np.ascontiguousarray(q[..., w:])
    o3, _ = tpla.decode(q_nope, pool.kv, table, seqlens, plan, layer=1, q_rope=q_rope, absorb=True)
    q_lat = np.einsum("hwn,bhn->bhw", wk.astype(np.float64), q_nope[:, 0].astype(np.float64))
    joined = np.concatenate([q_lat[:, None], q_rope.astype(np.float64)], axis=-1)
    r3, _ = decode_ref(pool, seqs, lens, joined, w, 0.2, ctx.mu(1))
    assert rel_l2(o3, r3) < 1e-4

    # partial head outputs through W'_UV
    heads, none = tpla.decode(q, pool.kv, table, seqlens, plan, layer=1, project=True)
    assert none is None and heads.shape == (3, 1, d.heads, d.d_v)
    base, _ = decode_ref(pool, seqs, lens, q, w, 0.2, ctx.mu(1))
    want = np.einsum("bhw,hwv->bhv", base[:, 0], wv.astype(np.float64))
    assert rel_l2(heads[:, 0], want) < 1e-4

    # caller-owned outputs, written in place; a 3-d q [batch, heads, d] works too
    o = np.full((3, d.heads, w), 7.0, np.float32)
    lo = np.empty((3, d.heads), np.float32)
    r_o, r_l = tpla.decode(q[:, 0], pool.kv, table, seqlens, plan, layer=1, out=o, lse=lo)
    assert r_o is o and r_l is lo
    base_o, base_l = tpla.decode(q, pool.kv, table, seqlens, plan, layer=1)
    assert np.array_equal(o, base_o[:, 0]) and np.array_equal(lo, base_l[..., 0])


def test_empty_sequences_bad_pages_and_faults():
    rng = np.random.default_rng(3)
    ctx, _ = make_context(rng)
    lens = [40, 1, 17]
    pool, seqs, table, seqlens = engine(rng, ctx, lens)
    seqlens[1] = 0  # a padded batch entry
    table[2, 0] = 10**6  # outside the pool
    plan = tpla.decode_plan(seqlens, ctx)
    q = rng.standard_normal((3, 1, 4, ctx.row_width)).astype(np.float32)
    out, lse = tpla.decode(q, pool.kv, table, seqlens, plan)
    assert ctx.last_faults == tpla.Faults.BAD_PAGE
    assert np.all(out[1] == 0) and np.all(lse[1] == -np.inf)
    assert np.all(np.isnan(out[2])) and np.all(np.isnan(lse[2]))
    ro, _ = decode_ref(pool, seqs, [40], q[:1], ctx.plan.slice_width, 0.2, ctx.mu(0))
    assert rel_l2(out[:1], ro) < 2e-5
    # a length needing more pages than the table's width
    seqlens = np.array([40, 1, 10**4], np.int32)
    table[2, 0] = pool.pages_of[2][0]
    out, _ = tpla.decode(q, pool.kv, table, seqlens, tpla.decode_plan(seqlens, ctx))
    assert ctx.last_faults & tpla.Faults.BAD_PAGE and np.all(np.isnan(out[2]))
    assert not np.any(np.isnan(out[:2]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rms", ["exact", "sliced"])
def test_append_at_a_slot_mapping_then_decode(dtype, rms):
    rng = np.random.default_rng(11)
    ctx, weights = make_context(rng)
    d, p = ctx.dims, ctx.plan
    lens = [9, 30]
    pool, seqs, table, seqlens = engine(rng, ctx, lens, dtype, page_size=8, extra_pages=4)
    before = pool.backing.copy()
    new = 3
    lat = (rng.standard_normal((2 * new, d.d_c)) * 3).astype(np.float32)
    rope = rng.standard_normal((2 * new, d.d_r)).astype(np.float32)
    for s in seqs:  # room for the new tokens
        while len(pool.pages_of[s]) * pool.ps < lens[s] + new:
            pool.pages_of[s].append(pool.free.pop())
    slots = np.array([pool.slot(s, lens[s] + i) for s in seqs for i in range(new)], np.int64)
    slots_with_pad = np.concatenate([slots, [-1]])
    lat_p = np.concatenate([lat, np.zeros((1, d.d_c), np.float32)])
    rope_p = np.concatenate([rope, np.zeros((1, d.d_r), np.float32)])
    kv_dtype = "bfloat16" if dtype == "bfloat16" else None
    f = tpla.append(lat_p, rope_p, pool.kv, slots_with_pad, context=ctx, layer=0, rms=rms,
                    kv_dtype=kv_dtype)
    assert f == 0
    u = weights[0][2].matrix()
    want = append_rows(lat, rope, u, p.slice_start, p.slice_width)
    if rms == "sliced":  # the slice's RMS estimate with the default fraction w / d_c
        y = lat.astype(np.float64) @ u
        sl = y[:, p.slice_start : p.slice_start + p.slice_width]
        r = np.sqrt((sl * sl).sum(1, keepdims=True) / (d.d_c * p.slice_width / d.d_c) + 1e-6)
        want[:, : p.slice_width] = sl / r
    flat = pool.kv.reshape(-1, ctx.row_width)
    got = flat[slots]
    got = from_bf16_bits(got) if dtype == "bfloat16" else got
    assert rel_l2(got, want) < (4e-3 if dtype == "bfloat16" else 1e-6)
    # nothing else was written
    mask = np.ones(pool.kv.shape[0] * pool.ps, bool)
    mask[slots] = False
    assert np.array_equal(flat[mask], before[:, : pool.ps].reshape(-1, ctx.row_width)[mask])
    assert np.array_equal(pool.backing[:, pool.ps :], before[:, pool.ps :])

    # decode over the grown sequences sees the new rows
    lens2 = [n + new for n in lens]
    seqlens2 = np.array(lens2, np.int32)
    table2 = pool.table(seqs, table.shape[1])
    q = rng.standard_normal((2, 1, d.heads, ctx.row_width)).astype(np.float32)
    out, _ = tpla.decode(q, pool.kv, table2, seqlens2, tpla.decode_plan(seqlens2, ctx),
                         kv_dtype=kv_dtype)
    ro, _ = decode_ref(pool, seqs, lens2, q, p.slice_width, 0.2, ctx.mu(0))
    assert rel_l2(out, ro) < TOL[dtype]

    # a slot past the pool is skipped and reported
    bad = np.array([pool.kv.shape[0] * pool.ps], np.int32)
    assert tpla.append(lat[:1], rope[:1], pool.kv, bad, context=ctx, kv_dtype=kv_dtype) \
        == tpla.Faults.BAD_SLOT
    assert ctx.last_faults == tpla.Faults.BAD_SLOT


def test_fp8_pools_take_appends_and_decode_their_dequantised_rows():
    rng = np.random.default_rng(5)
    ctx, weights = make_context(rng, d_c=256, d_r=16, groups=2)
    d, p = ctx.dims, ctx.plan
    w = p.slice_width
    lens = [70, 1, 130]
    pool = Pool(rng, ctx.row_width, 16, 20, "fp8_e4m3", pad_rows=1, d_r=d.d_r)
    assert pool.kv.shape[-1] == w + 4 + 2 * d.d_r and pool.kv.dtype == np.uint8
    seqs = list(range(len(lens)))
    for s, n in zip(seqs, lens):
        pool.add(s, n)
    lat = (rng.standard_normal((sum(lens), d.d_c)) * 2).astype(np.float32)
    rope = rng.standard_normal((sum(lens), d.d_r)).astype(np.float32)
    slots = np.array([pool.slot(s, t) for s, n in zip(seqs, lens) for t in range(n)], np.int32)
    for layer in range(ctx.layers):
        assert tpla.append(lat, rope, pool.kv, slots, context=ctx, layer=layer,
                           kv_dtype="fp8_e4m3") == 0
        # the stored rows: the appended ones, to e4m3's precision (3 mantissa bits)
        want = append_rows(lat, rope, weights[layer][2].matrix(), p.slice_start, w)
        got = decode_fp8_rows(pool.kv.reshape(-1, pool.kv.shape[-1])[slots], w, d.d_r)
        assert rel_l2(got[:, :w], want[:, :w]) < 4e-2
        assert rel_l2(got[:, w:], want[:, w:]) < 4e-3  # the key in bfloat16
        # decode reads them as the reference does
        seqlens = np.array(lens, np.int32)
        q = rng.standard_normal((len(lens), 1, d.heads, ctx.row_width)).astype(np.float32)
        out, lse = tpla.decode(q, pool.kv, pool.table(seqs, 12), seqlens,
                               tpla.decode_plan(seqlens, ctx), layer=layer,
                               kv_dtype="fp8_e4m3")
        ro, rl = decode_ref(pool, seqs, lens, q, w, 0.2, ctx.mu(layer))
        assert rel_l2(out, ro) < 1e-2
        assert np.allclose(lse, rl, atol=1e-1)
        assert ctx.last_faults == 0
    # the bytes must be named: uint8 alone, or rows of another size, are refused
    with pytest.raises(tpla.InvalidArgumentError, match="fp8_e4m3"):
        tpla.decode(q, pool.kv, pool.table(seqs, 12), seqlens, tpla.decode_plan(seqlens, ctx))
    with pytest.raises(tpla.InvalidArgumentError, match="bytes"):
        tpla.append(lat[:1], rope[:1], pool.kv[..., :-4], slots[:1], context=ctx,
                    kv_dtype="fp8_e4m3")


def test_set_layer_folds_a_checkpoint_layer():
    rng = np.random.default_rng(5)
    dims = tpla.ModelDims(2, 32, 8, 8, 4, 0.25)
    plan = tpla.ShardPlan(dims, 2, 1)
    ctx = tpla.RankContext(dims, plan, 1, threads=1)
    wk = rng.standard_normal((2, 32, 8))
    wv = rng.standard_normal((2, 32, 4))
    gamma = rng.uniform(0.5, 1.5, 32)
    ctx.set_layer(0, wk, wv, gamma, tpla.Transform.identity(32), mu=1.2)
    lens = [12]
    pool, seqs, table, seqlens = engine(rng, ctx, lens, page_size=4)
    q_nope = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    q_rope = rng.standard_normal((1, 1, 2, 8)).astype(np.float32)
    plan_ = tpla.decode_plan(seqlens, ctx)
    out, _ = tpla.decode(q_nope, pool.kv, table, seqlens, plan_, q_rope=q_rope, absorb=True)
    # identity U: W'_UK = (diag(gamma) W_UK)[slice 1]
    wk_rank = (gamma[None, :, None] * wk)[:, 16:32]
    q_lat = np.einsum("hwn,hn->hw", wk_rank, q_nope[0, 0].astype(np.float64))
    joined = np.concatenate([q_lat, q_rope[0, 0].astype(np.float64)], -1)[None, None]
    ro, _ = decode_ref(pool, seqs, lens, joined, 16, 0.25, 1.2)
    assert rel_l2(out, ro) < 1e-4
    with pytest.raises(tpla.InvalidArgumentError, match="w_uk must have shape"):
        ctx.set_layer(0, wk[:1], wv, gamma, tpla.Transform.identity(32))


def test_weights_file_round_trip(tmp_path):
    rng = np.random.default_rng(9)
    ctx, _ = make_context(rng)
    path = ctx.save_weights(tmp_path / "rank1.tplaw")
    again = tpla.RankContext.from_weights_file(path, threads=1)
    assert again.dims == ctx.dims and again.plan == ctx.plan and again.layers == 2
    lens = [50, 3]
    pool, _, table, seqlens = engine(rng, ctx, lens)
    q = rng.standard_normal((2, 1, 4, ctx.row_width)).astype(np.float32)
    for layer in range(2):
        a = tpla.decode(q, pool.kv, table, seqlens, tpla.decode_plan(seqlens, ctx),
                        layer=layer, project=True)[0]
        b = tpla.decode(q, pool.kv, table, seqlens, tpla.decode_plan(seqlens, again),
                        layer=layer, project=True)[0]
        assert np.array_equal(a, b)
    (tmp_path / "bad").write_bytes(b"not a weights file" * 10)
    with pytest.raises(tpla.CorruptFileError) as e:
        tpla.RankContext.from_weights_file(tmp_path / "bad")
    assert e.value.status == "TPLA_STATUS_CORRUPT_FILE"


def test_shard_export_then_import_equals_append(tmp_path):
    rng = np.random.default_rng(13)
    ctx, weights = make_context(rng, layers=2)
    d, p = ctx.dims, ctx.plan
    tokens = 37
    lat = rng.standard_normal((2, tokens, d.d_c))
    rope = rng.standard_normal((2, tokens, d.d_r))
    paths = [tmp_path / f"prefill.rank{i}-of-2.tpla" for i in range(2)]
    tpla.export_shards(paths, d, [w[2] for w in weights], [(5, lat, rope)],
                       dtype="float32", page_size=16)
    src = tpla.ShardCache(ctx, dtype="float32", page_size=16)
    assert src.register_file(paths[p.group]) == [5]
    assert src.seq_len(5, 1) == tokens
    a = Pool(rng, ctx.row_width, 8, 8, "float32")
    b = Pool(rng, ctx.row_width, 8, 8, "float32")
    slots = np.array(rng.permutation(64)[:tokens], np.int32)
    for layer in range(2):
        assert ctx.import_sequence(src, 5, layer, a.kv, slots) == 0
        tpla.append(lat[layer].astype(np.float32), rope[layer].astype(np.float32), b.kv, slots,
                    context=ctx, layer=layer)
        flat = a.kv.reshape(-1, ctx.row_width)[slots]
        want = append_rows(lat[layer], rope[layer], weights[layer][2].matrix(),
                           p.slice_start, p.slice_width)
        assert rel_l2(flat, want) < 1e-6
        assert rel_l2(flat, b.kv.reshape(-1, ctx.row_width)[slots]) < 1e-6
    with pytest.raises(tpla.OutOfRangeError):
        ctx.import_sequence(src, 99, 0, a.kv, slots)


def test_all_reduce_in_process_and_with_a_communicator():
    a = np.array([1, 2, 3], np.float32)
    b = np.array([10, 20, 30], np.float32)
    tpla.all_reduce_in_process([a, b])
    assert a.tolist() == [11, 22, 33] and b.tolist() == [11, 22, 33]
    with pytest.raises(tpla.InvalidArgumentError):
        tpla.all_reduce_in_process([a, np.zeros(2, np.float32)])
    with pytest.raises(tpla.InvalidArgumentError, match="overlaps"):
        tpla.all_reduce_in_process([a, a])
    assert tpla.all_reduce(a, communicator=lambda t: t.__imul__(2)) is a
    assert a.tolist() == [22, 44, 66]
    with pytest.raises(tpla.InvalidArgumentError, match="communicator"):
        tpla.all_reduce(a)


def test_presets_dims_plans_and_transforms():
    assert set(tpla.presets()) == {"deepseek-v3", "kimi-k2", "deepseek-v2-lite"}
    d = tpla.ModelDims.preset("deepseek-v3")
    assert (d.heads, d.d_c, d.d_r, d.d_n, d.d_v) == (128, 512, 64, 128, 128)
    plan = tpla.ShardPlan(d, 2, 1)
    assert (plan.slice_start, plan.slice_width, plan.row_width(d)) == (256, 256, 320)
    hs = tpla.ShardPlan.with_head_split(d, 4, 2, 3)
    assert (hs.group, hs.head_start, hs.heads) == (1, 64, 64)
    with pytest.raises(tpla.InvalidArgumentError):
        tpla.ShardPlan(d, 3, 0)
    rng = np.random.default_rng(0)
    t = tpla.Transform.hadamard(64, seed=3)
    x = rng.standard_normal((5, 64))
    u = t.matrix()
    assert np.allclose(u @ u.T, np.eye(64))
    assert np.allclose(t.rotate(x), x @ u) and np.allclose(t.rotate_back(t.rotate(x)), x)
    lat = rng.standard_normal((400, 64)) * np.linspace(3, 0.1, 64)
    pca = tpla.Transform.pca(lat, 2)
    assert pca.kind == "pca" and pca.dim == 64
    assert "portable" in tpla.cpu_kernels()


def test_reference_backend_agrees():
    rng = np.random.default_rng(21)
    ctx, _ = make_context(rng, backend="reference")
    lens = [20, 64]
    pool, seqs, table, seqlens = engine(rng, ctx, lens)
    q = rng.standard_normal((2, 1, 4, ctx.row_width)).astype(np.float32)
    out, _ = tpla.decode(q, pool.kv, table, seqlens, tpla.decode_plan(seqlens, ctx))
    ro, _ = decode_ref(pool, seqs, lens, q, ctx.plan.slice_width, 0.2, ctx.mu(0))
    assert rel_l2(out, ro) < 1e-6
