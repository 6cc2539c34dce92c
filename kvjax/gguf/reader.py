"""A GGUF file: its metadata and its tensors, dequantised one at a time.

kvjax/gguf/parse.py reads the header from a memory map; ggml-org's `gguf` package supplies
the type table and `gguf.quants.dequantize` (any block-quantised tensor into float32 with
numpy). Nothing is read into memory until a tensor is asked for, so a caller that converts tensor by tensor keeps peak host memory near
the final parameter bytes plus one float32 tensor.

Shapes are numpy's (row-major): a GGUF matrix of ggml shape [in, out] is a [out, in] array
here, the same layout as a Hugging Face `nn.Linear.weight`.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..hf.common import CheckpointError
from .parse import FormatError, parse

PLAIN_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL",
               "IQ4_XS", "TQ1_0", "TQ2_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10'") from None
    return gguf


_PLAIN = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}


def _n_bytes(t) -> int:
    """Bytes of tensor `t` (a parse.TensorInfo) on disk; CheckpointError for a row that is
    not a whole number of its type's blocks."""
    block, size = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType(t.type_id)]
    if t.shape and t.shape[0] % block:
        raise CheckpointError(f"tensor {t.name!r}: rows of {t.shape[0]} values are not whole "
                              f"blocks of {block} (corrupt header)")
    return t.n_elements // block * size


def supported_types() -> tuple:
    """Tensor types this reader dequantises: plain floats and every block type `gguf` knows."""
    quants = _gguf().quants
    return PLAIN_TYPES + tuple(t for t in BLOCK_TYPES if hasattr(quants, t))


@dataclass(frozen=True)
class Tensor:
    """One tensor of a GGUFFile: ggml-order `shape`, `tensor_type` (gguf.GGMLQuantizationType),
    and `data`, a read-only view of the memory map in gguf.GGUFReader's layout: [rows, row
    bytes] uint8 for block types, the element dtype in numpy shape for F32/F16."""

    name: str
    shape: tuple
    tensor_type: object
    data_offset: int
    n_bytes: int
    data: np.ndarray


class GGUFFile:
    """One GGUF file: `arch`, `meta` (key -> value), `tensors` (name -> Tensor). Metadata is
    parsed by kvjax/gguf/parse.py; tensor data stays memory-mapped until `tensor()` reads it.
    CheckpointError for a file that is not GGUF, truncated or corrupt, or holds a tensor type
    no dequantiser handles, before any tensor is read."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.meta, infos, start = parse(self._map)
            except (FormatError, ValueError) as e:    # mmap of an empty file: ValueError
                raise CheckpointError(f"{self.path} cannot be read as a GGUF file (not GGUF, "
                                      f"truncated or corrupt): {e}") from None
        self._check_types(infos)
        self._check_size(infos, start)
        self.tensors = {n: self._tensor(t, start) for n, t in infos.items()}
        self.arch = self.get("general.architecture")

    def _check_types(self, infos):
        ok, known = supported_types(), _gguf().GGMLQuantizationType
        for t in infos.values():
            name = known(t.type_id).name if t.type_id in known._value2member_map_ else f"id {t.type_id}"
            if name not in ok:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {name}, which kvjax "
                                      f"cannot dequantise; supported: {', '.join(ok)}")

    def _check_size(self, infos, start):
        size = len(self._map)
        for t in infos.values():
            end = start + t.offset + _n_bytes(t)
            if end > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name!r} needs bytes up to "
                                      f"{end}, but the file has {size}")

    def _tensor(self, t, start) -> Tensor:
        qtype = _gguf().GGMLQuantizationType(t.type_id)
        n, at, dims = _n_bytes(t), start + t.offset, tuple(reversed(t.shape))
        if qtype.name in ("F32", "F16"):
            data = np.frombuffer(self._map, _PLAIN[qtype.name], t.n_elements, at).reshape(dims)
        else:
            block, size = _gguf().GGML_QUANT_SIZES[qtype]
            data = np.frombuffer(self._map, np.uint8, n, at).reshape(*dims[:-1], dims[-1] // block * size)
        return Tensor(t.name, t.shape, qtype, at, n, data)

    def has(self, key: str) -> bool:
        return key in self.meta

    def get(self, key: str, default=...):
        """A metadata value (str, int, float, bool, or a list); CheckpointError naming the key
        when it is absent and no default is given."""
        if key not in self.meta:
            if default is ...:
                raise CheckpointError(f"{self.path} has no metadata key {key!r}, which a "
                                      f"{self.get('general.architecture', '?')} model needs")
            return default
        value = self.meta[key]
        return value.tolist() if isinstance(value, np.ndarray) else value

    def array(self, key: str, default=None) -> np.ndarray | None:
        """A numeric metadata array (token types, scores) as numpy, without a Python list."""
        value = self.meta.get(key)
        return default if value is None else np.asarray(value)

    def tensor(self, name: str, dtype, rows: int = 4096) -> np.ndarray:
        """One tensor dequantised to a numpy array of `dtype` in numpy (row-major) shape.

        Block-quantised tensors are dequantised `rows` rows at a time straight into the
        output, so the float32 intermediates stay small whatever the tensor's size."""
        gguf = _gguf()
        t = self.tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))
        if t.tensor_type.name in ("F32", "F16"):
            return np.asarray(t.data).reshape(shape).astype(dtype, copy=False)
        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data[None]
        out = np.empty((data.shape[0], int(np.prod(shape)) // data.shape[0]), dtype)
        for i in range(0, data.shape[0], rows):
            out[i:i + rows] = gguf.quants.dequantize(data[i:i + rows], t.tensor_type)
        return out.reshape(shape)
