"""Unpickle a checkpoint without running anything from it: an allowlist of globals, each a local stand-in.

`pickle.load` imports and calls whatever a file names. This unpickler's `find_class` admits only the
globals that a numpy/JAX/Flax/scikit-learn checkpoint needs and hands back our own stand-ins for them,
so nothing is imported (numpy only; no JAX, Flax or scikit-learn) and the only callables a REDUCE,
NEWOBJ or OBJ opcode can reach are the functions and classes below, which check their arguments.
No numpy object is ever on the unpickler's stack (arrays and scalars are wrapped in `_Array` until
the load is finished), so BUILD and SETITEM opcodes only ever reach our own `__setstate__` methods.
Before any of that, `convert.pickle_scan` checks the opcode stream (protocol, sizes, memo, nesting,
shared references, trailing bytes), so the real unpickler only ever runs on a stream whose work and
memory are bounded; error messages show untrusted values through `brief` (a bounded repr) only.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

from convert.errors import CheckpointError, brief
from convert.pickle_scan import MAX_DEPTH, ScanRefused, scan

# Array element types a checkpoint may contain: numbers and bools, never objects, strings or records.
_DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
_PLAIN = (str, bytes, int, float, complex, bool, type(None))


class _Refused(Exception):
    """Something in the stream that a checkpoint never contains; becomes a CheckpointError."""


class _StandIn:
    """A named callable taking the place of an admitted global."""

    __slots__ = ("name", "_fn")

    def __init__(self, name: str, fn=None):
        self.name, self._fn = name, fn

    def __call__(self, *args, **kwargs):
        if self._fn is None or kwargs:
            raise _Refused(f"'{self.name}' called in a way numpy/JAX pickles never do")
        return self._fn(*args)

    def __setstate__(self, state):
        raise _Refused(f"BUILD on '{self.name}'")

    def __repr__(self) -> str:
        return f"<stand-in for {self.name}>"


class _DtypeSpec:
    """Stand-in for a numpy.dtype: a plain numeric dtype from the allowlist, byte order set by BUILD."""

    __slots__ = ("dtype", "_built")

    def __init__(self, code: str):
        self.dtype, self._built = np.dtype(code), False

    def __setstate__(self, state):
        if self._built or not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise _Refused(f"unexpected numpy dtype state {brief(state)}")
        endian, subarray, names, fields = state[1:5]
        extra = state[8] if len(state) == 9 else None  # version 4 adds metadata
        if endian not in ("<", ">", "|", "=") or (subarray, names, fields, extra) != (None,) * 4:
            raise _Refused(f"refusing structured or sub-array numpy dtype (state {brief(state)})")
        if endian in "<>":
            self.dtype = self.dtype.newbyteorder(endian)
        self._built = True


class _Array:
    """Stand-in for a numpy array or scalar while the load runs; `value()` gives the numpy object."""

    __slots__ = ("array", "scalar")

    def __init__(self, array: np.ndarray | None = None, scalar: bool = False):
        self.array, self.scalar = array, scalar

    def __setstate__(self, state):
        """ndarray.__setstate__'s tuple: ([version,] shape, dtype, is_fortran, rawdata)."""
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused(f"unexpected numpy array state {brief(state)}")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(fortran, bool):
            raise _Refused("unexpected numpy array state: is_fortran is not a bool")
        self.array = _from_bytes(raw, dtype, shape, "F" if fortran else "C")

    def value(self) -> np.ndarray | np.generic:
        if self.array is None:
            raise _Refused("a numpy array never received its data")
        return self.array[()] if self.scalar else self.array


def _from_bytes(raw, dtype, shape, order: str) -> np.ndarray:
    """Checked np.frombuffer: plain bytes of exactly the right length for a numeric dtype."""
    if not isinstance(dtype, _DtypeSpec):
        raise _Refused(f"array dtype is a {type(dtype).__name__}, not a numpy dtype")
    if not isinstance(shape, tuple) or len(shape) > 32 or any(type(d) is not int or d < 0 for d in shape):
        raise _Refused(f"bad array shape {brief(shape)}")
    if not isinstance(raw, bytes | bytearray):
        raise _Refused(f"array data is a {type(raw).__name__}, not bytes")
    if len(raw) != math.prod(shape) * dtype.dtype.itemsize:
        raise _Refused(f"array data of {len(raw)} bytes does not fit shape {shape} of {dtype.dtype}")
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)


