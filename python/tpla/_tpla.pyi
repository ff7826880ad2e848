"""Type stubs of the native module (tpla._tpla); see the package docstring."""

from os import PathLike
from typing import Any, Literal, Optional, Sequence, Tuple, Union, overload

__version__: str

ArrayLike = Any  # NumPy array, CPU torch tensor, buffer / __array_interface__ / DLPack
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

class ShardCache:
    def __init__(
        self, context: RankContext, *, dtype: str = "bfloat16", page_size: int = 64
    ) -> None: ...
    def register_file(self, path: StrPath) -> list[int]: ...
    def sequence_ids(self) -> list[int]: ...
    def seq_len(self, seq: int, layer: int) -> int: ...

def decode_plan(cache_seqlens: ArrayLike, context: RankContext) -> DecodePlan: ...
@overload
def decode(
    q: ArrayLike,
    kv_cache: ArrayLike,
    block_table: ArrayLike,
    cache_seqlens: ArrayLike,
    plan: DecodePlan,
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
) -> Tuple[Any, Any]: ...
@overload
def decode(
    q: ArrayLike,
    kv_cache: ArrayLike,
    block_table: ArrayLike,
    cache_seqlens: ArrayLike,
    plan: DecodePlan,
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
) -> Tuple[Any, None]: ...
def append(
    kv_c: ArrayLike,
    k_pe: ArrayLike,
    kv_cache: ArrayLike,
    slot_mapping: ArrayLike,
    *,
    context: RankContext,
    layer: int = 0,
    rms: Literal["exact", "sliced"] = "exact",
    kv_dtype: Optional[str] = None,
) -> int: ...
def export_shards(
    paths: Sequence[StrPath],
    dims: ModelDims,
    transforms: Sequence[Transform],
    sequences: list[Tuple[int, ArrayLike, ArrayLike]],
    *,
    dtype: str = "bfloat16",
    page_size: int = 64,
) -> None: ...
def all_reduce_in_process(buffers: list[ArrayLike]) -> None: ...
def cpu_kernels() -> list[str]: ...
def presets() -> list[str]: ...
