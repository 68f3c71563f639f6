"""Where offloaded experts live: a folder of safetensors files on disk (one per MoE layer) or
CPU RAM. The cache (``cache.py``) copies one expert at a time out of a store into its slots.

An expert is addressed by (layer, expert). Its tensors are the provider's state-dict entries
sliced at that expert (``Experts``: ``w_in`` [1, H, D], ``w_out`` [1, D, F];
``QuantizedExperts``: the int8/int4 buffers and their scales), so float, int8 and int4
experts are all stored and fetched the same way. ``ExpertLayout`` lists those parts and where
each sits in a cache slot (64-byte aligned, so every view is as aligned as a fresh tensor).

Disk: ``<dir>/layerNNN.safetensors`` with tensors named ``"<expert>.<part>"`` plus
``offload.json`` (the layouts). Reads use ``os.preadv`` into buffers the cache owns, not
safetensors' memory map. Why: pages of a file mapping that were touched count in the
process's RSS until unmapped, so streaming a 4 GB store through a map would show 4 GB of RSS
whatever the cache budget; ``preadv`` copies into the slot the cache already counts, the
read releases the GIL (so a prefetch thread overlaps compute), and what stays behind is the
kernel's page cache, which is not this process's memory and is reclaimed under pressure
(kept on purpose: a second read of a hot file is a memory copy, not a disk read).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import ModelFolderError
from moekit.fileio import atomic_write_json, read_json_object

ALIGN = 64
MANIFEST = "offload.json"
FORMAT = "moekit-expert-store-1"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Part:
    name: str  # state-dict name in the provider, e.g. "w_in" or "w_in.qweight"
    shape: tuple[int, ...]  # one expert's slice, leading dim 1
    dtype: torch.dtype
    offset: int  # byte offset in a cache slot

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    """One layer's expert tensors: names, shapes, dtypes and where they sit in a slot."""

    parts: tuple[Part, ...]

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> "ExpertLayout":
        parts, offset = [], 0
        for name, t in state.items():
            parts.append(Part(name, (1, *t.shape[1:]), t.dtype, offset))
            offset = _align(offset + parts[-1].nbytes)
        return cls(tuple(parts))

    @property
    def slot_bytes(self) -> int:
        """Bytes of one expert in a slot (with alignment padding)."""
        return _align(self.parts[-1].offset + self.parts[-1].nbytes) if self.parts else 0

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's tensors (what a load moves)."""
        return sum(p.nbytes for p in self.parts)

    def views(self, slot: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors over a uint8 slot [slot_bytes]: name -> [1, ...] in the part's dtype."""
        return {p.name: slot[p.offset: p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in self.parts}

    def to_dict(self) -> dict:
        return {"parts": [[p.name, list(p.shape), str(p.dtype).removeprefix("torch."), p.offset] for p in self.parts]}

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertLayout":
        return cls(tuple(Part(n, tuple(s), getattr(torch, dt), o) for n, s, dt, o in d["parts"]))


class ExpertStore:
    """The slow tier. ``read_into(layer, expert, slot)`` fills a uint8 slot (on the CPU)."""

    layouts: dict[int, ExpertLayout]  # MoE layer index -> layout
    num_experts: dict[int, int]
    kind = ""

    def read_into(self, layer: int, expert: int, slot: torch.Tensor) -> None:
        raise NotImplementedError

    def cpu_views(self, layer: int, expert: int) -> dict[str, torch.Tensor] | None:
        """The expert's tensors where the store keeps them, if that is CPU memory (else None)."""
        return None

    def close(self) -> None:
        pass


class RamStore(ExpertStore):
    """Experts held in CPU RAM (the slow tier for a GPU cache): each layer's stacked tensors,
    moved off the model, not copied."""

    kind = "ram"

    def __init__(self, states: dict[int, dict[str, torch.Tensor]]):
        self.states = {l: {n: t.detach().cpu() for n, t in s.items()} for l, s in states.items()}
        self.layouts = {l: ExpertLayout.of(s) for l, s in self.states.items()}
        self.num_experts = {l: next(iter(s.values())).shape[0] for l, s in self.states.items()}

    def cpu_views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {n: t[expert: expert + 1] for n, t in self.states[layer].items()}

    def read_into(self, layer: int, expert: int, slot: torch.Tensor) -> None:
        views = self.layouts[layer].views(slot)
        for name, src in self.cpu_views(layer, expert).items():
            views[name].copy_(src, non_blocking=slot.is_pinned())


class DiskStore(ExpertStore):
    """Experts in ``<dir>/layerNNN.safetensors``, read with ``preadv`` (module docstring)."""

    kind = "disk"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = read_json_object(self.folder / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise ModelFolderError(f"{self.folder / MANIFEST}: not an expert store of format {FORMAT}")
        self.layouts = {int(l): ExpertLayout.from_dict(d) for l, d in manifest["layouts"].items()}
        self.num_experts = {int(l): n for l, n in manifest["num_experts"].items()}
        self._fds: dict[int, int] = {}
        self._offsets: dict[int, dict[str, tuple[int, int]]] = {}
        for layer in self.layouts:
            self._open(layer)

    def _open(self, layer: int) -> None:
        path = self.folder / layer_file(layer)
        fd = os.open(path, os.O_RDONLY)
        self._fds[layer] = fd
        self._offsets[layer] = _safetensors_offsets(fd, path)
        for e in range(self.num_experts[layer]):  # a truncated or foreign file fails here, not mid-generation
            for p in self.layouts[layer].parts:
                start, end = self._offsets[layer].get(f"{e}.{p.name}", (0, -1))
                if end - start != p.nbytes:
                    raise ModelFolderError(f"{path}: tensor {e}.{p.name} is missing or has the wrong size")

    def read_into(self, layer: int, expert: int, slot: torch.Tensor) -> None:
        fd, offsets = self._fds[layer], self._offsets[layer]
        buf = slot.numpy()  # the slot's own memory: the read lands where the cache counts it
        for p in self.layouts[layer].parts:
            start, end = offsets[f"{expert}.{p.name}"]
            _pread_exact(fd, buf[p.offset: p.offset + p.nbytes], start)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def layer_file(layer: int) -> str:
    return f"layer{layer:03d}.safetensors"


def write_store(states: dict[int, dict[str, torch.Tensor]], folder: str | Path) -> Path:
    """Write each MoE layer's expert tensors (name -> [E, ...]) as one safetensors file of
    per-expert tensors, then the manifest (last: a folder without it is not a store)."""
    folder = Path(folder)
    for layer, state in states.items():
        write_layer(folder, layer, state)
    write_manifest(folder, {l: ExpertLayout.of(s) for l, s in states.items()},
                   {l: next(iter(s.values())).shape[0] for l, s in states.items()})
    return folder


def write_layer(folder: str | Path, layer: int, state: dict[str, torch.Tensor]) -> None:
    """One layer's file: ``"<expert>.<part>"`` -> [1, ...] (a store may be written a layer at a time)."""
    from moekit.interop.checkpoint import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    per_expert = {f"{e}.{n}": t[e: e + 1].detach().cpu().contiguous()
                  for n, t in state.items() for e in range(t.shape[0])}
    write_safetensors(folder / layer_file(layer), per_expert)


def write_manifest(folder: str | Path, layouts: dict[int, ExpertLayout], num_experts: dict[int, int]) -> None:
    atomic_write_json(Path(folder) / MANIFEST, {
        "format": FORMAT,
        "torch": torch.__version__,  # int4 kernel packing is torch's private layout
        "layouts": {str(l): layout.to_dict() for l, layout in layouts.items()},
        "num_experts": {str(l): n for l, n in num_experts.items()},
    })


def check_matches(store: ExpertStore, states: dict[int, dict[str, torch.Tensor]]) -> None:
    """ModelFolderError unless the store holds experts of these layers, kinds and shapes
    (a store reused for another model, or another quantization, is refused)."""
    if set(store.layouts) != set(states):
        raise ModelFolderError(f"the expert store holds MoE layers {sorted(store.layouts)}; the model has {sorted(states)}")
    for layer, state in states.items():
        n = next(iter(state.values())).shape[0]
        if store.layouts[layer] != ExpertLayout.of(state) or store.num_experts[layer] != n:
            raise ModelFolderError(f"the expert store's layer {layer} does not match the model's experts "
                                   f"(tensors, shapes, dtypes or expert count differ)")


def _safetensors_offsets(fd: int, path: Path) -> dict[str, tuple[int, int]]:
    """name -> absolute [start, end) byte range, from the safetensors header (an 8-byte
    little-endian length, then that many bytes of JSON; data offsets count from its end)."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise ModelFolderError(f"{path}: not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", head)
    try:
        header = json.loads(os.pread(fd, n, 8))
    except ValueError:
        raise ModelFolderError(f"{path}: not a safetensors file (unreadable header)") from None
    size = os.fstat(fd).st_size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = (8 + n + o for o in entry["data_offsets"])
        if end > size:
            raise ModelFolderError(f"{path}: truncated (tensor {name} ends at byte {end} of {size})")
        out[name] = (start, end)
    return out


def _pread_exact(fd: int, buf, offset: int) -> None:
    view = memoryview(buf).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"short read at byte {offset} of an expert store file")
        view, offset = view[n:], offset + n


__all__ = ["ExpertLayout", "ExpertStore", "RamStore", "DiskStore", "write_store", "write_layer", "write_manifest",
           "check_matches", "layer_file", "Part"]
