"""libtpla from Python: MLA decode attention under Tensor-Parallel Latent Attention.

A serving engine owns its KV cache (pages from its block allocator); libtpla keeps no
cache state. Per rank, a :class:`RankContext` holds the absorbed weights of every layer
(``W'_UK``, ``W'_UV``, mu, the transform ``U``). Per step, as with FlashMLA::

    plan = tpla.decode_plan(cache_seqlens, ctx)           # once per step (get_mla_metadata)
    for layer in range(ctx.layers):
        tpla.append(kv_c, k_pe, kv_cache[layer], slot_mapping, context=ctx, layer=layer)
        out, lse = tpla.decode(q, kv_cache[layer], block_table, cache_seqlens, plan,
                               layer=layer)               # flash_mla_with_kvcache
        # combine the ranks: tpla.all_reduce(out_heads, group) (project=True outputs)

Tensor shapes follow ``flash_mla_with_kvcache``:

* ``q`` ``[batch, 1, heads, slice_width + d_r]`` float32 or bfloat16: per head, the
  absorbed latent query (this rank's slice, rotated basis) then the RoPE query. With
  ``q_rope=`` given, ``q`` is the latent part alone, or with ``absorb=True`` ``q_nope``
  ``[batch, 1, heads, d_n]`` that the context multiplies by ``W'_UK``.
* ``kv_cache`` ``[num_pages, page_size, 1, slice_width + d_r]`` bfloat16, float16 or
  float32 (NumPy users pass bfloat16 bits as uint16 with ``kv_dtype="bfloat16"``), or
  uint8 ``[num_pages, page_size, 1, row_bytes]`` FP8 rows with
  ``kv_dtype="fp8_e4m3"`` (e4m3 codes, one float32 scale per 128 of them, the bfloat16
  RoPE key); pages may be padded (any page stride of at least a page), rows must be
  contiguous.
* ``block_table`` ``[batch, max_pages]`` int32, ``cache_seqlens`` ``[batch]`` int32.
* returns ``out`` ``[batch, 1, heads, slice_width]`` (``project=True``: the rank's partial
  head outputs ``[batch, 1, heads, d_v]``, to be summed over ranks) and ``lse``
  ``[batch, heads, 1]`` float32 (``None`` with ``project=True``). Pass ``out=``/``lse=``
  to write into your own buffers (float32, or bfloat16 ``out``) without allocating.

Arrays are read in place, never copied (bfloat16 queries are widened to float32 in a
reused buffer): NumPy arrays and anything with the buffer protocol, CPU torch tensors
and other DLPack producers, objects with ``__array_interface__``. Wrong dtypes, shapes,
strides or devices raise :class:`InvalidArgumentError` (or :class:`UnsupportedError` for
CUDA tensors given to the CPU path); every libtpla error is a :class:`TplaError` with the
``tpla_status`` name. Bad page indices or slots found while reading are not errors: the
entries concerned hold NaN (or are skipped) and ``ctx.last_faults`` has :class:`Faults`
bits.

On the GPU (torch CUDA tensors), a :class:`DeviceEngine` made from the context runs the
same step on the engine's device pool, on torch's current stream, with no host
synchronisation (capturable in ``torch.cuda.graphs``)::

    engine = tpla.DeviceEngine(ctx, device=0)           # kernels + weights on cuda:0
    plan = tpla.decode_plan(cache_seqlens, engine, block_table_width=block_table.shape[1])
    for layer in range(engine.layers):
        tpla.append(kv_c, k_pe, kv_cache[layer], slot_mapping, context=engine, layer=layer)
        rows = engine.absorb_queries(q_nope, q_pe, layer=layer)      # W'_UK, scaled
        out, lse = tpla.decode(rows, kv_cache[layer], block_table, cache_seqlens, plan,
                               layer=layer)

There ``kv_cache`` is ``[num_pages, 64, 1, slice_width + d_r]`` bfloat16 (or, for an engine
made with ``kv_dtype="fp8_e4m3"`` on a Hopper GPU, uint8 FP8 rows as on the CPU), ``block_table``,
``cache_seqlens`` and ``slot_mapping`` int32, and the query rows float32, already scaled
(:meth:`DeviceEngine.query_scales`). Faults are OR-ed into an optional int32 CUDA tensor
(``faults=``), read whenever the caller synchronises. :func:`cuda_enabled` says whether
this build has the GPU path; without a GPU or driver, ``DeviceEngine(...)`` raises
:class:`UnsupportedError`.

Sequence shards (exact decode, and hybrids of ``g`` latent groups times ``s`` sequence
shards): a :class:`SequenceSharding` spreads a sequence's tokens over ``s`` shards in
blocks of ``interleave`` tokens, a :class:`HybridPlan` names rank ``group * s + shard``.
Each rank keeps its tokens in a libtpla-owned :class:`RankCache`, decodes them with log-sum-exps
and the ranks merge exactly::

    export_shards(paths, dims, transforms, prefill, sharding=sh)   # g * s files, v2
    cache = tpla.RankCache(ctx, plan=hplan, capacity_pages=...)
    cache.register_file(paths[hplan.rank])                         # another rank's: MismatchError
    if hplan.holds(t):                                             # sh.owner(t) == hplan.shard
        ctx.append_token(cache, seq, a_t, k_pe, position=t, layer=layer)
    out, lse, _ = ctx.decode_sequence_shard(cache, seqs, q, layer=layer)
    tpla.merge_by_lse_in_process(outs, lses, shards=s)             # (a); or, per rank,
    # rescale_by_gathered_lse after an all-gather of lse, then all_reduce (the engines')
    # (b): decode_sequence_shard(..., rope_key_norm=) gives bounds; merge_packed_in_process,
    # or pack_against_bound / an all-reduce of float64 / unpack_merged per rank
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional

from . import errors
from ._tpla import (
    DecodePlan,
    DeviceEngine,
    DevicePlan,
    HybridPlan,
    ModelDims,
    RankCache,
    RankContext,
    SequenceSharding,
    ShardCache,
    ShardPlan,
    Transform,
    __version__,
    all_reduce_in_process,
    append,
    cpu_kernels,
    cuda_enabled,
    decode,
    decode_plan,
    export_shards,
    merge_by_lse_in_process,
    merge_packed_in_process,
    pack_against_bound,
    packed_row_len,
    presets,
    rescale_by_gathered_lse,
    sequence_merge_error,
    unpack_merged,
)
from .errors import (
    BackendError,
    CorruptFileError,
    InvalidArgumentError,
    MismatchError,
    OutOfCapacityError,
    OutOfRangeError,
    TplaError,
    TplaIOError,
    UnsupportedError,
)

__all__ = [
    "BackendError",
    "CorruptFileError",
    "DecodePlan",
    "DeviceEngine",
    "DevicePlan",
    "Faults",
    "HybridPlan",
    "InvalidArgumentError",
    "MismatchError",
    "ModelDims",
    "OutOfCapacityError",
    "OutOfRangeError",
    "RankCache",
    "RankContext",
    "SequenceSharding",
    "ShardCache",
    "ShardPlan",
    "TplaError",
    "TplaIOError",
    "Transform",
    "UnsupportedError",
    "__version__",
    "all_reduce",
    "all_reduce_in_process",
    "append",
    "cpu_kernels",
    "cuda_enabled",
    "decode",
    "decode_plan",
    "errors",
    "export_shards",
    "merge_by_lse_in_process",
    "merge_packed_in_process",
    "pack_against_bound",
    "packed_row_len",
    "presets",
    "rescale_by_gathered_lse",
    "sequence_merge_error",
    "unpack_merged",
]


class Faults(enum.IntFlag):
    """Bits of ``RankContext.last_faults`` (the C ABI's ``tpla_fault``)."""

    NONE = 0
    #: A block table entry outside ``0..num_pages``, or a length needing more pages than
    #: the table's width: that batch entry's outputs and lse are NaN.
    BAD_PAGE = 1
    #: A slot at or past ``num_pages * page_size``: that token was not written.
    BAD_SLOT = 2
    #: (GPU) an appended value that is not finite or beyond bfloat16: not written.
    BAD_VALUE = 4
    #: (GPU) a decode whose workspace was planned for another launch: NaN outputs.
    BAD_PLAN = 8


def all_reduce(
    tensor: Any,
    group: Any = None,
    communicator: Optional[Callable[[Any], Any]] = None,
) -> Any:
    """Sums this rank's partial outputs over the ranks, in place, and returns the tensor.

    The ranks' partial head outputs (``decode(..., project=True)``) add up to the layer's
    attention output: the TPLA all-reduce. With a torch tensor this is
    ``torch.distributed.all_reduce(tensor, group=group)`` on the process group ``group``
    (``None``: the default group), the communicator a torch engine already has. Any
    other array is handed to ``communicator(tensor)``, which must replace it in place by
    the sum over ranks (e.g. an MPI ``Allreduce`` with ``MPI.IN_PLACE``). Several ranks in
    one process: :func:`all_reduce_in_process`.
    """
    if communicator is not None:
        communicator(tensor)
        return tensor
    if type(tensor).__module__.startswith("torch"):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise InvalidArgumentError(
                "torch.distributed is not initialised: call "
                "torch.distributed.init_process_group first, or pass communicator=",
                "TPLA_STATUS_INVALID_ARGUMENT",
            )
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor
    raise InvalidArgumentError(
        f"all_reduce of a {type(tensor).__name__} needs communicator= (a torch tensor "
        "uses torch.distributed)",
        "TPLA_STATUS_INVALID_ARGUMENT",
    )
