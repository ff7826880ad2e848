"""Sequence shards from Python (issue 15): hybrid exports, sequence-shard rank caches,
appends by position, per-rank decodes with log-sum-exps and merges (a) and (b)."""

from __future__ import annotations

import numpy as np
import pytest

import tpla
from reference import normalise, rel_l2

HEADS, D_C, D_R, D_N, D_V, SCALE = 4, 64, 16, 16, 8, 0.2
PAGE = 8
#: tokens of each sequence appended at decode time, after the exported prefill
APPENDED = 3
#: 1 and 2 are shorter than 4 shards; 0 prefill tokens for the first two (all appended);
#: none of the others divides by 2, 3, 4 or the interleaves
LENS = [1, 2, 7, 13, 37]


def dims():
    return tpla.ModelDims(HEADS, D_C, D_R, D_N, D_V, SCALE)


class Model:
    """One layer stack's full MLA weights, a prefill and the decode queries."""

    def __init__(self, seed, layers=2, lens=LENS):
        rng = np.random.default_rng(seed)
        self.layers, self.lens = layers, list(lens)
        self.w_uk = [rng.standard_normal((HEADS, D_C, D_N)).astype(np.float32) * 0.3
                     for _ in range(layers)]
        self.w_uv = [rng.standard_normal((HEADS, D_C, D_V)).astype(np.float32)
                     for _ in range(layers)]
        self.gamma = [(1.0 + 0.1 * rng.standard_normal(D_C)).astype(np.float32)
                      for _ in range(layers)]
        self.transforms = [tpla.Transform.hadamard(D_C, seed=3 + layer) for layer in range(layers)]
        # per sequence: pre-norm latents [layers, n, d_c] and RoPE keys [layers, n, d_r]
        self.latents = [rng.standard_normal((layers, n, D_C)).astype(np.float32) for n in lens]
        self.k_rope = [rng.standard_normal((layers, n, D_R)).astype(np.float32) for n in lens]
        self.q_nope = rng.standard_normal((len(lens), HEADS, D_N)).astype(np.float32)
        self.q_rope = rng.standard_normal((len(lens), HEADS, D_R)).astype(np.float32)

    def context(self, groups, group):
        plan = tpla.ShardPlan(dims(), groups, group)
        ctx = tpla.RankContext(dims(), plan, self.layers, threads=1)
        mu = 1.0 if groups == 1 else 1.0 + 0.1 * group
        for layer in range(self.layers):
            ctx.set_layer(layer, self.w_uk[layer], self.w_uv[layer], self.gamma[layer],
                          self.transforms[layer], mu=mu)
        return ctx

    def export(self, tmp_path, groups, sharding, dtype="float32", tag=""):
        """The prefill (every sequence but its last APPENDED tokens) in g * s rank files."""
        s = 1 if sharding is None else sharding.shards
        tmp_path.mkdir(parents=True, exist_ok=True)
        paths = [tmp_path / f"{tag}g{groups}-s{s}-rank{r}.shard" for r in range(groups * s)]
        prefill = []
        for i, n in enumerate(self.lens):
            k = max(n - APPENDED, 0)
            prefill.append((i, np.ascontiguousarray(self.latents[i][:, :k]),
                            np.ascontiguousarray(self.k_rope[i][:, :k])))
        tpla.export_shards(paths, dims(), self.transforms, prefill, dtype=dtype,
                           page_size=PAGE, sharding=sharding)
        return paths

    def deploy(self, tmp_path, groups, sharding, dtype="float32"):
        """Every rank of groups x sharding: its cache registers its file of the prefill,
        then each decode-time token is appended, by position, on the ranks that own it."""
        paths = self.export(tmp_path, groups, sharding, dtype)
        sh = sharding or tpla.SequenceSharding(1)
        ranks = []
        for rank in range(groups * sh.shards):
            hp = tpla.HybridPlan(dims(), groups, sh, rank)
            ctx = self.context(groups, hp.group)
            cache = tpla.RankCache(ctx, plan=hp, dtype=dtype, page_size=PAGE, capacity_pages=64)
            assert cache.register_file(paths[rank]) == list(range(len(self.lens)))
            for seq, n in enumerate(self.lens):
                for t in range(max(n - APPENDED, 0), n):
                    if not hp.holds(t):
                        continue
                    assert hp.owner_rank(hp.group, t) == rank
                    for layer in range(self.layers):
                        ctx.append_token(cache, seq, self.latents[seq][layer, t],
                                         self.k_rope[seq][layer, t], position=t, layer=layer)
                for layer in range(self.layers):
                    assert cache.seq_len(seq, layer) == sh.tokens_on(hp.shard, n)
            ranks.append((ctx, cache))
        return ranks

    def decode(self, ranks, layer, bounds=False):
        """Every rank's outputs and log-sum-exps, in buffers poisoned with NaN."""
        outs, lses, bnds = [], [], []
        seqs = list(range(len(self.lens)))
        for ctx, cache in ranks:
            out = np.full((len(seqs), HEADS, D_V), np.nan, np.float32)
            lse = np.full((len(seqs), HEADS), np.nan, np.float32)
            kw = {}
            if bounds:
                kw = dict(rope_key_norm=self.rope_key_norm(),
                          bounds=np.full((len(seqs), HEADS), np.nan))
            o, l, b = ctx.decode_sequence_shard(cache, seqs, self.q_nope, layer=layer,
                                                q_rope=self.q_rope, absorb=True, out=out,
                                                lse=lse, **kw)
            assert o is out and l is lse
            assert not np.isnan(out).any() and not np.isnan(lse).any()
            if bounds:
                assert b is kw["bounds"] and np.isfinite(b).all()
                bnds.append(b)
            else:
                assert b is None
            outs.append(out)
            lses.append(lse)
        return outs, lses, bnds

    def rope_key_norm(self):
        return float(max(np.linalg.norm(k, axis=-1).max() for k in self.k_rope if k.size))

    def merged(self, ranks, layer, shards, merge):
        outs, lses, bnds = self.decode(ranks, layer, bounds=(merge == "packed"))
        if merge == "lse":
            tpla.merge_by_lse_in_process(outs, lses, shards)
        else:
            tpla.merge_packed_in_process(outs, lses, bnds, shards)
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
        return outs[0]

    def mla(self, layer):
        """Exact MLA in float64: softmax over every token, values through W_UV."""
        out = np.zeros((len(self.lens), HEADS, D_V))
        for b, n in enumerate(self.lens):
            c = normalise(self.latents[b][layer]) * self.gamma[layer]
            for h in range(HEADS):
                k = c @ self.w_uk[layer][h].astype(np.float64)
                v = c @ self.w_uv[layer][h].astype(np.float64)
                s = SCALE * (k @ self.q_nope[b, h] + self.k_rope[b][layer] @ self.q_rope[b, h])
                p = np.exp(s - s.max())
                out[b, h] = (p / p.sum()) @ v
        return out


