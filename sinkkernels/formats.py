"""2:4 sparse weight formats: the one place that packs, unpacks and validates them.

Every backend and the pruning artifact writer go through this module, so a weight
means the same thing everywhere. Two compressed layouts of a 2:4 weight
`(rows, cols)` (cols a multiple of 4, at most 2 non-zeros in each group of 4
consecutive values along a row):

* **packed** (what our Triton kernel reads): `values` `(rows, cols/2)` in the
  weight's dtype, the 2 kept values of each group in column order; `meta` uint8
  `(rows, ceil(cols/8))`, 4 bits per group, 2 groups per byte: group `2i` in the
  low nibble of byte `i`, group `2i+1` in the high nibble; inside a nibble bits
  0-1 give the column (0-3) of the first kept value and bits 2-3 the column of the
  second (first < second). Values plus meta are 9/16 of the dense fp16/bf16 bytes.
* **bitmask** (compressed-tensors `sparse-24-bitmask`): `compressed` `(rows,
  cols/2)`, the kept values in row order (the same tensor as `values`); `bitmask`
  uint8 `(rows, ceil(cols/8))`, one bit per dense element, little-endian bit order
  (`numpy.packbits(mask, axis=-1, bitorder="little")`); `shape` int64 `[rows,
  cols]`.

Every group keeps exactly 2 positions: its non-zeros, then its lowest-index zeros
when it has fewer than 2 non-zeros. Zeros are compared by value and -0.0 is
written as +0.0: a signed zero is a non-zero bit pattern, which has fed garbage to
packers that look at bits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP = 4
KEPT = 2


def normalize_zeros(tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` with every -0.0 replaced by +0.0 (other values untouched)."""
    return torch.where(tensor == 0, torch.zeros_like(tensor), tensor)


def _describe(tensor: object) -> str:
    if isinstance(tensor, torch.Tensor):
        return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}"
    return type(tensor).__name__


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D floating-point tensor, got {_describe(weight)}")
    if weight.shape[1] % GROUP:
        raise ValueError(f"{name}: 2:4 needs the number of columns to be a multiple of 4, got shape "
                         f"{tuple(weight.shape)}")


