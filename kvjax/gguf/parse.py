"""The GGUF container, parsed from a memory map: header, metadata, tensor descriptions.

GGUF (llama.cpp's docs/gguf.md; versions 2 and 3, little-endian):

  magic "GGUF" | version u32 | tensor count u64 | metadata count u64
  metadata:  key (u64 length + UTF-8) | value type u32 | value
  tensors:   name | n_dims u32 | dims u64 x n_dims (fastest axis first) | type u32 | offset u64
  data:      from the first multiple of `general.alignment` (default 32) after the above

Why not gguf.GGUFReader: it builds a numpy view per array element and keeps every field's
parts, so Gemma 3's 262,144-token vocabulary took ~19 s and ~0.9 GB before any weight was
read. Here numeric arrays are one `np.frombuffer` each and a string array one pass of
`struct.unpack_from`; tensor data stays in the memory map until a tensor is asked for.
Dequantisation still uses the gguf package (kvjax/gguf/reader.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type id -> (struct format, numpy dtype) for the fixed-size scalars
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


class FormatError(ValueError):
    """The bytes are not a GGUF file this parser reads (wrong magic or version, truncated)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's description. shape: ggml order (fastest axis first), as gguf's ReaderTensor."""

    name: str
    shape: tuple
    type_id: int
    offset: int         # from the start of the data section

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        try:
            (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise FormatError(f"truncated at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise FormatError(f"truncated at byte {self.pos}: a string of {n} bytes")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def array(self):
        kind, n = self.take("<I"), self.take("<Q")
        if kind in _SCALARS:
            dtype = np.dtype(_SCALARS[kind][1]).newbyteorder("<")
            end = self.pos + n * dtype.itemsize
            if end > len(self.buf):
                raise FormatError(f"truncated at byte {self.pos}: an array of {n} values")
            out = np.frombuffer(self.buf, dtype, n, self.pos).copy()
            self.pos = end
            return out
        if kind == _STRING:
            return [self.string() for _ in range(n)]
        if kind == _ARRAY:
            return [self.array() for _ in range(n)]
        raise FormatError(f"unknown array element type {kind} at byte {self.pos}")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind][0])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array()
        raise FormatError(f"unknown metadata value type {kind} at byte {self.pos}")


def parse(buf) -> tuple[dict, dict, int]:
    """(metadata {key: value}, tensors {name: TensorInfo}, absolute offset of the data section)
    of a GGUF file's bytes (a memory map). Numeric arrays come back as numpy arrays, string
    arrays as lists of str. FormatError for anything that is not a readable GGUF file."""
    if bytes(buf[:4]) != MAGIC:
        raise FormatError(f"no GGUF magic (the file starts with {bytes(buf[:4])!r})")
    c = _Cursor(buf)
    c.pos = 4
    version = c.take("<I")
    if version not in (2, 3):
        raise FormatError(f"GGUF version {version}; kvjax reads versions 2 and 3 (little-endian)")
    n_tensors, n_kv = c.take("<Q"), c.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("<I")
        shape = tuple(c.take("<Q") for _ in range(n_dims))
        info = TensorInfo(name, shape, c.take("<I"), c.take("<Q"))
        if name in tensors:
            raise FormatError(f"tensor {name!r} appears twice")
        tensors[name] = info
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-c.pos // align) * align
    return meta, tensors, start
