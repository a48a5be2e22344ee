"""Reading and writing safetensors files with numpy alone (bf16 through ml_dtypes), memory-mapped."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One `.safetensors` file: its header is parsed eagerly, tensors are memory-mapped on access."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER:
                raise ValueError(f"{self.path}: not a safetensors file (header of {header_len} bytes)")
            try:
                header = json.loads(fh.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{self.path}: not a safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self._entries: dict[str, dict] = header
        self._data_offset = 8 + header_len
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _dtype(self._entries[name]["dtype"], self.path)

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view into the mapped file (no copy)."""
        entry = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = entry["data_offsets"]
        raw = self._mmap[self._data_offset + start : self._data_offset + end]
        return raw.view(_dtype(entry["dtype"], self.path)).reshape(entry["shape"])


def _dtype(name: str, path: Path) -> np.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"{path}: unsupported tensor dtype {name}") from None


def save_file(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """Write tensors (name -> array) to `path` in the safetensors format."""
    items = list(tensors.items())
    header: dict[str, dict] = {}
    offset = 0
    for name, array in items:
        nbytes = array.size * array.dtype.itemsize
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for _, array in items:
            fh.write(np.ascontiguousarray(array).tobytes())