def _check_index(index: torch.Tensor, rows: int, cols: int, name: str, what: str) -> None:
    expected = (rows, -(-cols // 8))
    if not isinstance(index, torch.Tensor) or index.dtype != torch.uint8 or tuple(index.shape) != expected:
        raise ValueError(f"{name}: expected {what} uint8 of shape {expected}, got {_describe(index)}")


def _check_compressed(values: torch.Tensor, index: torch.Tensor, rows: int, cols: int, name: str,
                      what: str) -> None:
    expected = (rows, cols // 2)
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or tuple(values.shape) != expected:
        raise ValueError(f"{name}: expected floating-point values of shape {expected}, got {_describe(values)}")
    _check_index(index, rows, cols, name, what)
    if values.device != index.device:
        raise ValueError(f"{name}: values on {values.device} but {what} on {index.device}")


def _group_nonzeros(weight: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    return (weight != 0).reshape(rows, cols // GROUP, GROUP).sum(-1)


def is_24(weight: torch.Tensor) -> bool:
    """True when `weight` is a 2-D float tensor with at most 2 non-zeros in every group of 4."""
    try:
        _check_weight(weight, "weight")
    except ValueError:
        return False
    return bool((_group_nonzeros(weight) <= KEPT).all())


def check_24(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError naming the first row and group of `weight` that breaks 2:4."""
    _check_weight(weight, name)
    counts = _group_nonzeros(weight)
    bad = counts > KEPT
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} is not 2:4 sparse: row {row}, group {group} (columns {GROUP * group}..{GROUP * group + 3}) "
            f"has {int(counts[row, group])} non-zeros, at most 2 of every 4 consecutive values along a row may be "
            f"non-zero ({int(bad.sum())} of {bad.numel()} groups break the pattern)")


def _first_two(flags: torch.Tensor) -> torch.Tensor:
    """Sorted positions (…, 2) of the 2 kept columns of each group of 4: flagged ones first, then lowest-index."""
    lane = torch.arange(GROUP, device=flags.device, dtype=torch.int8)
    key = torch.where(flags, lane, lane + GROUP)
    return key.argsort(dim=-1)[..., :KEPT].sort(dim=-1).values


def _positions_from_dense(weight: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    return _first_two((weight != 0).reshape(rows, cols // GROUP, GROUP))


def _positions_to_meta(positions: torch.Tensor) -> torch.Tensor:
    rows, groups, _ = positions.shape
    nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
    if groups % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def _positions_from_meta(meta: torch.Tensor, groups: int, name: str) -> torch.Tensor:
    nibbles = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :groups].long()
    positions = torch.stack([nibbles & 3, nibbles >> 2], dim=-1)
    broken = positions[..., 0] >= positions[..., 1]
    if broken.any():
        row, group = (int(i) for i in broken.nonzero()[0])
        raise ValueError(f"{name}: corrupt 2:4 metadata at row {row}, group {group}: kept columns "
                         f"{positions[row, group].tolist()} are not two distinct increasing positions")
    return positions


def _bits_little(bytes_: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=bytes_.device, dtype=torch.uint8)
    return ((bytes_.unsqueeze(-1) >> shifts) & 1).reshape(bytes_.shape[0], -1).bool()


def _positions_to_bitmask(positions: torch.Tensor, cols: int) -> torch.Tensor:
    rows = positions.shape[0]
    nbytes = -(-cols // 8)
    flags = torch.zeros(rows, nbytes * 8 // GROUP, GROUP, dtype=torch.uint8, device=positions.device)
    flags[:, : cols // GROUP].scatter_(-1, positions, 1)
    weights = 1 << torch.arange(8, device=positions.device, dtype=torch.int32)
    return (flags.reshape(rows, nbytes, 8).int() * weights).sum(-1).to(torch.uint8)


def _positions_from_bitmask(bitmask: torch.Tensor, cols: int, name: str) -> torch.Tensor:
    rows = bitmask.shape[0]
    bits = _bits_little(bitmask)
    if bits[:, cols:].any():
        row = int(bits[:, cols:].any(-1).nonzero()[0])
        raise ValueError(f"{name}: bitmask row {row} sets bits past column {cols - 1}")
    flags = bits[:, :cols].reshape(rows, cols // GROUP, GROUP)
    counts = flags.sum(-1)
    if (counts != KEPT).any():
        row, group = (int(i) for i in (counts != KEPT).nonzero()[0])
        raise ValueError(f"{name}: bitmask is not 2:4: row {row}, group {group} (columns {GROUP * group}.."
                         f"{GROUP * group + 3}) marks {int(counts[row, group])} kept values, expected exactly 2")
    return _first_two(flags)


def _gather(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    kept = weight.reshape(rows, cols // GROUP, GROUP).gather(-1, positions)
    return normalize_zeros(kept.reshape(rows, cols // 2))


def _scatter(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    rows, groups, _ = positions.shape
    dense = torch.zeros(rows, groups, GROUP, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, positions, normalize_zeros(values).reshape(rows, groups, KEPT))
    return dense.reshape(rows, groups * GROUP)


def pack(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 weight -> (values (rows, cols/2), meta uint8 (rows, ceil(cols/8))); ValueError if not 2:4."""
    check_24(weight, name)
    positions = _positions_from_dense(weight)
    return _gather(weight, positions), _positions_to_meta(positions)


def packed_shape(values: torch.Tensor, name: str = "weight") -> tuple[int, int]:
    """Dense (rows, cols) of a packed weight, from its values tensor."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or values.shape[1] % 2:
        raise ValueError(f"{name}: packed values must be 2-D with an even number of columns, got {_describe(values)}")
    return values.shape[0], values.shape[1] * 2


def _packed_positions(values: torch.Tensor, meta: torch.Tensor, name: str) -> torch.Tensor:
    rows, cols = packed_shape(values, name)
    _check_compressed(values, meta, rows, cols, name, "meta")
    return _positions_from_meta(meta, cols // GROUP, name)


def check_packed(values: torch.Tensor, meta: torch.Tensor, name: str = "weight") -> tuple[int, int]:
    """Validate a packed weight (shapes, dtypes, metadata); return its dense (rows, cols)."""
    _packed_positions(values, meta, name)
    return packed_shape(values, name)


def unpack(values: torch.Tensor, meta: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """(values, meta) -> dense (rows, cols) weight with zeros at the pruned positions."""
    return _scatter(values, _packed_positions(values, meta, name))


def _dense_shape(shape: torch.Tensor | Sequence[int], name: str) -> tuple[int, int]:
    dims = shape.flatten().tolist() if isinstance(shape, torch.Tensor) else list(shape)
    if len(dims) != 2 or any(int(d) != d or d <= 0 for d in dims) or dims[1] % GROUP:
        raise ValueError(f"{name}: shape must be two positive integers [rows, cols] with cols a multiple of 4, "
                         f"got {dims}")
    return int(dims[0]), int(dims[1])


def to_bitmask(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense 2:4 weight -> compressed-tensors (compressed, bitmask, shape int64 [rows, cols])."""
    check_24(weight, name)
    positions = _positions_from_dense(weight)
    rows, cols = weight.shape
    return _gather(weight, positions), _positions_to_bitmask(positions, cols), torch.tensor([rows, cols])


def bitmask_to_packed(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int],
                      name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors triple -> (values, meta) without building the dense weight (`compressed` is `values`)."""
    rows, cols = _dense_shape(shape, name)
    _check_compressed(compressed, bitmask, rows, cols, name, "bitmask")
    return normalize_zeros(compressed), _positions_to_meta(_positions_from_bitmask(bitmask, cols, name))


def packed_to_bitmask(values: torch.Tensor, meta: torch.Tensor,
                      name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, meta) -> compressed-tensors (compressed, bitmask, shape) without building the dense weight."""
    positions = _packed_positions(values, meta, name)
    rows, cols = packed_shape(values, name)
    return normalize_zeros(values), _positions_to_bitmask(positions, cols), torch.tensor([rows, cols])


def from_bitmask(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int],
                 name: str = "weight") -> torch.Tensor:
    """compressed-tensors (compressed, bitmask, shape) -> dense weight; ValueError naming the broken part."""
    rows, cols = _dense_shape(shape, name)
    _check_compressed(compressed, bitmask, rows, cols, name, "bitmask")
    return _scatter(compressed, _positions_from_bitmask(bitmask, cols, name))
