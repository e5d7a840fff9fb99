"""torch.save files read as data: nothing in a file is ever imported or called.

A torch checkpoint is a zip archive: `<archive>/data.pkl`, a pickle of the saved object, and
`<archive>/data/<key>`, the raw bytes of each tensor storage (stored uncompressed, so they are
memory-mapped here, not read). Pickle is a small program: GLOBAL names an object to import and
REDUCE calls it. This reader runs that program with its own `find_class`, the only way a pickle
reaches any Python object:

- tensors, storages, torch dtypes and sizes, numpy arrays, scalars and dtypes, and a few builtin
  containers resolve to small wrappers that check their arguments before building the value;
- names from the families that run code (os/posix/nt, subprocess, builtins eval/exec/compile/
  __import__/getattr/open, runpy, importlib, pickle loads, ...: `CODE_RUNNING`) make the file
  refused with "this file tries to run code" and the name, before anything of it is called;
- every other name becomes an inert placeholder class (`Opaque`), created here and never
  imported: calling it, instantiating it (NEWOBJ), setting its state (BUILD) or filling it
  (SETITEMS, APPENDS) only records the arguments. Class references and objects of unknown
  classes (a Lightning callback keyed by its class, an OmegaConf config) load as opaque values.

Why not torch.load(weights_only=True): it refuses every global outside its allow-list, so files
that hold such harmless objects next to their tensors cannot be loaded at all.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnpickleError(ValueError):
    """The pickle is malformed, or builds something other than data."""


class CodeRunningPickle(UnpickleError):
    """The pickle names a callable that runs code."""

    def __init__(self, name: str) -> None:
        super().__init__(f"this file tries to run code: it calls {name}")
        self.name = name


# Callables that execute code, start processes, touch files or import modules: a file that
# names one is refused outright (it is malicious or broken; an inert placeholder would hide it).
# Modules listed with no names: every name in them (and in their submodules).
CODE_RUNNING: dict[str, tuple[str, ...]] = {
    "os": (), "posix": (), "nt": (), "subprocess": (), "runpy": (), "importlib": (), "pty": (), "shutil": (),
    "ctypes": (), "socket": (), "code": (), "codeop": (), "marshal": (), "sys": (), "webbrowser": (),
    "multiprocessing": (), "asyncio": (), "_posixsubprocess": (), "pydoc": (),
    **{b: ("eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "input",
                 "breakpoint", "globals", "locals", "vars", "help", "exit", "quit", "memoryview")
       for b in ("builtins", "__builtin__")},  # __builtin__: protocol 0-2 pickles from Python 2
    "pickle": ("loads", "load", "Unpickler", "_loads", "_load"), "_pickle": (), "cPickle": (), "dill": (),
    "types": ("FunctionType", "CodeType", "MethodType", "LambdaType", "ModuleType"),
    "operator": ("attrgetter", "methodcaller"),
    "functools": ("partial", "reduce"),
    "torch": ("load", "compile", "jit", "hub"), "torch.serialization": ("load",), "torch.hub": (),
    "torch.jit": (), "numpy": ("load", "loadtxt", "fromfile", "genfromtxt"), "timeit": (), "platform": (), "commands": (),
}


def _code_running(module: str, name: str) -> bool:
    names = CODE_RUNNING.get(module)
    if names is not None and (not names or name in names):
        return True
    root = module.partition(".")[0]
    return root != module and CODE_RUNNING.get(root) == ()


# ---------------------------------------------------------------------------------------------
# Placeholders
# ---------------------------------------------------------------------------------------------


class Opaque:
    """An object of a class this reader does not know. Subclasses are made per global name
    (`module`, `qualname`) and are themselves the placeholder for a class reference. Nothing
    here calls anything it was given."""

    module = ""
    qualname = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = object.__new__(cls)
        object.__setattr__(obj, "_args", args)
        object.__setattr__(obj, "_state", None)
        object.__setattr__(obj, "_items", [])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD
        object.__setattr__(self, "_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict subclass
        self._items.append((key, value))

    def append(self, value: Any) -> None:  # APPEND(S) on a list subclass
        self._items.append(value)

    def extend(self, values: Any) -> None:
        self._items.extend(values)

    def add(self, value: Any) -> None:  # ADDITEMS on a set subclass
        self._items.append(value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("opaque checkpoint object")

    def __repr__(self) -> str:
        return f"<opaque {self.module}.{self.qualname}>"

    @classmethod
    def full_name(cls) -> str:
        return f"{cls.module}.{cls.qualname}"


def is_opaque(obj: object) -> bool:
    return isinstance(obj, Opaque) or (isinstance(obj, type) and issubclass(obj, Opaque) and obj is not Opaque)


def opaque_class_name(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    assert issubclass(cls, Opaque)
    return cls.full_name()


# ---------------------------------------------------------------------------------------------
# Data the reader builds: each wrapper checks its arguments, then builds a value
# ---------------------------------------------------------------------------------------------


class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: only a dtype, not callable."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


_STORAGE_TYPES = {
    "UntypedStorage": torch.uint8, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
    "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
    torch.bfloat16, torch.bool, torch.complex64, torch.complex128)}


def _int_tuple(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list, torch.Size)) or not all(isinstance(v, int) and v >= 0 for v in x):
        raise UnpickleError(f"tensor {what} is not a tuple of non-negative integers")
    return tuple(x)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object, *_: object) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2): a view of a storage; requires_grad, backward hooks
    (callables) and metadata are dropped, only the values are used."""
    if not isinstance(storage, torch.storage.TypedStorage) or not isinstance(offset, int):
        raise UnpickleError("a tensor refers to something other than a storage")
    t = torch.empty((0,), dtype=storage.dtype)
    # set_ checks that the view stays inside the storage
    return t.set_(storage._untyped_storage, offset, _int_tuple(size, "size"), _int_tuple(stride, "stride"))


