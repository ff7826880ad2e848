"""Exceptions of the tpla package.

Every error libtpla reports is a :class:`TplaError` carrying the C ABI's status name
(``status``, e.g. ``"TPLA_STATUS_INVALID_ARGUMENT"``) and libtpla's sentence
(``message``). Each kind also derives from the closest built-in exception, so
``except ValueError`` catches a wrong shape and ``except NotImplementedError`` a CUDA
tensor handed to the CPU-only build.
"""

from __future__ import annotations

__all__ = [
    "TplaError",
    "InvalidArgumentError",
    "UnsupportedError",
    "TplaIOError",
    "CorruptFileError",
    "MismatchError",
    "OutOfCapacityError",
    "OutOfRangeError",
    "BackendError",
]


class TplaError(Exception):
    """A libtpla error: ``status`` is the ``tpla_status`` name, ``message`` the reason."""

    status: str
    message: str

    def __init__(self, message: str, status: str = "TPLA_STATUS_INVALID_ARGUMENT") -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class InvalidArgumentError(TplaError, ValueError):
    """An argument is out of range or inconsistent (shape, dtype, stride, length...)."""


class UnsupportedError(TplaError, NotImplementedError):
    """A valid request this build or machine does not support (e.g. CUDA tensors)."""


class TplaIOError(TplaError, OSError):
    """An operating-system I/O failure."""


class CorruptFileError(TplaError, ValueError):
    """A file is truncated, corrupted or hostile."""


class MismatchError(TplaError, ValueError):
    """A file, cache or weights belong to another geometry, transform, group or dtype."""


class OutOfCapacityError(TplaError, MemoryError):
    """A fixed-size pool is full."""


class OutOfRangeError(TplaError, IndexError):
    """A sequence id, layer or position does not exist."""


class BackendError(TplaError, RuntimeError):
    """The accelerator runtime or the engine's communicator failed."""
