"""Type stubs of the native module (tpla._tpla); see the package docstring."""

from os import PathLike
from typing import Any, Literal, Optional, Sequence, Tuple, Union, overload

__version__: str

ArrayLike = Any  # NumPy array, CPU torch tensor, buffer / __array_interface__ / DLPack
CudaTensor = Any  # torch CUDA tensor, or DLPack (device CUDA) / __cuda_array_interface__
StrPath = Union[str, PathLike[str]]

class ModelDims:
    def __init__(
        self, heads: int, d_c: int, d_r: int, d_n: int, d_v: int, softmax_scale: float
    ) -> None: ...
    @staticmethod
    def preset(name: str) -> ModelDims: ...
    @property
    def heads(self) -> int: ...
    @property
    def d_c(self) -> int: ...
    @property
    def d_r(self) -> int: ...
    @property
    def d_n(self) -> int: ...
    @property
    def d_v(self) -> int: ...
    @property
    def softmax_scale(self) -> float: ...

class ShardPlan:
    def __init__(self, dims: ModelDims, groups: int, group: int) -> None: ...
    @staticmethod
    def with_head_split(dims: ModelDims, ranks: int, groups: int, rank: int) -> ShardPlan: ...
    @property
    def groups(self) -> int: ...
    @property
    def group(self) -> int: ...
    @property
    def ranks(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def head_start(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def slice_start(self) -> int: ...
    @property
    def slice_width(self) -> int: ...
    def row_width(self, dims: ModelDims) -> int: ...

class Transform:
    @staticmethod
    def identity(d_c: int) -> Transform: ...
    @staticmethod
    def hadamard(d_c: int, seed: int = 0) -> Transform: ...
    @staticmethod
    def pca(
        latents: ArrayLike, groups: int, layout: Literal["contiguous", "interleaved"] = "contiguous"
    ) -> Transform: ...
    @property
    def kind(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def fingerprint(self) -> int: ...
    def rotate(self, x: ArrayLike) -> Any: ...
    def rotate_back(self, x: ArrayLike) -> Any: ...
    def matrix(self) -> Any: ...

class DecodePlan:
    @property
    def batch(self) -> int: ...
    @property
    def context(self) -> RankContext: ...
    def words(self) -> list[int]: ...
    def __len__(self) -> int: ...

class RankContext:
    def __init__(
        self,
        dims: ModelDims,
        plan: ShardPlan,
        layers: int,
        *,
        threads: Optional[int] = None,
        kernel: str = "auto",
        backend: Literal["cpu", "reference", "cuda"] = "cpu",
    ) -> None: ...
    @staticmethod
    def from_weights_file(
        path: StrPath,
        *,
        threads: Optional[int] = None,
        kernel: str = "auto",
        backend: Literal["cpu", "reference", "cuda"] = "cpu",
    ) -> RankContext: ...
    def set_layer(
        self,
        index: int,
        w_uk: ArrayLike,
        w_uv: ArrayLike,
        gamma: ArrayLike,
        transform: Transform,
        *,
        mu: float = 1.0,
        slice_fraction: Optional[float] = None,
    ) -> None: ...
    def install_layer(
        self,
        index: int,
        w_uk: ArrayLike,
        w_uv: ArrayLike,
        transform: Transform,
        *,
        mu: float = 1.0,
        slice_fraction: Optional[float] = None,
    ) -> None: ...
    def save_weights(self, path: StrPath) -> str: ...
    @property
    def dims(self) -> ModelDims: ...
    @property
    def plan(self) -> ShardPlan: ...
    @property
    def layers(self) -> int: ...
    @property
    def backend(self) -> str: ...
    @property
    def row_width(self) -> int: ...
    @property
    def last_faults(self) -> int: ...
    def transform(self, index: int) -> Transform: ...
    def mu(self, index: int) -> float: ...
    def reserve(self, max_batch: int) -> None: ...
    def decode_plan(self, cache_seqlens: ArrayLike) -> DecodePlan: ...
    def append(
        self,
        kv_c: ArrayLike,
        k_pe: ArrayLike,
        kv_cache: ArrayLike,
        slot_mapping: ArrayLike,
        *,
        layer: int = 0,
        rms: Literal["exact", "sliced"] = "exact",
        kv_dtype: Optional[str] = None,
    ) -> int: ...
    def import_sequence(
        self,
        source: ShardCache,
        seq: int,
        layer: int,
        kv_cache: ArrayLike,
        slots: ArrayLike,
        *,
        kv_dtype: Optional[str] = None,
    ) -> int: ...
    def append_token(
        self,
        cache: RankCache,
        seq: int,
        latent: ArrayLike,
        k_rope: ArrayLike,
        *,
        position: Optional[int] = None,
        layer: int = 0,
        rms: Literal["exact", "sliced"] = "exact",
    ) -> None: ...
    def decode_sequence_shard(
        self,
        cache: RankCache,
        seqs: Sequence[int],
        q: ArrayLike,
        *,
        layer: int = 0,
        q_rope: Optional[ArrayLike] = None,
        absorb: bool = False,
        project: bool = True,
        out: Optional[ArrayLike] = None,
        lse: Optional[ArrayLike] = None,
        rope_key_norm: Optional[float] = None,
        bounds: Optional[ArrayLike] = None,
    ) -> Tuple[Any, Any, Optional[Any]]: ...

class SequenceSharding:
    def __init__(self, shards: int, interleave: int = 1) -> None: ...
    @property
    def shards(self) -> int: ...
    @property
    def interleave(self) -> int: ...
    def owner(self, position: int) -> int: ...
    def tokens_on(self, shard: int, length: int) -> int: ...
    def local_index(self, position: int) -> int: ...
    def position_of(self, shard: int, local: int) -> int: ...

class HybridPlan:
    def __init__(
        self, dims: ModelDims, groups: int, sharding: SequenceSharding, rank: int
    ) -> None: ...
    @property
    def latent(self) -> ShardPlan: ...
    @property
    def sharding(self) -> SequenceSharding: ...
    @property
    def shard(self) -> int: ...
    @property
    def group(self) -> int: ...
    @property
    def groups(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def ranks(self) -> int: ...
    def owner_rank(self, group: int, position: int) -> int: ...
    def holds(self, position: int) -> bool: ...
    def bytes_per_token(self, dims: ModelDims, dtype: str = "bfloat16") -> float: ...

class RankCache:
    def __init__(
        self,
        context: RankContext,
        *,
        plan: Optional[HybridPlan] = None,
        dtype: str = "bfloat16",
        page_size: int = 64,
        capacity_pages: int = 0,
    ) -> None: ...
    def register_file(self, path: StrPath) -> list[int]: ...
    def add_sequence(self, seq: int) -> None: ...
    def free_sequence(self, seq: int) -> None: ...
    def sequence_ids(self) -> list[int]: ...
    def seq_len(self, seq: int, layer: int = 0) -> int: ...
    @property
    def capacity_pages(self) -> int: ...
    @property
    def free_pages(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def page_size(self) -> int: ...
    @property
    def layers(self) -> int: ...
    @property
    def row_width(self) -> int: ...
    @property
    def groups(self) -> int: ...
    @property
    def group(self) -> int: ...
    @property
    def sharding(self) -> SequenceSharding: ...
    @property
    def shard(self) -> int: ...
    @property
    def is_sequence_shard(self) -> bool: ...

class ShardCache:
    def __init__(
        self, context: RankContext, *, dtype: str = "bfloat16", page_size: int = 64
    ) -> None: ...
    def register_file(self, path: StrPath) -> list[int]: ...
    def sequence_ids(self) -> list[int]: ...
    def seq_len(self, seq: int, layer: int) -> int: ...

class DevicePlan:
    """A GPU step's plan: the workspace tensor for one batch size and block table width."""

    @property
    def batch(self) -> int: ...
    @property
    def block_table_width(self) -> int: ...
    @property
    def workspace(self) -> CudaTensor: ...
    @property
    def workspace_bytes(self) -> int: ...
    @property
    def engine(self) -> DeviceEngine: ...

class DeviceEngine:
    """A rank's decode/append kernels and weights on one GPU (no cache state).

    Every call is enqueued on ``stream`` (a ``CUstream`` as an int; default: torch's
    current stream of the engine's device) without host synchronisation, so it can be
    captured in ``torch.cuda.graphs``. Raises UnsupportedError without CUDA. ``kv_dtype``
    is the row type of the pools ``decode`` reads: "bfloat16", or "fp8_e4m3" (uint8 rows;
    a Hopper GPU) — appends and row copies take either.
    """

    def __init__(
        self,
        context: RankContext,
        device: int = 0,
        *,
        kv_dtype: Literal["bfloat16", "fp8_e4m3"] = "bfloat16",
    ) -> None: ...
    @property
    def device(self) -> int: ...
    @property
    def kv_dtype(self) -> str: ...
    @property
    def device_name(self) -> str: ...
    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def slice_width(self) -> int: ...
    @property
    def row_width(self) -> int: ...
    def query_scales(self, layer: int = 0) -> Tuple[float, float]: ...
    def splits(self, batch: int, block_table_width: int) -> int: ...
    def workspace_bytes(self, batch: int, block_table_width: int) -> int: ...
    def plan(
        self,
        cache_seqlens: CudaTensor,
        block_table_width: int,
        *,
        workspace: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> DevicePlan: ...
    def decode(
        self,
        q: CudaTensor,
        kv_cache: CudaTensor,
        block_table: CudaTensor,
        cache_seqlens: CudaTensor,
        plan: DevicePlan,
        *,
        layer: int = 0,
        out: Optional[CudaTensor] = None,
        lse: Optional[CudaTensor] = None,
        kv_dtype: Optional[str] = None,
        faults: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> Tuple[CudaTensor, CudaTensor]: ...
    def append(
        self,
        kv_c: CudaTensor,
        k_pe: CudaTensor,
        kv_cache: CudaTensor,
        slot_mapping: CudaTensor,
        *,
        layer: int = 0,
        rms: Literal["exact", "sliced"] = "exact",
        kv_dtype: Optional[str] = None,
        faults: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> None: ...
    def absorb_queries(
        self,
        q_nope: CudaTensor,
        q_rope: CudaTensor,
        *,
        layer: int = 0,
        out: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> CudaTensor: ...
    def copy_rows(
        self,
        dst: CudaTensor,
        dst_slots: CudaTensor,
        src: CudaTensor,
        src_slots: CudaTensor,
        *,
        kv_dtype: Optional[str] = None,
        faults: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> None: ...
    def project(
        self,
        latent: CudaTensor,
        *,
        layer: int = 0,
        out: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> CudaTensor: ...
    def sequence_rescale(
        self, out: CudaTensor, gathered: CudaTensor, *, shard: int, stream: Optional[int] = None
    ) -> None: ...
    def sequence_bounds(
        self,
        q: CudaTensor,
        *,
        rope_key_norm: float,
        out: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> CudaTensor: ...
    def sequence_pack(
        self,
        out: CudaTensor,
        lse: CudaTensor,
        bound: CudaTensor,
        *,
        error: CudaTensor,
        packed: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> CudaTensor: ...
    def sequence_unpack(
        self,
        packed: CudaTensor,
        *,
        error: CudaTensor,
        out: Optional[CudaTensor] = None,
        stream: Optional[int] = None,
    ) -> CudaTensor: ...

@overload
def decode_plan(cache_seqlens: ArrayLike, context: RankContext) -> DecodePlan: ...
@overload
def decode_plan(
    cache_seqlens: CudaTensor,
    context: DeviceEngine,
    *,
    block_table_width: int,
    workspace: Optional[CudaTensor] = None,
    stream: Optional[int] = None,
) -> DevicePlan: ...
@overload
def decode(
    q: ArrayLike,
    kv_cache: ArrayLike,
    block_table: ArrayLike,
    cache_seqlens: ArrayLike,
    plan: Union[DecodePlan, DevicePlan],
    softmax_scale: Optional[float] = None,
    *,
    layer: int = 0,
    mu: Optional[float] = None,
    q_rope: Optional[ArrayLike] = None,
    absorb: bool = False,
    project: Literal[False] = False,
    out: Optional[ArrayLike] = None,
    lse: Optional[ArrayLike] = None,
    kv_dtype: Optional[str] = None,
    faults: Optional[CudaTensor] = None,
    stream: Optional[int] = None,
) -> Tuple[Any, Any]: ...
@overload
def decode(
    q: ArrayLike,
    kv_cache: ArrayLike,
    block_table: ArrayLike,
    cache_seqlens: ArrayLike,
    plan: Union[DecodePlan, DevicePlan],
    softmax_scale: Optional[float] = None,
    *,
    layer: int = 0,
    mu: Optional[float] = None,
    q_rope: Optional[ArrayLike] = None,
    absorb: bool = False,
    project: Literal[True],
    out: Optional[ArrayLike] = None,
    lse: None = None,
    kv_dtype: Optional[str] = None,
    faults: Optional[CudaTensor] = None,
    stream: Optional[int] = None,
) -> Tuple[Any, None]: ...
def append(
    kv_c: ArrayLike,
    k_pe: ArrayLike,
    kv_cache: ArrayLike,
    slot_mapping: ArrayLike,
    *,
    context: Union[RankContext, DeviceEngine],
    layer: int = 0,
    rms: Literal["exact", "sliced"] = "exact",
    kv_dtype: Optional[str] = None,
    faults: Optional[CudaTensor] = None,
    stream: Optional[int] = None,
) -> Optional[int]: ...
def export_shards(
    paths: Sequence[StrPath],
    dims: ModelDims,
    transforms: Sequence[Transform],
    sequences: list[Tuple[int, ArrayLike, ArrayLike]],
    *,
    dtype: str = "bfloat16",
    page_size: int = 64,
    sharding: Optional[SequenceSharding] = None,
) -> None: ...
def all_reduce_in_process(buffers: list[ArrayLike]) -> None: ...
def merge_by_lse_in_process(outs: list[ArrayLike], lses: list[ArrayLike], shards: int) -> None: ...
def merge_packed_in_process(
    outs: list[ArrayLike], lses: list[ArrayLike], bounds: list[ArrayLike], shards: int
) -> None: ...
def rescale_by_gathered_lse(out: ArrayLike, shard: int, gathered: list[ArrayLike]) -> None: ...
def pack_against_bound(
    out: ArrayLike, lse: ArrayLike, bound: ArrayLike, *, packed: Optional[ArrayLike] = None
) -> Any: ...
def unpack_merged(packed: ArrayLike, *, out: Optional[ArrayLike] = None) -> Any: ...
def sequence_merge_error(bits: int) -> None: ...
def packed_row_len(width: int) -> int: ...
def cpu_kernels() -> list[str]: ...
def cuda_enabled() -> bool: ...
def presets() -> list[str]: ...