# bf16: the same cached rows; the kernels round the probabilities of each shard's own
# softmax to bf16 for the value product, so the shards differ by bf16 rounding
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-3)])
@pytest.mark.parametrize("shards,interleave", [(2, 1), (2, 3), (4, 1), (4, 4)])
def test_exact_mode_equals_the_unsharded_decode(tmp_path, dtype, tol, shards, interleave):
    m = Model(seed=shards * 10 + interleave)
    whole = m.deploy(tmp_path / "s1", 1, None, dtype)
    sh = tpla.SequenceSharding(shards, interleave)
    ranks = m.deploy(tmp_path / "s", 1, sh, dtype)
    for ctx, cache in ranks:
        assert cache.is_sequence_shard and cache.sharding == sh and cache.dtype == dtype
    for layer in range(m.layers):
        ref, _, _ = m.decode(whole, layer)
        if dtype == "float32":
            # the unsharded decode is exact MLA (f32 rows: rounding only)
            assert rel_l2(ref[0], m.mla(layer)) < 1e-5
        for merge in ["lse", "packed"]:
            got = m.merged(ranks, layer, shards, merge)
            e = rel_l2(got, ref[0])
            assert e < tol, (merge, layer, e)


def test_sequences_shorter_than_the_shards_leave_some_shards_empty(tmp_path):
    m = Model(seed=5)
    sh = tpla.SequenceSharding(4, 2)
    ranks = m.deploy(tmp_path, 1, sh)
    outs, lses, _ = m.decode(ranks, 0)
    for shard, (o, l) in enumerate(zip(outs, lses)):
        for b, n in enumerate(m.lens):
            held = sh.tokens_on(shard, n)
            if held == 0:
                assert (l[b] == -np.inf).all() and (o[b] == 0).all()
            else:
                assert np.isfinite(l[b]).all()
    # sequence 0 (1 token) lives on shard 0 only, sequence 1 (2 tokens) too (interleave 2)
    assert [sh.tokens_on(j, 1) for j in range(4)] == [1, 0, 0, 0]
    assert [sh.tokens_on(j, 2) for j in range(4)] == [2, 0, 0, 0]
    assert [sh.tokens_on(j, 13) for j in range(4)] == [4, 4, 3, 2]
    assert sum(sh.tokens_on(j, 37) for j in range(4)) == 37


