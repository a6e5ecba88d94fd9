"""Reading and writing weight files without ever unpickling an arbitrary object.

safetensors and msgpack hold only arrays by construction. A .pth is a pickle, so it is read only
through torch.load(weights_only=True), torch's restricted unpickler, and only when torch is
installed: without torch we refuse rather than fall back to `pickle`.

Every file is read and written whole through data_pipelines.storage, so a weight file may be local
or in a bucket (gs://, s3://). A write never leaves half a file under the final name (a temporary
file renamed locally, a whole-object upload in a bucket).
"""

import io
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import serialization

from data_pipelines import storage
from mermed_jax.interop.trees import Tree

SAFETENSORS = ".safetensors"
MSGPACK = ".msgpack"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the model; the message names the file."""


def _torch():
    try:
        import torch  # noqa: PLC0415 - optional dependency, only for .pth files
    except ImportError:
        return None
    return torch


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    # ml_dtypes registers numpy's "bfloat16", without which safetensors.numpy cannot read bf16 files.
    import ml_dtypes  # noqa: F401, PLC0415
    from safetensors import numpy as st_numpy  # noqa: PLC0415 - keeps import of this module light

    try:
        if not storage.is_remote(path):
            return dict(st_numpy.load_file(os.fspath(path)))
        # safetensors.numpy.load(bytes) knows no bfloat16; load_file does, so a bucket's file goes
        # through a local temporary copy.
        with tempfile.NamedTemporaryFile(suffix=SAFETENSORS) as local:
            local.write(storage.read_bytes(path))
            local.flush()
            return dict(st_numpy.load_file(local.name))
    except storage.StorageError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _torch_to_numpy(torch, obj: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Flattens nested dicts of tensors to dotted names; non-tensor leaves (epochs, args) are dropped."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _torch_to_numpy(torch, value, f"{prefix}{key}.", out)
    elif isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float64:
            tensor = tensor.float()  # bf16/fp16 have no (or a lossy) NumPy counterpart; params are fp32
        out[prefix[:-1]] = tensor.numpy()


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    torch = _torch()
    if torch is None:
        raise CheckpointError(
            f"{path}: a PyTorch pickle can only be read with torch.load(weights_only=True), and torch "
            "is not installed. Install torch, or convert the file to .safetensors; it is never "
            "unpickled any other way."
        )
    data = storage.read_bytes(path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for corrupt zips
        raise CheckpointError(f"{path}: torch.load(weights_only=True) refused the file ({type(e).__name__}: {e})") from e
    out: dict[str, np.ndarray] = {}
    _torch_to_numpy(torch, obj, "", out)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch-style flat {dotted name: array} from .safetensors or a torch pickle."""
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such file")
    suffix = storage.path(path).suffix
    if suffix == SAFETENSORS:
        return read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return read_torch(path)
    raise CheckpointError(f"{path}: unknown weight format {suffix!r}; expected {SAFETENSORS} or one of {TORCH_SUFFIXES}")


def read_msgpack(path: str | os.PathLike) -> Tree:
    """A nested dict of arrays written by flax.serialization (msgpack_restore builds no objects)."""
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such file")
    data = storage.read_bytes(path)
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises ExtraData, ValueError, ... on corrupt bytes
        raise CheckpointError(f"{path}: not a readable msgpack file ({type(e).__name__}: {e})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a msgpack dict of parameters, found {type(tree).__name__}")
    return tree


def check_param_tree(tree: Any, source: str, at: tuple[str, ...]) -> None:
    """Raises CheckpointError unless `tree` is nested dicts with text keys and numeric array leaves.

    msgpack can hold any structure; a file of another program (or a damaged one that still parses)
    otherwise failed deep inside the importer with a TypeError naming neither file nor key.
    """
    name = "/".join(at)
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{source}: {name!r} is a {type(tree).__name__}, not a dict of parameters")
    for key, value in tree.items():
        where = "/".join((*at, str(key)))
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: key {where!r} is a {type(key).__name__}, not text: not a parameter tree")
        if isinstance(value, Mapping):
            check_param_tree(value, source, (*at, key))
        elif not (isinstance(value, np.ndarray) and value.dtype.kind in "biuf"):
            found = f"an array of {value.dtype}" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            raise CheckpointError(f"{source}: {where!r} is {found}, not a numeric array: not a parameter tree")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    from safetensors import numpy as st_numpy  # noqa: PLC0415

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    storage.write_bytes(path, st_numpy.save(arrays, metadata=dict(metadata)))


def write_torch(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    torch = _torch()
    if torch is None:
        raise CheckpointError(f"{path}: writing a .pth needs torch, which is not installed; export to safetensors instead")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(path, buffer.getvalue())


def write_msgpack(path: str | os.PathLike, tree: Tree) -> None:
    storage.write_bytes(path, serialization.msgpack_serialize(tree))
