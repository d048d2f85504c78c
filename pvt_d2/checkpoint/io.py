"""Reading checkpoint files without ever executing code from them.

Three container formats are accepted, recognised by their first bytes (not by
the file extension):

* PyTorch zip archives (``torch.save`` since 1.6: ``.pth``, ``.pth.tar``,
  ``.bin``, ``.pt``) and legacy PyTorch pickles, both read with
  ``torch.load(weights_only=True)``: only tensors, plain containers and
  numbers can be rebuilt, so a pickle that would import or call anything else
  (``os.system`` in a ``__reduce__``) is refused before anything runs. The
  only class allowed on top of PyTorch's own list is ``argparse.Namespace``,
  which the DeiT and timm training scripts store as ``args`` next to the
  weights and which only holds attributes.
* safetensors files, read with the ``safetensors`` library (no pickle at all).
* plain pickles (``pickle.dump``; detectron2 / Detectron model-zoo ``.pkl``
  files: dicts of numpy arrays), read with :class:`RestrictedUnpickler`,
  which rebuilds dicts, lists, tuples, numbers, strings and numpy arrays only
  and refuses any other global before it is imported, naming the file and
  the global.

Every file pvt_d2 opens goes through :func:`load_checkpoint_file`: the
checkpointer's ``MODEL.WEIGHTS`` and ``--resume`` loads (whatever the
extension, ``.pkl`` and ``.pyth`` included), ``MODEL.PVT_D2.PRETRAINED``,
``tools/convert_pretrained.py`` and ``tools/demo.py``.

Anything else, an empty file, a truncated download, or a file whose state
dict cannot be found is refused with a :class:`CheckpointError` naming the
file. The weights may be nested (``model``, ``state_dict``, ``model_ema``,
``state_dict_ema``, ``module``) and prefixed with ``module.``
(DistributedDataParallel); :func:`read_state_dict` unwraps both.
"""
import argparse
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

__all__ = ["CheckpointError", "NESTED_KEYS", "RestrictedUnpickler", "sniff_format", "load_checkpoint_file",
           "extract_state_dict", "read_state_dict", "check_finite", "atomic_torch_save"]

#: Where training scripts put the weights, in order of preference.
NESTED_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module", "ema")

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
_SAFE_EXTRA_GLOBALS = [argparse.Namespace]
# A legacy (pre-zip) torch.save file starts with its pickled magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."
# What a plain pickle may name: numpy arrays and scalars (numpy 1 and 2 module paths), their dtypes,
# ordered dicts, and the bytes re-encoding that protocol-2 pickles use for array data.
_PLAIN_PICKLE_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, of another model, or not matching it."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data: dicts, lists, tuples, numbers, strings and numpy arrays.

    Any other global (a function such as ``os.system`` in a ``__reduce__``, a
    class, torch's storage loaders) is refused before it is imported:
    :class:`CheckpointError` names the file and the global. Persistent ids
    (used by ``torch.save``) are refused too.
    """

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")  # Python 2 pickles (Detectron / Caffe2) store arrays as str
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"Refusing to load {self.source}: it is a pickle with content the safe loader does not rebuild, which "
            f"would import or run Python code ({module}.{name}) when loaded. Only dicts, lists, numbers, strings "
            f"and numpy arrays are accepted in a plain pickle (.pkl). If you trust the file, re-save just its "
            f"weights with torch.save (or as .safetensors) and use that.")

    def persistent_load(self, pid):
        raise CheckpointError(f"Refusing to load {self.source}: it is a pickle with external references "
                              f"(persistent id {str(pid)[:40]!r}), not plain data.")


def sniff_format(path: str) -> str:
    """The container format of ``path``: ``"zip"``, ``"pickle"`` (legacy torch.save), ``"plain_pickle"`` or
    ``"safetensors"``.

    Raises:
        CheckpointError: missing, empty or unrecognised file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[0] == _PICKLE_PROTO:
        return "pickle" if head.startswith(_TORCH_LEGACY_MAGIC) else "plain_pickle"
    raise CheckpointError(
        f"{path} is not a checkpoint: unrecognised file format (starts with {head[:8]!r}); expected a PyTorch "
        f"file (.pth, .pth.tar, .bin) or a .safetensors file")


def _check_safetensors_complete(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated: its safetensors header needs {8 + header_len} bytes but "
                                  f"the file has {size} (incomplete download?)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: unreadable safetensors header ({e})") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {needed} bytes but the file has {size} "
                              f"(incomplete download?)")


def _refusal_reason(message: str) -> Optional[str]:
    """Why the ``weights_only`` unpickler refused a file, or None if the error is of another kind."""
    match = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported global: ([\w.]+)", message)
    if match:
        return f"it is a pickle that would import or run Python code ({match.group(1)}) when loaded"
    match = re.search(r"Unsupported (operand|class) ([^\n]+)", message)
    if match:
        return (f"it is a pickle with content the safe loader does not rebuild (unsupported {match.group(1)} "
                f"{match.group(2).strip()}, e.g. a plain pickle.dump file), which could run code when loaded")
    return None