def _rebuild_parameter(data: object, *_: object) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnpickleError("a parameter holds no tensor")
    return data


def _np_reconstruct(subtype: object, shape: object, dtype: object) -> object:
    # numpy's own _reconstruct makes an empty array; ndarray.__setstate__ (BUILD) fills it
    if subtype is not _NDARRAY:
        return _placeholder("numpy", "ndarray subclass")()
    return np.ndarray.__new__(np.ndarray, (0,), dtype=np.uint8)


def _np_scalar(dtype: object, data: object = None) -> object:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnpickleError("a numpy scalar that is not plain data")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    if not isinstance(spec, str):
        raise UnpickleError("a numpy dtype that is not named by a string")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # how protocol-2 pickles write bytes: _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnpickleError("_codecs.encode called with something other than text")
    return text.encode(str(encoding))


_NDARRAY = object()  # numpy.ndarray as an argument of _reconstruct; never callable

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice, ("builtins", "range"): range,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _np_dtype,
    **{(m, "_reconstruct"): _np_reconstruct for m in _NUMPY_MODULES},
    **{(m, "scalar"): _np_scalar for m in _NUMPY_MODULES},
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_TYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}

_PLACEHOLDERS: dict[tuple[str, str], type[Opaque]] = {}


def _placeholder(module: str, name: str) -> type[Opaque]:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name.rpartition(".")[2] or "Opaque", (Opaque,), {"module": module, "qualname": name})
    return _PLACEHOLDERS[key]


def _numpy_dtype_class(module: str, name: str) -> object | None:
    """numpy >= 1.25 may name a dtype by its class (numpy.dtypes.Int64DType)."""
    if module != "numpy.dtypes" or not name.endswith("DType"):
        return None
    cls = getattr(np, "dtypes", None) and getattr(np.dtypes, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, np.dtype) else None


