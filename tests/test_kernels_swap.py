"""Swapping 2:4 nn.Linear layers for Sparse24Linear from dense weights; loading them packed from bitmask
tensors, then giving each the form its plan runs from."""
from __future__ import annotations

import weakref

import pytest
import torch
from conftest import random_model
from torch import nn

from sinkkernels import dispatch, formats, sparse24
from sinkkernels.sparse24 import Packed24Linear, Sparse24Linear
from sinkkernels.swap import load_sparse_linears, serve_packed_linears, swap_sparse_linears
from sinkkernels.testing import random_24_weight


@pytest.fixture(autouse=True)
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16, bias=False)
        self.gate = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(self.norm(x)) * torch.sigmoid(self.gate(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def prune_24(linear: nn.Linear, seed: int) -> None:
    with torch.no_grad():
        linear.weight.copy_(random_24_weight(*linear.weight.shape, seed=seed))


def toy_model() -> Toy:
    torch.manual_seed(0)
    model = Toy().double()
    prune_24(model.blocks[0].up, 1)
    prune_24(model.blocks[0].down, 2)
    prune_24(model.blocks[1].gate, 3)
    prune_24(model.head, 4)  # 2:4, but excluded by the predicate below
    with torch.no_grad():
        model.blocks[1].up.weight.mul_(torch.rand_like(model.blocks[1].up.weight) > 0.5)  # 50%, not 2:4
    return model


def test_swap_replaces_exactly_the_24_linears_and_keeps_outputs():
    model = toy_model()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        names = swap_sparse_linears(model, predicate=lambda name, linear: name != "head")
        after = model(x)
    assert names == ["blocks.0.up", "blocks.0.down", "blocks.1.gate"]
    swapped = {name for name, module in model.named_modules() if isinstance(module, Sparse24Linear)}
    assert swapped == set(names)
    assert type(model.blocks[1].up) is nn.Linear and type(model.head) is nn.Linear
    assert model.blocks[0].down.bias is None and model.blocks[0].up.bias is not None
    assert torch.equal(after, before)


def test_skip_dense_leaves_layers_that_would_only_run_dense(monkeypatch):
    monkeypatch.delenv("SINKSERVE_SPARSE_BACKEND", raising=False)
    model = toy_model()  # on CPU every plan is dense
    assert swap_sparse_linears(model, skip_dense=True) == []
    assert swap_sparse_linears(model, backend="dense", skip_dense=True) == []
    assert not any(isinstance(module, Sparse24Linear) for module in model.modules())
    assert swap_sparse_linears(model, predicate=lambda name, linear: name != "head") == \
        ["blocks.0.up", "blocks.0.down", "blocks.1.gate"]  # without skip_dense the same layers are swapped


def test_swap_keeps_a_shared_linear_shared():
    shared = nn.Linear(8, 8)
    prune_24(shared, 5)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    assert swap_sparse_linears(model) == ["a", "b.0"]
    assert model["a"] is model["b"][0]


def test_swap_on_a_dlm_keeps_its_logits(model_type):
    model = random_model(model_type)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.in_features % 4 == 0]
    for _, linear in linears:
        with torch.no_grad():
            groups = linear.weight.view(linear.out_features, -1, 4)
            keep = groups.abs().topk(2, dim=-1).indices
            groups.mul_(torch.zeros_like(groups).scatter_(-1, keep, 1.0))
    ids = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        names = swap_sparse_linears(model)
        after = model(ids).logits
    assert names == [name for name, _ in linears] and names
    assert torch.equal(after, before)


def test_load_from_bitmask_tensors():
    model, reference = toy_model(), toy_model()
    tensors = {}
    for name in ("blocks.0.up", "blocks.1.gate"):
        weight = reference.get_submodule(name).weight.detach()
        compressed, bitmask, shape = formats.to_bitmask(weight)
        tensors.update({f"{name}.compressed": compressed, f"{name}.bitmask": bitmask, f"{name}.shape": shape})
        with torch.no_grad():
            model.get_submodule(name).weight.zero_()  # the loaded module must not read the linear's weight
    assert load_sparse_linears(model, tensors) == ["blocks.0.up", "blocks.1.gate"]
    assert type(model.blocks[0].up) is Packed24Linear and model.blocks[0].up.bias is not None
    x = torch.randn(2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.up: a packed 2:4 layer runs only once"):
        model(x)
    assert serve_packed_linears(model) == []  # on CPU every plan is dense: each layer unpacked into nn.Linear
    assert type(model.blocks[0].up) is nn.Linear and type(model.blocks[1].gate) is nn.Linear
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_serving_a_packed_layer_keeps_a_shared_one_shared_and_frees_each_before_the_next():
    """One layer at a time holds two forms: a replaced packed layer is gone before the next is unpacked."""
    packed = [Packed24Linear(*formats.pack(random_24_weight(8, 16, seed=i)), name=str(i)) for i in range(3)]
    model = nn.ModuleDict({"a": packed[0], "b": nn.Sequential(packed[1], packed[2], packed[0])})
    alive = [weakref.ref(layer) for layer in packed]
    del packed
    unpack, replaced_yet_alive = sparse24.unpack, []

    def counting_unpack(*args, **kwargs):
        in_model = {id(m) for m in model.modules() if isinstance(m, Packed24Linear)}
        replaced_yet_alive.append(sum(ref() is not None and id(ref()) not in in_model for ref in alive))
        return unpack(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse24, "unpack", counting_unpack)
        assert serve_packed_linears(model) == []
    assert replaced_yet_alive == [0, 0, 0]  # one unpack per layer, the shared one once
    assert model["a"] is model["b"][2] and type(model["a"]) is nn.Linear
    assert all(ref() is None for ref in alive)


def test_load_from_bitmask_refuses_mismatches():
    compressed, bitmask, shape = formats.to_bitmask(random_24_weight(32, 16, torch.float64))
    entry = {"compressed": compressed, "bitmask": bitmask, "shape": shape}
    with pytest.raises(ValueError, match=r"blocks\.0\.up: sparse-24-bitmask weight is missing blocks\.0\.up\.shape"):
        load_sparse_linears(toy_model(), {f"blocks.0.up.{k}": v for k, v in entry.items() if k != "shape"})
    with pytest.raises(ValueError, match=r"blocks\.0\.down: stored shape \[32, 16\] does not match"):
        load_sparse_linears(toy_model(), {f"blocks.0.down.{k}": v for k, v in entry.items()})
    with pytest.raises(ValueError, match=r"blocks\.9\.up match no nn\.Linear"):
        load_sparse_linears(toy_model(), {f"blocks.9.up.{k}": v for k, v in entry.items()})
