"""Writing a model never holds a second copy of it: shards are written as they fill."""
from __future__ import annotations

import json

import torch

from sinkprune.artifact import compressed_state
from sinkprune.calibration import prunable_linears
from sinkprune.dlm.loading import load_model, save_model
from sinkprune.masks import make_mask, parse_pattern
from tests.conftest import VOCAB, random_model


def test_shards_reach_the_disk_while_later_tensors_are_still_to_be_produced(tmp_path):
    model = random_model("llada", dtype=torch.float32)
    on_disk_before_each = []

    def tensors():
        for name, tensor in model.state_dict().items():
            on_disk_before_each.append(len(list((tmp_path / "m").glob(".shard-*"))))
            yield name, tensor

    save_model(model, tmp_path / "m", state=tensors(), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # a shard is flushed when the next tensor would overflow it: all but the last two exist by then
    assert len(shards) >= 3 and on_disk_before_each[-1] == len(shards) - 2
    assert not list((tmp_path / "m").glob(".shard-*"))  # all renamed to their final names
    loaded, _ = load_model(tmp_path / "m", with_tokenizer=False)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_compressed_state_is_lazy_and_covers_every_tensor():
    model = random_model("llada", dtype=torch.float32)
    for linear in prunable_linears(model).values():
        linear.weight.data *= make_mask(linear.weight.abs(), parse_pattern("2:4"))
    stream = compressed_state(model, torch.bfloat16)
    first_name, first = next(stream)  # produced before the rest exists
    names = {first_name} | {name for name, _ in stream}
    targets = set(prunable_linears(model))
    assert {n + suffix for n in targets for suffix in (".compressed", ".bitmask", ".shape")} <= names
    assert not {n + ".weight" for n in targets} & names
    assert first.dtype in (torch.bfloat16, torch.int64, torch.uint8)
