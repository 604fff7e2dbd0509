"""Put `Sparse24Linear` into any model without touching the model's code (gpt-fast's quantize.py pattern).

`swap_sparse_linears` walks the module tree and replaces each `nn.Linear` whose
weight is 2:4; `load_sparse_linears` does the same from compressed-tensors
`sparse-24-bitmask` tensors (`<name>.compressed`, `<name>.bitmask`,
`<name>.shape`), which is how a pruned artifact's layers are loaded.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .dispatch import plan_for
from .formats import is_24
from .sparse24 import Sparse24Linear

Predicate = Callable[[str, nn.Linear], bool]
BITMASK_SUFFIXES = (".compressed", ".bitmask", ".shape")


def _replace(model: nn.Module, build: Callable[[str, nn.Linear], Sparse24Linear | None]) -> list[str]:
    """Replace every nn.Linear for which `build(name, linear)` returns a module; a shared linear stays shared."""
    replaced: list[str] = []
    built: dict[int, Sparse24Linear] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, nn.Linear):
                new = built.get(id(child)) or build(name, child)
                if new is not None:
                    built[id(child)] = new
                    setattr(parent, child_name, new)
                    replaced.append(name)
            else:
                visit(child, f"{name}.")

    visit(model, "")
    return replaced


def sparse_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """(out_features, in_features) of every nn.Linear whose weight is 2:4: what the dispatch is measured on."""
    return {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear) and is_24(m.weight)}


def swap_sparse_linears(model: nn.Module, backend: str | None = None,
                        predicate: Predicate | None = None, skip_dense: bool = False,
                        table: dict[str, list] | None = None) -> list[str]:
    """Replace each nn.Linear whose weight is 2:4 (and `predicate(name, linear)` holds) by Sparse24Linear.

    Returns the dotted names replaced. Linears that are not 2:4 stay as they are.
    `skip_dense=True` also leaves a layer alone when its plan would run only the
    `dense` backend (on CPU, for instance): the product is the same and nn.Linear
    holds the weight once, where Sparse24Linear would add the packed copy. `table`:
    plans measured on this device (`sinkkernels.measure`), else the committed table.
    """
    def build(name: str, linear: nn.Linear) -> Sparse24Linear | None:
        if (predicate is not None and not predicate(name, linear)) or not is_24(linear.weight):
            return None
        weight = linear.weight
        if skip_dense and plan_for(weight.device, weight.dtype, linear.out_features, linear.in_features,
                                   backend, table).backends == ("dense",):
            return None
        return Sparse24Linear.from_dense(weight, linear.bias, backend=backend, name=f"{name}.weight", table=table)

    with torch.no_grad():
        return _replace(model, build)


def load_sparse_linears(model: nn.Module, tensors: Mapping[str, torch.Tensor], backend: str | None = None,
                        device: torch.device | str | None = None) -> list[str]:
    """Replace each nn.Linear named `<name>` for which `tensors` holds `<name>.compressed/.bitmask/.shape`.

    The bias is `tensors["<name>.bias"]` if present, else the linear's own; the linear's
    weight is never read (it may live on the meta device). The sparse weight is built on
    `device`, by default the linear's own device (CPU if that is meta), in the dtype of
    `compressed`. Every bitmask entry must match a linear of the model, and its shape
    the linear's: anything else raises ValueError naming the tensor.
    """
    prefixes = {key.removesuffix(".bitmask") for key in tensors if key.endswith(".bitmask")}
    for prefix in sorted(prefixes):
        missing = [prefix + s for s in BITMASK_SUFFIXES if prefix + s not in tensors]
        if missing:
            raise ValueError(f"{prefix}: sparse-24-bitmask weight is missing {', '.join(missing)}")

    def build(name: str, linear: nn.Linear) -> Sparse24Linear | None:
        if name not in prefixes:
            return None
        shape = [int(d) for d in tensors[f"{name}.shape"].flatten().tolist()]
        if shape != [linear.out_features, linear.in_features]:
            raise ValueError(f"{name}: stored shape {shape} does not match the model's linear "
                             f"({linear.out_features}, {linear.in_features})")
        target = torch.device(device) if device is not None else linear.weight.device
        target = torch.device("cpu") if target.type == "meta" else target
        compressed, bitmask = (tensors[f"{name}{s}"].to(target) for s in (".compressed", ".bitmask"))
        bias = tensors.get(f"{name}.bias", linear.bias)
        if bias is not None:
            if bias.is_meta:
                raise ValueError(f"{name}: the linear's bias is on the meta device; load it first or pass "
                                 f"{name}.bias in tensors")
            bias = bias.detach().to(target, compressed.dtype)
        return Sparse24Linear.from_bitmask(compressed, bitmask, shape, bias, backend=backend, name=name)

    replaced = _replace(model, build)
    unmatched = prefixes - set(replaced)
    if unmatched:
        raise ValueError(f"sparse-24-bitmask weights for {', '.join(sorted(unmatched))} match no nn.Linear of "
                         "the model")
    return replaced
