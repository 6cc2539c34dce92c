"""A GGUF file: its metadata and its tensors, dequantised one at a time.

Built on ggml-org's `gguf` package (GGUFReader memory-maps the file; `gguf.quants.dequantize`
turns any block-quantised tensor into float32 with numpy). Nothing is read into memory until
a tensor is asked for, so a caller that converts tensor by tensor keeps peak host memory near
the final parameter bytes plus one float32 tensor.

Shapes are numpy's (row-major): a GGUF matrix of ggml shape [in, out] is a [out, in] array
here, the same layout as a Hugging Face `nn.Linear.weight`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..hf.common import CheckpointError

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


def supported_types() -> tuple:
    """Tensor types this reader dequantises: plain floats and every block type `gguf` knows."""
    quants = _gguf().quants
    return PLAIN_TYPES + tuple(t for t in BLOCK_TYPES if hasattr(quants, t))


class GGUFFile:
    """One GGUF file: `arch`, `meta` (key -> value; big arrays on request), `tensors` (name ->
    the gguf ReaderTensor). CheckpointError for a file that is not GGUF, truncated or corrupt,
    or holds a tensor type no dequantiser handles, before any tensor is read."""

    def __init__(self, path):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        try:
            self._reader = _gguf().GGUFReader(str(self.path))
        except ImportError:
            raise
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors alike
            raise CheckpointError(f"{self.path} cannot be read as a GGUF file (not GGUF, truncated "
                                  f"or corrupt): {type(e).__name__}: {e}") from None
        self.tensors = {t.name: t for t in self._reader.tensors}
        self._check_size()
        self._check_types()
        self.arch = self.get("general.architecture")

    def _check_size(self):
        size = self.path.stat().st_size
        for t in self.tensors.values():
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name!r} needs bytes up to "
                                      f"{end}, but the file has {size}")

    def _check_types(self):
        ok = supported_types()
        for t in self.tensors.values():
            if t.tensor_type.name not in ok:
                raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, "
                                      f"which kvjax cannot dequantise; supported: {', '.join(ok)}")

    def has(self, key: str) -> bool:
        return key in self._reader.fields

    def get(self, key: str, default=...):
        """A metadata value (str, int, float, bool, or a list); CheckpointError naming the key
        when it is absent and no default is given."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path} has no metadata key {key!r}, which a "
                                      f"{self.get('general.architecture', '?')} model needs")
            return default
        value = field.contents()
        return value.item() if isinstance(value, np.generic) else value

    def array(self, key: str, default=None) -> np.ndarray | None:
        """A numeric metadata array (token types, scores) without building a Python list."""
        field = self._reader.fields.get(key)
        if field is None:
            return default
        return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0)

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