def _dtype(code, align=False, copy=True) -> _DtypeSpec:
    """numpy.dtype(code, align, copy), for the codes in _DTYPE_CODES only."""
    if not isinstance(code, str) or code not in _DTYPE_CODES:
        raise _Refused(f"refusing numpy dtype {brief(code)}: only plain numeric dtypes are allowed, not objects")
    if not isinstance(align, bool) or not isinstance(copy, bool):
        raise _Refused("unexpected numpy dtype arguments")
    return _DtypeSpec(code)


def _reconstruct(subtype, shape, typecode) -> _Array:
    """numpy's _reconstruct(ndarray, (0,), b'b'): an empty array that BUILD then fills."""
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused("numpy _reconstruct called with unexpected arguments")
    return _Array()


def _scalar(dtype, data) -> _Array:
    """numpy's scalar(dtype, bytes) for a numpy scalar."""
    return _Array(_from_bytes(data, dtype, (), "C"), scalar=True)


def _frombuffer(buf, dtype, shape, order) -> _Array:
    """numpy's _frombuffer(buffer, dtype, shape, order): protocol-5 arrays with in-band data."""
    if order not in ("C", "F"):
        raise _Refused(f"unexpected array order {brief(order)}")
    return _Array(_from_bytes(buf, dtype, shape, order))


def _reconstruct_array(fun, args, arr_state, aval_state) -> _Array:
    """jax._src.array._reconstruct_array: a jax.Array rebuilt as the numpy array it holds."""
    if fun is not _RECONSTRUCT or not isinstance(args, tuple) or len(args) != 3:
        raise _Refused(f"jax array rebuilt by {brief(fun)} rather than numpy's _reconstruct")
    if not isinstance(aval_state, dict) or not all(isinstance(v, _PLAIN) for v in aval_state.values()):
        raise _Refused("unexpected jax array aval state")
    array = _reconstruct(*args)
    array.__setstate__(arr_state)
    return array


def _latin1(text, encoding) -> bytes:
    """_codecs.encode(text, 'latin1'): how pickle protocols 0-2 write a bytes object."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Refused("_codecs.encode called other than as pickle protocol 2 writes bytes")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise _Refused("_codecs.encode of text that is not latin-1") from None


def _empty_bytes(*args) -> bytes:
    """bytes(): how pickle protocol 2 writes b''."""
    if args:
        raise _Refused("bytes() called with arguments")
    return b""


class _FrozenDict(dict):
    """Stand-in for flax's FrozenDict; becomes a plain dict when the load finishes."""

    def __init__(self, *args, **kwargs):
        if kwargs or len(args) > 1 or (args and not isinstance(args[0], dict)):
            raise _Refused("FrozenDict built from something other than one dict")
        super().__init__(*args)

    def __setstate__(self, state):
        """The NEWOBJ + BUILD form: state {'_dict': {...}, '_hash': ...}, possibly as (None, slots)."""
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]
        if not isinstance(state, dict) or not isinstance(state.get("_dict"), dict) or self:
            raise _Refused("unexpected FrozenDict state")
        self.update(state["_dict"])


class ScalerStats:
    """The fitted state of a scikit-learn StandardScaler (mean_, scale_, var_, ...), without sklearn."""

    __slots__ = ("state",)

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _Refused("StandardScaler built with arguments")
        self = super().__new__(cls)
        self.state = {}
        return self

    def __setstate__(self, state):
        if self.state or not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _Refused("unexpected StandardScaler state")
        for key, value in state.items():
            value = value.value() if isinstance(value, _Array) else value
            if not isinstance(value, _PLAIN + (np.ndarray, np.generic)):
                raise _Refused(f"StandardScaler attribute {key!r} is a {type(value).__name__}")
            self.state[key] = value

    def get(self, name: str, default: Any = None) -> Any:
        """A fitted attribute such as 'mean_', 'scale_', 'with_std' or '_sklearn_version'."""
        return self.state.get(name, default)

    def __repr__(self) -> str:
        return f"ScalerStats({sorted(self.state)})"


