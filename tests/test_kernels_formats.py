"""2:4 formats: packed layout, compressed-tensors bitmask layout, validation, signed zeros."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkkernels import formats
from sinkkernels.testing import random_24_weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so -0.0 and +0.0 differ."""
    return tensor.contiguous().view({4: torch.int32, 2: torch.int16}[tensor.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (5, 12), (8, 64), (3, 20)])
def test_pack_round_trip_is_bit_exact(dtype, shape):
    weight = random_24_weight(*shape, dtype=dtype, seed=shape[1])
    values, meta = formats.pack(weight)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], -(-shape[1] // 8)) and meta.dtype == torch.uint8
    assert torch.equal(bits(formats.unpack(values, meta)), bits(weight))


def test_packed_layout_is_the_documented_one():
    a, b, c, d, e = 1.5, -2.0, 3.0, 4.0, -5.0
    weight = torch.tensor([[0, a, 0, b, c, d, 0, 0, 0, 0, 0, e]])
    values, meta = formats.pack(weight)
    # group 0 keeps columns 1 and 3 -> nibble 1 | 3 << 2 = 13; group 1 keeps 0 and 1 -> 0 | 1 << 2 = 4;
    # group 2 has one non-zero (column 3) and keeps column 0 as filler -> 0 | 3 << 2 = 12, alone in byte 1.
    assert meta.tolist() == [[13 | 4 << 4, 12]]
    assert values.tolist() == [[a, b, c, d, 0.0, e]]


def test_bitmask_is_numpy_packbits_little_with_values_in_row_order():
    weight = random_24_weight(6, 20, seed=3)  # 20 columns: the last bitmask byte is half used
    compressed, bitmask, shape = formats.to_bitmask(weight)
    nonzero = (weight != 0).numpy()
    assert np.array_equal(bitmask.numpy(), np.packbits(nonzero, axis=-1, bitorder="little"))
    assert torch.equal(compressed, weight[weight != 0].reshape(6, 10))
    assert shape.dtype == torch.int64 and shape.tolist() == [6, 20]


def test_bitmask_byte_of_a_known_row():
    _, bitmask, _ = formats.to_bitmask(torch.tensor([[1.0, 0, 0, 2.0, 0, 3.0, 4.0, 0]]))
    assert bitmask.tolist() == [[1 | 1 << 3 | 1 << 5 | 1 << 6]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bitmask_round_trip_and_conversions_agree(dtype):
    weight = random_24_weight(7, 36, dtype=dtype, seed=1)
    weight[0, :4] = torch.tensor([0.0, 0.0, 0.0, 2.0])  # a group with a single non-zero
    compressed, bitmask, shape = formats.to_bitmask(weight)
    assert torch.equal(bits(formats.from_bitmask(compressed, bitmask, shape)), bits(weight))
    values, meta = formats.pack(weight)
    packed = formats.bitmask_to_packed(compressed, bitmask, shape)
    assert torch.equal(packed[0], values) and torch.equal(packed[1], meta)
    back = formats.packed_to_bitmask(values, meta)
    assert all(torch.equal(x, y) for x, y in zip(back, (compressed, bitmask, shape)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_zero_counts_as_zero_and_is_written_as_positive_zero(dtype):
    weight = torch.tensor([[-0.0, 2.0, -0.0, 3.0], [-0.0, 0.0, 0.0, 5.0]], dtype=dtype)
    assert formats.is_24(weight)  # -0.0 is a zero, not a third non-zero
    values, meta = formats.pack(weight)
    assert values.tolist() == [[2.0, 3.0], [0.0, 5.0]]
    assert not torch.signbit(values).any()
    compressed, bitmask, _ = formats.to_bitmask(weight)
    assert bitmask.tolist() == [[1 << 1 | 1 << 3], [1 << 0 | 1 << 3]]
    assert not torch.signbit(compressed).any()
    assert not torch.signbit(formats.unpack(values, meta)).any()
    loaded = formats.from_bitmask(torch.tensor([[-0.0, 5.0]], dtype=dtype), torch.tensor([[9]], dtype=torch.uint8),
                                  [1, 4])
    assert not torch.signbit(loaded).any()
    assert torch.equal(bits(formats.normalize_zeros(torch.tensor([-0.0, 1.0, -2.0]))),
                       bits(torch.tensor([0.0, 1.0, -2.0])))


def test_not_24_is_refused_naming_tensor_row_and_group():
    weight = random_24_weight(4, 16, seed=2)
    weight[2, 4:8] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert not formats.is_24(weight)
    for convert in (formats.pack, formats.to_bitmask, formats.check_24):
        with pytest.raises(ValueError, match=r"blocks\.0\.up\.weight is not 2:4.*row 2, group 1 \(columns 4\.\.7\) "
                                             r"has 3 non-zeros"):
            convert(weight, name="blocks.0.up.weight")


@pytest.mark.parametrize("bad, message", [
    (torch.ones(4, 8, dtype=torch.int32), "2-D floating-point"),
    (torch.zeros(8), "2-D floating-point"),
    (torch.zeros(2, 2, 4), "2-D floating-point"),
    (torch.zeros(3, 6), "multiple of 4"),
    ([[0.0, 1.0]], "2-D floating-point"),
])
def test_pack_refuses_wrong_dtype_and_shape(bad, message):
    with pytest.raises(ValueError, match=message):
        formats.pack(bad)
    assert not formats.is_24(bad)


def test_unpack_refuses_inconsistent_inputs():
    values, meta = formats.pack(random_24_weight(4, 16))
    with pytest.raises(ValueError, match="meta uint8 of shape"):
        formats.unpack(values, meta.int())
    with pytest.raises(ValueError, match="meta uint8 of shape"):
        formats.unpack(values, meta[:3])
    with pytest.raises(ValueError, match="even number of columns"):
        formats.unpack(values[:, :7], meta)
    with pytest.raises(ValueError, match="floating-point values"):
        formats.unpack(values.int(), meta)
    corrupt = meta.clone()
    corrupt[1, 0] = 0x0F  # kept columns (3, 3): not two distinct increasing positions
    with pytest.raises(ValueError, match=r"w: corrupt 2:4 metadata at row 1, group 0"):
        formats.unpack(values, corrupt, name="w")


def test_from_bitmask_refuses_broken_inputs():
    compressed, bitmask, shape = formats.to_bitmask(random_24_weight(3, 12))
    three = bitmask.clone()
    three[1, 1] |= 0b0111_0000  # byte 1 holds columns 8-15: bits 4-6 are columns 12-14, past the last
    with pytest.raises(ValueError, match="past column 11"):
        formats.from_bitmask(compressed, three, shape)
    extra = bitmask.clone()
    extra[2, 0] |= 0b0000_1111  # group 0 of row 2 marks 4 kept values
    with pytest.raises(ValueError, match=r"q\.weight: bitmask is not 2:4: row 2, group 0 .* marks 4"):
        formats.from_bitmask(compressed, extra, shape, name="q.weight")
    with pytest.raises(ValueError, match="values of shape"):
        formats.from_bitmask(compressed[:, :4], bitmask, shape)
    with pytest.raises(ValueError, match="bitmask uint8"):
        formats.from_bitmask(compressed, bitmask.to(torch.int8), shape)
    with pytest.raises(ValueError, match="shape must be two positive integers"):
        formats.from_bitmask(compressed, bitmask, [3, 12, 1])
    with pytest.raises(ValueError, match="shape must be two positive integers"):
        formats.bitmask_to_packed(compressed, bitmask, [3, 10])
