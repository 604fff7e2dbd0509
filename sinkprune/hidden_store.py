"""Where the calibration hidden states live between blocks.

Layer-by-layer calibration keeps, for every calibration sample, the hidden
state entering the current block: samples x seq x hidden x bytes. At LLaDA-8B
shape with the paper's defaults on noised windows (128 windows x 10 timesteps x
4096 tokens x 4096) that is 43 GB in bf16, more than fits beside the weights
on one 80 GB GPU. Three places, one interface (a slot per batch, read and
rewritten in place as the batch passes through a block):

- `device`: on the compute device (fastest; the default);
- `host`: in CPU memory, moved to the device one batch at a time;
- `disk`: in an unlinked temporary file, one batch in memory at a time. Reads
  and writes go through the page cache, not the process's own memory, so the
  kernel can evict them under pressure and the process's peak memory is
  weights + one block's statistics + one batch.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

PLACES = ("device", "host", "disk")


class HiddenStates:
    """One tensor slot per calibration batch, each (batch, seq, hidden) in `dtype`."""

    def __init__(self, place: str, device: torch.device, dtype: torch.dtype, directory: str | Path | None = None):
        if place not in PLACES:
            raise ValueError(f"hidden states go to one of {', '.join(PLACES)}, not {place!r}")
        self.place, self.device, self.dtype = place, torch.device(device), dtype
        self._slots: list[torch.Tensor | tuple[int, torch.Size]] = []
        self._file = tempfile.TemporaryFile(dir=directory, prefix="sinkprune-hidden-") if place == "disk" else None
        self._end = 0

    def append(self, hidden: torch.Tensor) -> None:
        if self._file is None:
            self._slots.append(self._keep(hidden))
            return
        self._slots.append((self._end, hidden.shape))
        self._end += hidden.numel() * hidden.element_size()
        self[len(self._slots) - 1] = hidden

    def __len__(self) -> int:
        return len(self._slots)

    def __getitem__(self, index: int) -> torch.Tensor:
        """The batch's hidden states on the compute device."""
        slot = self._slots[index]
        if self._file is None:
            return slot.to(self.device)
        offset, shape = slot
        buffer = bytearray(shape.numel() * self.dtype.itemsize)
        self._file.seek(offset)
        if self._file.readinto(buffer) != len(buffer):
            raise OSError(f"hidden-state file truncated at batch {index}")
        return torch.frombuffer(buffer, dtype=self.dtype).reshape(shape).to(self.device)

    def __setitem__(self, index: int, hidden: torch.Tensor) -> None:
        if self._file is None:
            self._slots[index] = self._keep(hidden)
            return
        offset, shape = self._slots[index]
        if hidden.shape != shape:
            raise ValueError(f"batch {index} has shape {tuple(shape)}, got {tuple(hidden.shape)}")
        data = hidden.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self._file.seek(offset)
        self._file.write(data.view(torch.uint8).numpy().data)

    def _keep(self, hidden: torch.Tensor) -> torch.Tensor:
        target = self.device if self.place == "device" else torch.device("cpu")
        return hidden.detach().to(device=target, dtype=self.dtype)

    def close(self) -> None:
        self._slots.clear()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> HiddenStates:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