@pytest.mark.parametrize("merge", ["lse", "packed"])
def test_hybrid_2x2_equals_tpla_with_two_groups(tmp_path, merge):
    m = Model(seed=8)
    tpla2 = m.deploy(tmp_path / "g2", 2, None)
    hybrid = m.deploy(tmp_path / "g2s2", 2, tpla.SequenceSharding(2, 3))
    assert [c.group for _, c in hybrid] == [0, 0, 1, 1]
    assert [c.shard for _, c in hybrid] == [0, 1, 0, 1]
    for layer in range(m.layers):
        ref = m.merged(tpla2, layer, 1, merge)
        got = m.merged(hybrid, layer, 2, merge)
        assert rel_l2(got, ref) < 1e-5
        # and TPLA is not exact MLA: the comparison above is against g=2, not g=1
        assert rel_l2(ref, m.mla(layer)) > 1e-4


def test_the_per_rank_merge_steps_equal_the_in_process_merges(tmp_path):
    m = Model(seed=9)
    shards = 4
    ranks = m.deploy(tmp_path, 1, tpla.SequenceSharding(shards, 1))
    outs, lses, bnds = m.decode(ranks, 1, bounds=True)
    # (a): all-gather the lse, rescale, then sum over the ranks
    want = [o.copy() for o in outs]
    tpla.merge_by_lse_in_process(want, lses, shards)
    scaled = [o.copy() for o in outs]
    for j, o in enumerate(scaled):
        tpla.rescale_by_gathered_lse(o, j, lses)
    tpla.all_reduce_in_process(scaled)
    np.testing.assert_allclose(scaled[0], want[0], rtol=1e-6, atol=1e-7)
    # (b): pack against the shared bounds, sum the float64 packs, unpack
    assert all((b == bnds[0]).all() for b in bnds), "bounds differ between shards"
    packs = [tpla.pack_against_bound(o, l, b) for o, l, b in zip(outs, lses, bnds)]
    assert packs[0].shape == (len(m.lens), HEADS, tpla.packed_row_len(D_V))
    assert packs[0].dtype == np.float64
    total = np.sum(packs, axis=0)
    merged = np.full_like(outs[0], np.nan)
    assert tpla.unpack_merged(total, out=merged) is merged
    np.testing.assert_allclose(merged, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tpla.unpack_merged(total), merged)


