"""Safetensors read and written one tensor at a time, so that no conversion holds a whole model.

The source files are opened (memory-mapped) for one output tensor at a time and closed after it,
and the output file is written by a streaming writer of the safetensors format (header first,
from the planned names, dtypes and shapes; then the bytes of each tensor as it is produced), so
the peak is about one output tensor (for a mixture of experts, one layer's stacked experts), not a
copy of the model.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from lmspec.runtime.errors import HFError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> (torch dtype name, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
_TORCH_TO_ST = {name: st for st, (name, _) in DTYPES.items()}


# ---------------------------------------------------------------------------- reading safetensors

class SafetensorsDir:
    """The tensors of a Hugging Face directory (one file or shards), indexed from their headers."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open

        self.directory = directory
        files = self._files(directory)
        self.where: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in files:
            try:
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        if key in self.where:
                            raise HFError(f"{path}: tensor {key} is also in {self.where[key]}")
                        self.where[key] = path
                        self.meta[key] = (sl.get_dtype(), tuple(sl.get_shape()))
            except (SafetensorError, OSError) as err:
                raise HFError(f"{path}: corrupt or unreadable safetensors file ({err})") from None
        for key, (dtype, _) in self.meta.items():
            if dtype not in DTYPES:
                raise HFError(f"{self.where[key]}: tensor {key} has dtype {dtype}, which lmspec does not read")

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise HFError(f"{index}: not a safetensors index ({err})") from None
            files = [directory / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise HFError(f"{index}: names shard {missing[0]}, which is missing")
            return files
        if (directory / WEIGHTS_FILE).is_file():
            return [directory / WEIGHTS_FILE]
        shards = sorted(directory.glob("*.safetensors"))
        if shards:
            return shards
        legacy = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
        hint = f" ({legacy[0]} is a pickle checkpoint: convert it to safetensors first)" if legacy else ""
        raise HFError(f"{directory}: holds no {WEIGHTS_FILE} (nor {INDEX_FILE} with its shards){hint}")

    def resolve(self, name: str, aliases: tuple[tuple[str, str], ...]) -> str | None:
        if name in self.meta:
            return name
        for prefix, replacement in aliases:
            if name.startswith(prefix) and replacement + name[len(prefix):] in self.meta:
                return replacement + name[len(prefix):]
        return None

    def reader(self) -> _Reader:
        return _Reader(self)


class _Reader:
    """Opens the files it needs on first use and closes them all on exit (unmapping their pages)."""

    def __init__(self, source: SafetensorsDir):
        self.source = source
        self.handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles.values():
            handle.__exit__(None, None, None)
        self.handles.clear()

    def get(self, name: str):
        from safetensors import SafetensorError, safe_open

        path = self.source.where[name]
        try:
            if path not in self.handles:
                handle = safe_open(str(path), "pt")
                handle.__enter__()
                self.handles[path] = handle
            return self.handles[path].get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise HFError(f"{path}: cannot read tensor {name} ({err})") from None


# ---------------------------------------------------------------------------- writing safetensors

class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header from the planned (name, dtype, shape)
    list first, then each tensor's bytes in that order, so only one tensor is in memory at a time."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"tensor {name} is planned twice")
            size = math.prod(shape) * DTYPES[dtype][1]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as safetensors does
        self.path = path
        self.entries = list(entries)
        self.done = 0
        self.size = 8 + len(raw) + offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def write(self, name: str, tensor) -> None:
        import torch

        expected = self.entries[self.done]
        got = (name, _TORCH_TO_ST.get(str(tensor.dtype).removeprefix("torch.")), tuple(tensor.shape))
        if got != expected:
            raise ValueError(f"writing {got}, but the header planned {expected}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self.file.write(flat.view(torch.uint8).numpy().data)
        self.done += 1

    def close(self) -> None:
        if self.done != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self.done} planned tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()


def torch_dtype(st_dtype: str):
    import torch
    return getattr(torch, DTYPES[st_dtype][0])