# ---------------------------------------------------------------------------------------------
# The unpickler and the file format
# ---------------------------------------------------------------------------------------------


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, storage: Callable[[str, int], torch.UntypedStorage], depth: int) -> None:
        super().__init__(file)
        self._storage = storage
        self._depth = depth

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnpickleError("a global name that is not text")
        # Protocol 0-2 pickles spell names as Python 2 did (__builtin__.set, commands.getoutput);
        # pickle's own find_class maps them to Python 3's, which this one replaces, so map here
        # too: for the allow-list, and so that messages give the names a user knows. Both
        # spellings are checked.
        py3_module, py3_name = _compat_pickle.NAME_MAPPING.get(
            (module, name), (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if _code_running(module, name) or _code_running(py3_module, py3_name):
            raise CodeRunningPickle(f"{py3_module}.{py3_name}")
        module, name = py3_module, py3_name
        if (module, name) == ("torch.storage", "_load_from_bytes") and self._depth < 2:
            # how plain pickle.dumps writes a tensor: a whole torch.save archive as bytes
            # (torch's own function would torch.load it unsafely)
            return lambda data: load_bytes(data, self._depth + 1)
        allowed = _ALLOWED.get((module, name)) or _numpy_dtype_class(module, name)
        return allowed if allowed is not None else _placeholder(module, name)

    def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
        # torch.save's reference to a storage: ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise UnpickleError(f"unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnpickleError("a storage reference that is not torch's")
        dtype = storage_type.dtype
        nbytes = numel * (1 if storage_type.dtype is torch.uint8 else torch.empty((), dtype=dtype).element_size())
        return torch.storage.TypedStorage(wrap_storage=self._storage(key, nbytes), dtype=dtype, _internal=True)


def load(path: str | Path) -> object:
    """Read a torch.save file (zip format, torch >= 1.6); tensors are memory-mapped views of
    the file (private mapping: writes to them never reach it). Raises CodeRunningPickle for a
    file that names a code-running callable, UnpickleError for anything else that is not a
    readable checkpoint."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            whole = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
            return _load_archive(archive, whole, 0)
    except zipfile.BadZipFile as e:
        raise UnpickleError(_not_zip(path)) from e


def load_bytes(data: bytes, depth: int = 0) -> object:
    """The same for a torch.save archive held in memory."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return _load_archive(archive, None, depth)
    except zipfile.BadZipFile as e:
        raise UnpickleError("an embedded tensor is not a torch.save archive") from e


def _not_zip(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        return ("a plain pickle or torch < 1.6 (legacy format) file; only the zip format that torch.save "
                "writes since torch 1.6 is read. Convert it in a trusted environment with "
                "torch.save(torch.load(f, weights_only=True), new_file)")
    return "not a zip archive (truncated or corrupt?)"


def _load_archive(archive: zipfile.ZipFile, whole: torch.UntypedStorage | None, depth: int) -> object:
    """whole: the file mapped in memory (storages become slices of it), or None to read them."""
    names = {info.filename: info for info in archive.infolist()}
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise UnpickleError("not a torch checkpoint archive (no <archive>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    order = archive.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
    if order != b"little":
        raise UnpickleError(f"tensors stored {order.decode(errors='replace')}-endian; only little-endian files are read")

    def storage(key: str, nbytes: int) -> torch.UntypedStorage:
        info = names.get(f"{prefix}data/{key}")
        if info is None or info.file_size != nbytes:
            raise UnpickleError(f"storage {key!r} is missing or has the wrong size")
        if whole is not None and info.compress_type == zipfile.ZIP_STORED:
            offset = _data_offset(archive, info)
            if offset + nbytes > whole.nbytes():
                raise UnpickleError(f"storage {key!r} runs past the end of the file (truncated?)")
            return whole[offset : offset + nbytes]
        data = archive.read(info)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)

    unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), storage, depth)
    try:
        return unpickler.load()
    except UnpickleError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, RuntimeError, struct.error, MemoryError, RecursionError, OverflowError) as e:
        raise UnpickleError(f"not a readable checkpoint pickle: {type(e).__name__}: {e}") from e


def _data_offset(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes begin: after its local header (30 bytes, name, extra)."""
    fp = archive.fp
    assert fp is not None
    fp.seek(info.header_offset)
    header = fp.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise UnpickleError("corrupt zip entry header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len