def test_latent_outputs_of_the_shards_merge_to_the_unsharded_latent_output(tmp_path):
    m = Model(seed=12)
    whole = m.deploy(tmp_path / "s1", 1, None)
    ranks = m.deploy(tmp_path / "s3", 1, tpla.SequenceSharding(3, 2))
    q = np.concatenate([np.einsum("bhn,hcn->bhc", m.q_nope, np.ones((HEADS, D_C, D_N))),
                        m.q_rope], axis=-1).astype(np.float32)  # any joined rows
    seqs = list(range(len(m.lens)))
    (ctx, cache), = whole
    ref, ref_lse, _ = ctx.decode_sequence_shard(cache, seqs, q, project=False)
    assert ref.shape == (len(seqs), HEADS, D_C) and ref_lse.shape == (len(seqs), HEADS)
    outs, lses = [], []
    for ctx, cache in ranks:
        o, l, _ = ctx.decode_sequence_shard(cache, seqs, q, project=False)
        outs.append(o)
        lses.append(l)
    tpla.merge_by_lse_in_process(outs, lses, 3)
    assert rel_l2(outs[0], ref) < 1e-5
    # the merged log-sum-exp is the unsharded one
    np.testing.assert_allclose(np.logaddexp.reduce(np.stack(lses), axis=0), ref_lse, rtol=1e-5)


def test_registration_refuses_the_file_of_another_shard_or_sharding(tmp_path):
    m = Model(seed=3, layers=1)
    sh = tpla.SequenceSharding(2, 3)
    files = m.export(tmp_path, 2, sh)
    whole = m.export(tmp_path, 2, None, tag="whole-")
    for file, rank, text in [
        (1, 0, "sequence shard 1 of 2, this cache is sequence shard 0"),
        (0, 1, "sequence shard 0 of 2, this cache is sequence shard 1"),
        (2, 1, "latent group 1 of 2, this cache is group 0"),
    ]:
        hp = tpla.HybridPlan(dims(), 2, sh, rank)
        cache = tpla.RankCache(m.context(2, hp.group), plan=hp, dtype="float32", page_size=PAGE)
        with pytest.raises(tpla.MismatchError, match=text):
            cache.register_file(files[file])
        assert cache.sequence_ids() == []
        assert cache.register_file(files[rank]) == list(range(len(m.lens)))
    # another sharding, no sharding, and a file of every token on a sequence shard
    ctx = m.context(2, 0)
    for other in [tpla.SequenceSharding(2, 1), tpla.SequenceSharding(4, 3)]:
        cache = tpla.RankCache(ctx, plan=tpla.HybridPlan(dims(), 2, other, 0), dtype="float32",
                               page_size=PAGE)
        with pytest.raises(tpla.MismatchError, match="cut for 2 sequence shards of interleave 3"):
            cache.register_file(files[0])
    with pytest.raises(tpla.MismatchError, match="cut for 2 sequence shards"):
        tpla.RankCache(ctx, dtype="float32", page_size=PAGE).register_file(files[0])
    cache = tpla.RankCache(ctx, plan=tpla.HybridPlan(dims(), 2, sh, 0), dtype="float32",
                           page_size=PAGE)
    with pytest.raises(tpla.MismatchError, match="cut for 1 sequence shards"):
        cache.register_file(whole[0])
    # versions: 1 without sequence sharding, 2 with it
    assert files[0].read_bytes()[8:12] == (2).to_bytes(4, "little")
    assert whole[0].read_bytes()[8:12] == (1).to_bytes(4, "little")
    # a damaged v2 file is a CorruptFileError naming the path
    bad = tmp_path / "bad.shard"
    img = bytearray(files[0].read_bytes())
    img[130] ^= 1
    bad.write_bytes(bytes(img))
    with pytest.raises(tpla.CorruptFileError, match="bad.shard.*header checksum"):
        tpla.RankCache(ctx, plan=tpla.HybridPlan(dims(), 2, sh, 0), dtype="float32",
                       page_size=PAGE).register_file(bad)


