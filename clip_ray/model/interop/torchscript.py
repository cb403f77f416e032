"""The weights of a TorchScript archive (OpenAI's released CLIP .pt files), read without running it.

`torch.jit.load` compiles the archive's code and unpickles its objects: loading a file that way trusts
whoever made it. Here the archive is only read. Its layout (a zip, one top folder):

    <name>/data.pkl        the module tree, pickled: `__torch__.*` objects whose attributes are tensors,
                           sub-modules and plain values; tensors point at storages by persistent id
    <name>/data/<key>      the raw bytes of each storage
    <name>/code/**/*.py    the TorchScript source; each class declares `__parameters__` and `__buffers__`

data.pkl is unpickled by a restricted Unpickler that knows only the tensor-rebuild functions, torch's
storage and dtype types, OrderedDict and TorchScript's list builders; `__torch__.*` classes become inert
placeholders recording their attributes. Any other global (os.system, builtins.eval, ...) is refused by
name before anything runs. The code files are read as text (never executed) for which attributes are
parameters and buffers; the state dict is those, with dotted names, as `ScriptModule.state_dict()` names them.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

# OpenAI's archives carry these scalars as state-dict entries; they describe the model, they are not weights.
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS_HEADER = re.compile(r"^class (\w+)\(")
_DECLARED = re.compile(r"^\s+__(parameters|buffers)__ = \[(.*)\]\s*$")


class UnsafePickleError(pickle.UnpicklingError):
    """The archive's pickle references a global that is not a tensor, storage or module placeholder."""


class ScriptObject:
    """An inert stand-in for a `__torch__.*` class: it only records the attributes the pickle sets."""

    qualified_name = "__torch__"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["__state__"] = state


class _StorageType:
    """What a storage global (torch.FloatStorage, ...) unpickles to: its dtype and nothing else."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    """torch._utils._rebuild_tensor(_v2): a view of the flat storage (requires_grad and hooks dropped)."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_ignored) -> torch.Tensor:
    return data


def _identity(value: Any, *_ignored) -> Any:
    return value


_ALLOWED_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        raise UnsafePickleError(f"{self.source}: refusing global {module}.{name} in data.pkl: a TorchScript "
                                "archive's weights need only tensors and module placeholders")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self.source}: unknown persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"{self.source}: storage {key!r} has no storage type ({storage_type!r})")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            dtype = storage_type.dtype
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise ValueError(f"{self.source}: storage {key} holds {flat.numel()} elements, data.pkl says {numel}")
            self.storages[key] = flat
        return self.storages[key]


def _open_archive(path: str | Path | IO[bytes]) -> zipfile.ZipFile:
    return zipfile.ZipFile(path if not isinstance(path, Path) else str(path))


def _data_pickle_name(archive: zipfile.ZipFile) -> str | None:
    names = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
    return names[0] if len(names) == 1 else None


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with <name>/data.pkl and <name>/code/), not a
    torch.save file (which has data.pkl but no code) or anything else."""
    if not zipfile.is_zipfile(path):
        return False
    with _open_archive(path) as archive:
        data_pickle = _data_pickle_name(archive)
        if data_pickle is None:
            return False
        prefix = data_pickle[: -len("data.pkl")]
        return any(name.startswith(f"{prefix}code/") for name in archive.namelist())


def _declared_tensors(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list[str], list[str]]]:
    """qualified class name -> (parameter names, buffer names), read as text from the archive's code files."""
    declared: dict[str, tuple[list[str], list[str]]] = {}
    code = f"{prefix}code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code): -len(".py")].replace("/", ".")
        current = None
        for line in archive.read(name).decode("utf-8", errors="replace").splitlines():
            if header := _CLASS_HEADER.match(line):
                current = f"{module}.{header.group(1)}"
                declared[current] = ([], [])
            elif current and (found := _DECLARED.match(line)):
                names = [item.strip().strip("\"'") for item in found.group(2).split(",") if item.strip()]
                declared[current][0 if found.group(1) == "parameters" else 1].extend(names)
    return declared


def _walk(obj: ScriptObject, prefix: str, declared: dict, out: dict[str, torch.Tensor], source: str) -> None:
    """Parameters, then buffers, then each sub-module's, as nn.Module.state_dict orders them."""
    attributes = obj.__dict__
    if obj.qualified_name not in declared:
        raise ValueError(f"{source}: the archive's code declares no class {obj.qualified_name}, so its parameters "
                         "and buffers cannot be told apart from other attributes")
    parameters, buffers = declared[obj.qualified_name]
    for name in (*parameters, *buffers):
        value = attributes.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
    for name, value in attributes.items():
        if isinstance(value, ScriptObject):
            _walk(value, f"{prefix}{name}.", declared, out, source)


def read_torchscript_state_dict(path: str | Path | IO[bytes]) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive (without OpenAI's metadata scalars), read without running
    or unpickling any of its code; a pickle that names any other global raises UnsafePickleError."""
    source = str(path) if isinstance(path, (str, Path)) else "TorchScript archive"
    with _open_archive(path) as archive:
        data_pickle = _data_pickle_name(archive)
        if data_pickle is None:
            raise ValueError(f"{source} is not a TorchScript archive (no single <name>/data.pkl)")
        prefix = data_pickle[: -len("data.pkl")]
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(data_pickle)), archive, prefix, source)
        root = unpickler.load()
        if not isinstance(root, ScriptObject):
            raise ValueError(f"{source}: data.pkl holds {type(root).__name__}, not a TorchScript module")
        state: dict[str, torch.Tensor] = {}
        _walk(root, "", _declared_tensors(archive, prefix), state, source)
    return {name: tensor for name, tensor in state.items() if name not in OPENAI_METADATA_KEYS}
