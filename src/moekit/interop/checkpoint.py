"""Safetensors model folders: lazy reading (headers first, tensors on demand) and atomic writing.

A folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor name: shard file}}``). Opening reads only the headers, so names,
shapes and dtypes are all checked before any tensor data is read; tensors are then memory-mapped
and read one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moekit.errors import ModelFolderError
from moekit.fileio import atomic_path, atomic_write_json

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
READ_DTYPES = {**DTYPES, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
               "I64": torch.int64, "BOOL": torch.bool}  # what ``get`` reads with pread


@dataclass(frozen=True)
class Entry:
    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F8_E4M3, ...


class Checkpoint:
    """The tensors of a Hugging Face model folder, opened lazily. Use as a context manager."""

    def __init__(self, folder: Path, pread: bool = False):
        self.folder = Path(folder)
        self.pread = pread  # read tensors with pread, not through the memory map (``get``)
        self._fds: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
        self.index_file, files, self.claimed = self._locate()
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}
        self.entries: dict[str, Entry] = {}
        try:
            for file in files:
                handle = self._stack.enter_context(safe_open(str(self.folder / file), framework="pt"))
                self._handles[file] = handle
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    self.entries[name] = Entry(file, tuple(sl.get_shape()), sl.get_dtype())
        except BaseException:
            self._stack.close()
            raise

    def _locate(self) -> tuple[str, list[str], dict[str, str]]:
        index = self.folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ModelFolderError(f"cannot read {index}: {e}") from e
            if not isinstance(weight_map, dict):
                raise ModelFolderError(f"cannot read {index}: weight_map is not a mapping")
            files = list(dict.fromkeys(weight_map.values()))
            for file in files:
                _check_inside(file, index)
                if not (self.folder / file).is_file():
                    names = [n for n, f in weight_map.items() if f == file]
                    raise ModelFolderError(
                        f"shard {file} is missing from {self.folder} ({INDEX} lists {len(names)} tensor(s) there, "
                        f"e.g. {names[0]!r})"
                    )
            return INDEX, files, dict(weight_map)
        if (self.folder / SINGLE).is_file():
            return SINGLE, [SINGLE], {}
        others = sorted(p.name for p in self.folder.glob("*.bin")) if self.folder.is_dir() else []
        hint = f" (found {', '.join(others)}: convert PyTorch .bin checkpoints to safetensors first)" if others else ""
        raise ModelFolderError(f"no {SINGLE} or {INDEX} in {self.folder}{hint}")

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def where(self, name: str) -> str:
        """Where ``name`` should be, for messages: its shard, or the index/file that lacks it."""
        return self.claimed.get(name, self.index_file)

    def missing_message(self, name: str, needed_for: str) -> str:
        if name in self.claimed:
            return f"tensor {name!r} (for {needed_for}) is missing from {self.claimed[name]}, where {INDEX} places it"
        return f"tensor {name!r} (for {needed_for}) is not in the checkpoint ({self.index_file} in {self.folder})"

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if self.pread:
            return self._pread(name, entry)
        return self._handles[entry.file].get_tensor(name)

    def _pread(self, name: str, entry: Entry) -> torch.Tensor:
        """The tensor read with ``pread`` into memory of its own. Why: the pages of a file map
        that were read count in this process's RSS until the map is closed, so streaming a
        checkpoint bigger than RAM through safetensors' map would show all of it as RSS
        (``moekit.offload.stream``); a read leaves them in the kernel's page cache instead."""
        from moekit.offload.store import _pread_exact, _safetensors_offsets

        if entry.file not in self._fds:
            path = self.folder / entry.file
            fd = os.open(path, os.O_RDONLY)
            self._fds[entry.file] = fd, _safetensors_offsets(fd, path)
        fd, offsets = self._fds[entry.file]
        start, end = offsets[name]
        dtype = READ_DTYPES.get(entry.dtype)
        if dtype is None:
            raise ModelFolderError(f"tensor {name!r} in {entry.file} has dtype {entry.dtype}, which moekit does not read")
        out = torch.empty(entry.shape, dtype=dtype)
        if end - start != out.numel() * dtype.itemsize:
            raise ModelFolderError(f"tensor {name!r} in {entry.file}: {end - start} bytes for shape {list(entry.shape)}")
        if end > start:
            _pread_exact(fd, out.view(-1).view(torch.uint8).numpy(), start)
        return out


def _check_inside(file, index: Path) -> None:
    """A shard named by the index must be a plain relative path within the model folder: an
    entry like ``../other/model.safetensors`` or ``/etc/x`` would read files the folder does not
    hold. Checked on the name, not the resolved path, because hub caches link shards to blobs
    elsewhere."""
    parts = PurePosixPath(file).parts if isinstance(file, str) else ()
    if not parts or PurePosixPath(file).is_absolute() or "\\" in file or ".." in parts or ":" in parts[0]:
        raise ModelFolderError(f"{index} lists shard {file!r}, which is not inside {index.parent}: refused")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.I)
        if match is None:
            raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
        unit = (match.group(2) or "B").upper()
        powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        value = int(float(match.group(1)) * powers[unit])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def write_json(path: Path, data: dict) -> None:
    atomic_write_json(path, data)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:  # readers see the old file or the new one, never half of one
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete weight files of an earlier save into ``folder`` that this save did not write."""
    for p in folder.iterdir():
        is_weights = p.name in (SINGLE, INDEX) or SHARD_NAME.fullmatch(p.name)
        if is_weights and p.name not in keep:
            p.unlink()


__all__ = ["Checkpoint", "Entry", "DTYPES", "INDEX", "SINGLE", "parse_size", "write_json", "write_safetensors",
           "remove_stale"]