def test_appends_go_by_position_to_the_owner_only(tmp_path):
    m = Model(seed=4, layers=1, lens=[10])
    sh = tpla.SequenceSharding(2, 4)
    ranks = m.deploy(tmp_path, 1, sh)
    (ctx0, c0), (ctx1, c1) = ranks
    # 10 tokens in blocks of 4: shard 0 holds 0..4 and 8..10, shard 1 holds 4..8
    assert (c0.seq_len(0), c1.seq_len(0)) == (6, 4)
    assert [sh.owner(t) for t in range(12)] == [0] * 4 + [1] * 4 + [0] * 4
    assert sh.local_index(9) == 5 and sh.position_of(0, 5) == 9 and sh.position_of(1, 4) == 12
    a = np.full(D_C, 0.5, np.float32)
    kr = np.full(D_R, 0.25, np.float32)
    with pytest.raises(tpla.MismatchError, match="position 12 belongs to sequence shard 1 of 2"):
        ctx0.append_token(c0, 0, a, kr, position=12)
    with pytest.raises(tpla.InvalidArgumentError, match="next token this cache holds is at "
                       "position 10, not 11"):
        ctx0.append_token(c0, 0, a, kr, position=11)
    with pytest.raises(tpla.InvalidArgumentError, match="not 9"):
        ctx0.append_token(c0, 0, a, kr, position=9)
    with pytest.raises(tpla.InvalidArgumentError, match="append by position"):
        ctx0.append_token(c0, 0, a, kr)
    assert c0.seq_len(0) == 6, "nothing was appended"
    ctx0.append_token(c0, 0, a, kr, position=10)
    ctx0.append_token(c0, 0, a.astype(np.float16), kr.astype(np.float16), position=11)
    assert c0.seq_len(0) == 8
    ctx1.append_token(c1, 0, a, kr, position=12)
    # without sequence sharding a position must be the length (or be left out)
    whole = tpla.RankCache(ctx0, dtype="float32", page_size=PAGE, capacity_pages=4)
    whole.add_sequence(7)
    ctx0.append_token(whole, 7, a, kr, position=0)
    ctx0.append_token(whole, 7, a, kr)
    with pytest.raises(tpla.InvalidArgumentError, match="at position 2, not 5"):
        ctx0.append_token(whole, 7, a, kr, position=5)
    assert whole.seq_len(7) == 2
    whole.free_sequence(7)
    assert whole.sequence_ids() == [] and whole.free_pages == 4


