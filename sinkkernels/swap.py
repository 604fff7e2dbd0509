"""Put `Sparse24Linear` into any model without touching the model's code (gpt-fast's quantize.py pattern).

`swap_sparse_linears` walks the module tree and replaces each `nn.Linear` whose
weight is 2:4. A pruned artifact's layers take another way, never dense:
`load_sparse_linears` puts a `Packed24Linear` in place of each linear that
compressed-tensors `sparse-24-bitmask` tensors (`<name>.compressed`,
`<name>.bitmask`, `<name>.shape`) stand for, and `serve_packed_linears`, once the
plans are known, gives each the form its plan runs from.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .dispatch import plan_for
from .formats import is_24
from .sparse24 import Packed24Linear, Sparse24Linear

Predicate = Callable[[str, nn.Linear], bool]
BITMASK_SUFFIXES = (".compressed", ".bitmask", ".shape")


def _replace(model: nn.Module, build: Callable[[str, nn.Module], nn.Module | None],
             kind: type[nn.Module] = nn.Linear) -> list[str]:
    """Replace every `kind` module for which `build(name, module)` returns a module; a shared one stays shared.
    A replaced module is freed before the next is built (unless shared), so one layer at a time has both forms."""
    replaced: list[str] = []
    built: dict[int, nn.Module] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name in [name for name, _ in parent.named_children()]:  # names: its memo would keep children
            child = getattr(parent, child_name)
            name = f"{prefix}{child_name}"
            if isinstance(child, kind):
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
    """(out_features, in_features) of every nn.Linear whose weight is 2:4 and every Packed24Linear: what the
    dispatch is measured on."""
    return {(m.out_features, m.in_features) for m in model.modules()
            if isinstance(m, Packed24Linear) or (isinstance(m, nn.Linear) and is_24(m.weight))}


def _dense_only(tensor: torch.Tensor, out_features: int, in_features: int, backend: str | None,
                table: dict[str, list] | None) -> bool:
    """Whether the plan for a layer (on `tensor`'s device, in its dtype) runs only `dense`: then nn.Linear
    serves it, holding the weight once."""
    return plan_for(tensor.device, tensor.dtype, out_features, in_features, backend, table).backends == ("dense",)


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
        if skip_dense and _dense_only(linear.weight, linear.out_features, linear.in_features, backend, table):
            return None
        return Sparse24Linear.from_dense(linear.weight, linear.bias, backend=backend, name=f"{name}.weight",
                                         table=table)

    with torch.no_grad():
        return _replace(model, build)


def load_sparse_linears(model: nn.Module, tensors: Mapping[str, torch.Tensor],
                        device: torch.device | str | None = None) -> list[str]:
    """Replace each nn.Linear named `<name>` for which `tensors` holds `<name>.compressed/.bitmask/.shape` by a
    `Packed24Linear` (it runs once `serve_packed_linears` has given it its serving form).

    The bias is `tensors["<name>.bias"]` if present, else the linear's own; the linear's
    weight is never read (it may live on the meta device). The packed weight is built on
    `device`, by default the linear's own device (CPU if that is meta), in the dtype of
    `compressed`. Every bitmask entry must match a linear of the model, and its shape
    the linear's: anything else raises ValueError naming the tensor.
    """
    prefixes = {key.removesuffix(".bitmask") for key in tensors if key.endswith(".bitmask")}
    for prefix in sorted(prefixes):
        missing = [prefix + s for s in BITMASK_SUFFIXES if prefix + s not in tensors]
        if missing:
            raise ValueError(f"{prefix}: sparse-24-bitmask weight is missing {', '.join(missing)}")

    def build(name: str, linear: nn.Linear) -> Packed24Linear | None:
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
        return Packed24Linear.from_bitmask(compressed, bitmask, shape, bias, name=name)

    replaced = _replace(model, build)
    unmatched = prefixes - set(replaced)
    if unmatched:
        raise ValueError(f"sparse-24-bitmask weights for {', '.join(sorted(unmatched))} match no nn.Linear of "
                         "the model")
    return replaced


def serve_packed_linears(model: nn.Module, backend: str | None = None,
                         table: dict[str, list] | None = None) -> list[str]:
    """Replace each Packed24Linear, one at a time, by what serves it under its plan (`backend`, `table` as for
    `swap_sparse_linears`): an nn.Linear holding the unpacked weight where the plan runs `dense` alone, else a
    Sparse24Linear keeping only the form its plan reads (`release_packed`). A `triton` layer thus never holds
    a dense weight, and `cusparselt` / `cutlass` build theirs from one transient dense copy. Returns the names
    given a Sparse24Linear."""
    def build(name: str, packed: Packed24Linear) -> nn.Module:
        if _dense_only(packed.values, packed.out_features, packed.in_features, backend, table):
            return packed.to_linear()
        layer = Sparse24Linear(packed.values, packed.meta, packed.bias, backend, packed.name, table)
        layer.release_packed()
        return layer

    replaced = _replace(model, build, Packed24Linear)
    return [name for name in replaced if isinstance(model.get_submodule(name), Sparse24Linear)]