_NDARRAY = _StandIn("numpy.ndarray")
_RECONSTRUCT = _StandIn("numpy._core.multiarray._reconstruct", _reconstruct)
_SCALAR = _StandIn("numpy._core.multiarray.scalar", _scalar)
_FROMBUFFER = _StandIn("numpy._core.numeric._frombuffer", _frombuffer)

# The whole allowlist: (module, name) as written in the pickle -> our stand-in.
ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _StandIn("numpy.dtype", _dtype),
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("jax._src.array", "_reconstruct_array"): _StandIn("jax._src.array._reconstruct_array", _reconstruct_array),
    ("flax.core.frozen_dict", "FrozenDict"): _FrozenDict,
    ("sklearn.preprocessing._data", "StandardScaler"): ScalerStats,
    # pickle protocol 2 writes bytes as _codecs.encode(latin-1 text) and b'' as bytes()
    ("_codecs", "encode"): _StandIn("_codecs.encode", _latin1),
    ("__builtin__", "bytes"): _StandIn("bytes", _empty_bytes),
    ("builtins", "bytes"): _StandIn("bytes", _empty_bytes),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class returns stand-ins from ALLOWED_GLOBALS and refuses all else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"refusing to load global '{str(module)[:100]}.{str(name)[:100]}' from {self.source}: "
                "checkpoints may only contain arrays, dicts and a StandardScaler"
            ) from None

    def persistent_load(self, pid):
        raise CheckpointError(f"refusing persistent id in {self.source}: checkpoints never contain one")


def _resolve(obj: Any, where: tuple, depth: int, memo: dict[int, Any]) -> Any:
    """Replace stand-ins by plain values (numpy arrays, dicts) and refuse anything else.

    `where` is the path as a chain (parent, key), formatted only for an error; `memo` maps each container
    already resolved to its result, so a shared one is walked once and stays shared.
    """
    if isinstance(obj, _PLAIN) or isinstance(obj, ScalerStats):
        return obj
    if isinstance(obj, _Array):
        return obj.value()
    if depth > MAX_DEPTH:
        raise _Refused(f"containers nested more than {MAX_DEPTH} deep (or a cycle) at {_path(where)}")
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = {k: _resolve(v, (where, k), depth + 1, memo) for k, v in obj.items()}  # keys: names (pickle_scan)
    elif type(obj) in (list, tuple):
        out = type(obj)(_resolve(v, (where, i), depth + 1, memo) for i, v in enumerate(obj))
    else:
        raise _Refused(f"unexpected {type(obj).__name__} object at {_path(where)}")
    memo[id(obj)] = out
    return out


def _path(where: tuple) -> str:
    """'params/params/final_norm[2]' from the chain _resolve keeps."""
    parts = []
    while where:
        where, key = where
        parts.append(f"[{key}]" if isinstance(key, int) else f"/{key}")
    return "".join(reversed(parts)).lstrip("/") or "top"


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle `data` admitting only ALLOWED_GLOBALS; returns plain containers and numpy arrays.

    The opcode stream is checked first (convert.pickle_scan); nothing is built from a stream it refuses.
    """
    try:
        scan(data)
        raw = _RestrictedUnpickler(io.BytesIO(data), source).load()
        return _resolve(raw, (), 0, {})
    except CheckpointError:
        raise
    except (ScanRefused, _Refused) as e:
        raise CheckpointError(f"refusing to load {source}: {e}") from None
    except Exception as e:  # truncated, corrupt or not a pickle at all (pickletools and pickle say which)
        raise CheckpointError(
            f"cannot unpickle {source} ({type(e).__name__}: {str(e)[:200]}); is it a complete checkpoint file?"
        ) from None