def test_bad_arguments_are_clear_exceptions(tmp_path):
    m = Model(seed=6, layers=1)
    d = dims()
    for shards, interleave, text in [(0, 1, "sequence shards must lie in 1..=64, got 0"),
                                     (65, 1, "got 65"),
                                     (2, 0, "the interleave must lie in"),
                                     (2, 2**20 + 1, "the interleave must lie in")]:
        with pytest.raises(tpla.InvalidArgumentError, match=text):
            tpla.SequenceSharding(shards, interleave)
    sh = tpla.SequenceSharding(2, 3)
    with pytest.raises(tpla.OutOfRangeError, match="sequence shard 2 is out of range for 2"):
        sh.tokens_on(2, 10)
    with pytest.raises(tpla.OutOfRangeError):
        sh.position_of(5, 0)
    with pytest.raises(OverflowError):
        sh.owner(-1)
    with pytest.raises(tpla.OutOfRangeError, match="rank 4 is out of range for 2 latent "
                       "groups x 2 sequence shards"):
        tpla.HybridPlan(d, 2, sh, 4)
    with pytest.raises(tpla.InvalidArgumentError, match="1, 2, 4, 8"):
        tpla.HybridPlan(d, 3, sh, 0)
    with pytest.raises(tpla.OutOfRangeError, match="latent group 2"):
        tpla.HybridPlan(d, 2, sh, 0).owner_rank(2, 0)
    hp = tpla.HybridPlan(d, 2, sh, 3)
    assert (hp.group, hp.shard, hp.rank, hp.ranks) == (1, 1, 3, 4)
    assert hp.latent == tpla.ShardPlan(d, 2, 1)
    assert hp.bytes_per_token(d, "bfloat16") == (D_C // 2 + D_R) * 2 / 2
    assert [hp.owner_rank(0, t) for t in range(7)] == [0, 0, 0, 1, 1, 1, 0]

    ctx = m.context(2, 0)
    with pytest.raises(tpla.MismatchError, match="holds latent group 1 of 2, the context is group 0"):
        tpla.RankCache(ctx, plan=hp)
    with pytest.raises(tpla.InvalidArgumentError, match="page size"):
        tpla.RankCache(ctx, page_size=0)
    with pytest.raises(tpla.InvalidArgumentError):
        tpla.RankCache(ctx, dtype="int8")
    with pytest.raises(tpla.InvalidArgumentError, match="pages"):
        tpla.RankCache(ctx, capacity_pages=2**40)
    empty_ctx = tpla.RankContext(d, tpla.ShardPlan(d, 2, 0), 1)
    with pytest.raises(tpla.TplaError, match="layer 0"):
        tpla.RankCache(empty_ctx)

    plan0 = tpla.HybridPlan(d, 2, sh, 0)
    cache = tpla.RankCache(ctx, plan=plan0, dtype="float32", page_size=PAGE, capacity_pages=2)
    cache.add_sequence(1)
    with pytest.raises(tpla.InvalidArgumentError, match="already in the cache"):
        cache.add_sequence(1)
    with pytest.raises(tpla.OutOfRangeError, match="sequence 9 is not in the cache"):
        cache.free_sequence(9)
    with pytest.raises(tpla.OutOfRangeError, match="layer 1 is out of range"):
        cache.seq_len(1, 1)
    a = np.zeros(D_C, np.float32)
    kr = np.zeros(D_R, np.float32)
    with pytest.raises(tpla.InvalidArgumentError, match=r"latent must have shape \[d_c=64\]"):
        ctx.append_token(cache, 1, np.zeros(D_C + 1, np.float32), kr, position=0)
    with pytest.raises(tpla.InvalidArgumentError, match="k_rope must be float32"):
        ctx.append_token(cache, 1, a, np.zeros(D_R, np.int32), position=0)
    with pytest.raises(tpla.InvalidArgumentError, match="rms must be"):
        ctx.append_token(cache, 1, a, kr, position=0, rms="none")
    nan = a.copy()
    nan[3] = np.nan
    with pytest.raises(tpla.InvalidArgumentError, match="latent"):
        ctx.append_token(cache, 1, nan, kr, position=0)
    with pytest.raises(tpla.OutOfRangeError, match="sequence 2 is not in the cache"):
        ctx.append_token(cache, 2, a, kr, position=0)
    # out of pages: 2 pages of 8 tokens hold shard 0's 16 tokens of positions 0..31
    for t in [p for p in range(31) if sh.owner(p) == 0]:
        ctx.append_token(cache, 1, a + 1, kr, position=t)
    with pytest.raises(tpla.OutOfCapacityError, match="only 0 of 2 pages are free"):
        ctx.append_token(cache, 1, a + 1, kr, position=31)
    assert cache.seq_len(1) == 16
    other = m.context(2, 1)
    with pytest.raises(tpla.MismatchError, match="latent group 0 of 2, this context is group 1"):
        other.append_token(cache, 1, a, kr, position=36)

    # decode arguments
    q = np.zeros((1, HEADS, D_C // 2 + D_R), np.float32)
    out, lse, b = ctx.decode_sequence_shard(cache, [1], q)
    assert out.shape == (1, HEADS, D_V) and lse.shape == (1, HEADS) and b is None
    with pytest.raises(tpla.InvalidArgumentError, match=r"q must have shape \[batch=2"):
        ctx.decode_sequence_shard(cache, [1, 1], q)
    with pytest.raises(tpla.InvalidArgumentError, match="q must be float32"):
        ctx.decode_sequence_shard(cache, [1], q.astype(np.float64))
    with pytest.raises(tpla.InvalidArgumentError, match="absorb=True needs q_rope"):
        ctx.decode_sequence_shard(cache, [1], q, absorb=True)
    with pytest.raises(tpla.InvalidArgumentError, match="q_rope must have shape"):
        ctx.decode_sequence_shard(cache, [1], q[..., :32].copy(), q_rope=q[..., :3].copy())
    with pytest.raises(tpla.InvalidArgumentError, match="out must be float32"):
        ctx.decode_sequence_shard(cache, [1], q, out=np.zeros((1, HEADS, D_V)))
    with pytest.raises(tpla.InvalidArgumentError, match="out must have shape"):
        ctx.decode_sequence_shard(cache, [1], q, out=np.zeros((1, HEADS, 32), np.float32))
    with pytest.raises(tpla.InvalidArgumentError, match="lse must have shape"):
        ctx.decode_sequence_shard(cache, [1], q, lse=np.zeros((1, HEADS, 1), np.float32))
    ro = np.zeros((1, HEADS, D_V), np.float32)
    ro.flags.writeable = False
    with pytest.raises(tpla.InvalidArgumentError, match="out is read-only"):
        ctx.decode_sequence_shard(cache, [1], q, out=ro)
    shared = np.zeros(HEADS * D_V + HEADS, np.float32)
    with pytest.raises(tpla.InvalidArgumentError, match="overlaps"):
        ctx.decode_sequence_shard(cache, [1], q, out=shared[:HEADS * D_V].reshape(1, HEADS, D_V),
                                  lse=shared[HEADS * D_V - 1:-1].reshape(1, HEADS))
    with pytest.raises(tpla.InvalidArgumentError, match="bounds= is written only with"):
        ctx.decode_sequence_shard(cache, [1], q, bounds=np.zeros((1, HEADS)))
    with pytest.raises(tpla.InvalidArgumentError, match="RoPE key norm bound"):
        ctx.decode_sequence_shard(cache, [1], q, rope_key_norm=float("nan"))
    with pytest.raises(tpla.InvalidArgumentError, match="bounds must be float64"):
        ctx.decode_sequence_shard(cache, [1], q, rope_key_norm=1.0,
                                  bounds=np.zeros((1, HEADS), np.float32))
    with pytest.raises(tpla.OutOfRangeError, match="sequence 4 is not in the cache"):
        ctx.decode_sequence_shard(cache, [4], q)
    with pytest.raises(tpla.TplaError, match="layer 3"):
        ctx.decode_sequence_shard(cache, [1], q, layer=3)
    with pytest.raises(tpla.MismatchError):
        other.decode_sequence_shard(cache, [1], q)

    # merges
    outs = [np.zeros((2, HEADS, D_V), np.float32) for _ in range(4)]
    lses = [np.zeros((2, HEADS), np.float32) for _ in range(4)]
    bnds = [np.zeros((2, HEADS)) for _ in range(4)]
    with pytest.raises(tpla.InvalidArgumentError, match="cannot be split evenly into groups of 3"):
        tpla.merge_by_lse_in_process(outs, lses, 3)
    with pytest.raises(tpla.InvalidArgumentError, match="cannot be split evenly into groups of 0"):
        tpla.merge_packed_in_process(outs, lses, bnds, 0)
    with pytest.raises(tpla.InvalidArgumentError, match="4 ranks' outputs but 3"):
        tpla.merge_by_lse_in_process(outs, lses[:3], 2)
    with pytest.raises(tpla.InvalidArgumentError, match="outs holds no array"):
        tpla.merge_by_lse_in_process([], [], 1)
    with pytest.raises(tpla.InvalidArgumentError, match=r"outs\[1\] has shape"):
        tpla.merge_by_lse_in_process([outs[0], outs[1][:1]], lses[:2], 2)
    with pytest.raises(tpla.InvalidArgumentError, match=r"lses\[2\] has shape \[2, 4, 1\]"):
        tpla.merge_by_lse_in_process(outs, lses[:2] + [lses[2][..., None]] + lses[3:], 2)
    with pytest.raises(tpla.InvalidArgumentError, match="lses must be float32"):
        tpla.merge_by_lse_in_process(outs, [x.astype(np.float64) for x in lses], 2)
    with pytest.raises(tpla.InvalidArgumentError, match="bounds must be float64"):
        tpla.merge_packed_in_process(outs, lses, lses, 2)
    with pytest.raises(tpla.InvalidArgumentError, match="overlaps"):
        tpla.merge_by_lse_in_process([outs[0], outs[0]], lses[:2], 2)
    with pytest.raises(tpla.InvalidArgumentError, match="overlaps"):
        tpla.merge_by_lse_in_process([outs[0], outs[1]], [lses[0],
                                                          outs[1].reshape(-1)[:8].reshape(2, 4)], 2)
    with pytest.raises(tpla.InvalidArgumentError, match="C-contiguous"):
        tpla.merge_by_lse_in_process([outs[0][:, ::2]], [lses[0][:, ::2]], 1)
    with pytest.raises(tpla.InvalidArgumentError, match="scalar"):
        tpla.merge_by_lse_in_process([np.zeros((), np.float32)], [np.zeros((), np.float32)], 1)
    with pytest.raises(tpla.OutOfRangeError, match="sequence shard 4 is out of range for 4"):
        tpla.rescale_by_gathered_lse(outs[0], 4, lses)
    with pytest.raises(tpla.InvalidArgumentError, match="gathered log-sum-exps hold no shard"):
        tpla.rescale_by_gathered_lse(outs[0], 0, [])
    with pytest.raises(tpla.InvalidArgumentError, match="bounds must be finite"):
        tpla.pack_against_bound(outs[0], lses[0], np.full((2, HEADS), np.inf))
    with pytest.raises(tpla.InvalidArgumentError, match="lies 1000 above its logit bound"):
        tpla.pack_against_bound(outs[0], lses[0] + 1000, bnds[0])
    with pytest.raises(tpla.InvalidArgumentError, match="bound has shape"):
        tpla.pack_against_bound(outs[0], lses[0], bnds[0][:1])
    with pytest.raises(tpla.InvalidArgumentError, match="packed must have shape"):
        tpla.pack_against_bound(outs[0], lses[0], bnds[0], packed=np.zeros((2, HEADS, D_V)))
    with pytest.raises(tpla.InvalidArgumentError, match=r"packed must have shape \[\.\.\., width \+ 2\]"):
        tpla.unpack_merged(np.zeros((2, 1)))
    with pytest.raises(tpla.InvalidArgumentError, match="more than 700 above"):
        tpla.unpack_merged(np.array([[1.0, 0.0, 1.0]]))
    # an entry without tokens on any shard merges to zeros
    np.testing.assert_array_equal(tpla.unpack_merged(np.zeros((2, 5))), np.zeros((2, 3)))

    # exports
    with pytest.raises(tpla.InvalidArgumentError, match="3 paths cannot be cut into 2 sequence"):
        tpla.export_shards([tmp_path / f"x{i}" for i in range(3)], d, m.transforms, [],
                           sharding=sh)
    with pytest.raises(tpla.InvalidArgumentError, match="1, 2, 4, 8"):
        tpla.export_shards([tmp_path / f"x{i}" for i in range(6)], d, m.transforms, [],
                           sharding=sh)
    assert not any(tmp_path.iterdir()), "a refused export left files behind"


def test_gpu_merge_error_words_raise_the_host_merge_errors():
    tpla.sequence_merge_error(0)
    for bits, text in [(1, "finite"), (2, "above its logit bound"), (4, "700 above")]:
        with pytest.raises(tpla.InvalidArgumentError, match=text):
            tpla.sequence_merge_error(bits)
