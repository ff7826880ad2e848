"""CPU torch tensors (bf16 caches, DLPack) and torch.distributed; skipped without torch.
The CUDA case is skipped without a GPU; it checks the clear error of a CUDA tensor
handed to the CPU path (the GPU path: test_cuda.py)."""

from __future__ import annotations

import numpy as np
import pytest

import tpla
from reference import decode_ref, rel_l2
from test_decode import engine, make_context

torch = pytest.importorskip("torch")


def test_cpu_torch_tensors_bf16_cache_and_bf16_queries():
    rng = np.random.default_rng(8)
    ctx, _ = make_context(rng)
    lens = [25, 70]
    pool, seqs, table, seqlens = engine(rng, ctx, lens, "bfloat16")
    kv = torch.from_numpy(pool.kv.copy()).view(torch.bfloat16)
    q = torch.randn(2, 1, 4, ctx.row_width).to(torch.bfloat16)
    plan = tpla.decode_plan(torch.from_numpy(seqlens), ctx)
    out, lse = tpla.decode(q, kv, torch.from_numpy(table), torch.from_numpy(seqlens), plan)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (2, 1, 4, ctx.plan.slice_width) and lse.shape == (2, 4, 1)
    ro, rl = decode_ref(pool, seqs, lens, q.float().numpy(), ctx.plan.slice_width, 0.2, ctx.mu(0))
    assert rel_l2(out.numpy(), ro) < 1e-2
    o16 = torch.empty(2, 1, 4, ctx.plan.slice_width, dtype=torch.bfloat16)
    tpla.decode(q, kv, torch.from_numpy(table), torch.from_numpy(seqlens), plan, out=o16)
    assert rel_l2(o16.float().numpy(), out.numpy()) < 1e-2
    with pytest.raises(ValueError, match="C-contiguous"):
        tpla.decode(q.transpose(0, 2).contiguous().transpose(0, 2), kv, torch.from_numpy(table),
                    torch.from_numpy(seqlens), plan)


def test_all_reduce_over_a_torch_process_group():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        t = torch.tensor([1.0, 2.0])
        assert tpla.all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_tensors_are_refused_clearly_by_the_cpu_path():
    rng = np.random.default_rng(1)
    ctx, _ = make_context(rng)
    pool, _, table, seqlens = engine(rng, ctx, [10])
    plan = tpla.decode_plan(seqlens, ctx)
    q = torch.randn(1, 1, 4, ctx.row_width, device="cuda")
    with pytest.raises(NotImplementedError, match="CUDA tensor"):
        tpla.decode(q, pool.kv, table, seqlens, plan)