def load_checkpoint_file(path: str) -> Any:
    """Load the object stored in a checkpoint file, safely.

    Returns:
        Whatever the file holds (a state dict, or a dict with the state dict
        nested inside); tensors are on the CPU.

    Raises:
        CheckpointError: see the module docstring.
    """
    fmt = sniff_format(path)
    if fmt == "plain_pickle":
        return _load_plain_pickle(path)
    if fmt == "safetensors":
        _check_safetensors_complete(path)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{path} is a corrupt safetensors file: {e}") from None
    if fmt == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt: the PyTorch zip archive has no central directory "
                              f"(incomplete download?)")
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _refusal_reason(str(e))
        if reason is not None:
            raise CheckpointError(
                f"Refusing to load {path}: {reason}. Only tensors and plain containers are accepted "
                f"(torch.load with weights_only=True). If you trust the file, re-save just its state dict with "
                f"torch.save (or convert it to .safetensors) and use that.") from None
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt?): "
                              f"{str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, struct.error) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (truncated or corrupt?): {first}") \
            from None


def _load_plain_pickle(path: str) -> Any:
    """A plain pickle through :class:`RestrictedUnpickler`; truncated or corrupt files are named."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=path).load()
        except CheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, struct.error, UnicodeDecodeError, MemoryError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path} cannot be read as a pickle (truncated or corrupt?): {first}") from None


def check_finite(weights: Mapping, source: str, names: Optional[Any] = None) -> None:
    """Refuse weights holding NaN or infinite values.

    Args:
        weights: name -> tensor or numpy array.
        source: the file, for the message.
        names: if given, only these names are checked (e.g. a model's
            parameters: buffers may hold ``-inf`` masks on purpose).

    Raises:
        CheckpointError: naming the file and the first tensors with such values.
    """
    import numpy as np

    bad = []
    for k, v in weights.items():
        if names is not None and k not in names:
            continue
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            bad.append(k)
        elif isinstance(v, np.ndarray) and v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad.append(k)
    if bad:
        raise CheckpointError(
            f"Checkpoint {source} has NaN or infinite values in {len(bad)} tensors "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): it was saved from a diverged run or is "
            f"corrupt, and is refused.")


def _as_tensors(obj: Any) -> Any:
    """A mapping of numpy arrays (a plain pickle) as a mapping of tensors; anything else unchanged."""
    import numpy as np

    if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return {k: torch.as_tensor(v) for k, v in obj.items()}
    return obj


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_common_prefix(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    # Only when every key has it, as fvcore's checkpointer does; torch alone would also rename the keys of a
    # real top-level submodule called "module" in an unwrapped model.
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        consume_prefix_in_state_dict_if_present(state_dict, prefix)
    return state_dict


def extract_state_dict(obj: Any, key: Optional[str] = None, source: str = "checkpoint") \
        -> Tuple[Dict[str, torch.Tensor], Optional[str]]:
    """Find the state dict inside a loaded checkpoint object.

    Args:
        obj: the loaded object.
        key: the entry holding the weights (``"model_ema"``, ...); dots select
            nested entries. By default the object itself if it is a state dict,
            else the first of :data:`NESTED_KEYS` that holds one.
        source: name of the file, for messages.

    Returns:
        ``(state_dict, key)``: tensors by name (a common ``module.`` prefix
        removed) and the entry they came from (None at the top level).
    """
    converted = _as_tensors(obj)
    if converted is not obj:
        obj = converted
    elif isinstance(obj, Mapping):  # weights nested under "model" etc.
        obj = {k: _as_tensors(v) for k, v in obj.items()}
    if key:
        node = obj
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                found = sorted(node) if isinstance(node, Mapping) else type(node).__name__
                raise CheckpointError(f"{source} has no entry '{key}' (top-level entries: {found})")
            node = node[part]
        if not _is_tensor_dict(node):
            raise CheckpointError(f"{source}: entry '{key}' is not a state dict of tensors")
        return _strip_common_prefix(dict(node), "module."), key
    if _is_tensor_dict(obj):
        return _strip_common_prefix(dict(obj), "module."), None
    if isinstance(obj, Mapping):
        for name in NESTED_KEYS:
            if _is_tensor_dict(obj.get(name)):
                return _strip_common_prefix(dict(obj[name]), "module."), name
        entries = ", ".join(f"{k} ({type(v).__name__})" for k, v in list(obj.items())[:12])
        raise CheckpointError(f"{source} holds no state dict: none of its entries ({entries}) is a mapping of "
                              f"names to tensors; pass the entry to use (--key / key=)")
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")


def read_state_dict(path: str, key: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Safely read the state dict of a checkpoint file.

    Returns:
        ``(state_dict, info)`` with ``info`` holding ``format``, ``key`` (the
        nested entry used) and ``author`` (``__author__`` of the file, if any).

    Raises:
        CheckpointError: unreadable or unsafe file, no state dict, or a
            tensor with NaN / infinite values (named).
    """
    obj = load_checkpoint_file(path)
    state_dict, used = extract_state_dict(obj, key, source=path)
    check_finite(state_dict, path)
    author = obj.get("__author__") if isinstance(obj, Mapping) else None
    return state_dict, {"format": sniff_format(path), "key": used, "author": author}


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file: until the rename ``path`` keeps
    its previous content (or does not exist).
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
