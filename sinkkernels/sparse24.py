"""`Sparse24Linear`: an inference `nn.Linear` whose weight is 2:4 sparse, run by the backend the plan picks.

The packed weight (`values`, `meta`) and `bias` are the module's buffers (its
state_dict). Each backend of the layer's plan prepares its own form of the weight
once, at construction and after `.to()` / `.half()` (never per call): `dense` the
dense weight, `triton` nothing (it reads the packed buffers), `cusparselt` the
weight compressed by cuSPARSELt (our extension, plans made once), `cutlass` a
PyTorch semi-structured tensor. A forward picks the backend by M, the
number of rows of the flattened input. `Packed24Linear` is the same weight before
any plan: what a serving replica loads, so that nothing is built until the
dispatch is measured.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import Plan, plan_for
from .formats import bitmask_to_packed, check_packed, pack, packed_shape, unpack

Runner = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# Semi-structured kernels want the dense operand's rows (our M) padded to a multiple of 8 (fp16/bf16).
ROW_MULTIPLE = 8


class _DenseRunner:
    """Reference path (and the CPU path): the dense weight through F.linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class _TritonRunner:
    """Our decompress-in-registers kernel over the packed buffers."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor) -> None:
        from .triton_sparse24 import sparse24_matmul  # imported only when used: triton is heavy and optional

        self.matmul = sparse24_matmul
        self.values, self.meta = values, meta

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.matmul(x, self.values, self.meta, bias)


class _CutlassRunner:
    """PyTorch's CUTLASS semi-structured kernel (Ampere only; `dispatch` never offers it elsewhere).

    The weight is the sparse operand, so `F.linear` runs the transposed product
    `(W @ x^T)^T`. M is padded to a multiple of 8 here rather than relying on the
    PyTorch version's own padding, and the bias is added after the product: a bias
    fused with the internal transpose has produced wrong results in the past.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        try:
            self.weight = to_sparse_semi_structured(weight.contiguous())
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        pad = -m % ROW_MULTIPLE
        y = F.linear(F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous(), self.weight)[:m]
        return y if bias is None else y + bias


def _check_bias(bias: torch.Tensor | None, values: torch.Tensor, out_features: int, name: str) -> None:
    """A bias is added to the packed layer's output as it is: it must match its rows, dtype and device."""
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != values.dtype
                             or bias.device != values.device):
        raise ValueError(f"{name}: bias must be ({out_features},) {values.dtype} on {values.device}, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")


def _stacked(layers: Sequence[nn.Module], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Values, meta and bias of packed `layers` (same input size) with their output rows stacked: a packed row
    is its own values and meta, so nothing is unpacked."""
    first = layers[0]
    if any(layer.in_features != first.in_features for layer in layers):
        raise ValueError(f"{name}: layers of different input sizes cannot be stacked")
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else first.values.new_zeros(layer.out_features)
                          for layer in layers])
    return torch.cat([layer.values for layer in layers]), torch.cat([layer.meta for layer in layers]), bias


class Packed24Linear(nn.Module):
    """A 2:4 linear as a serving replica loads it: the packed buffers and the bias, nothing built from them.

    What a layer should hold depends on the dispatch, measured after loading on the fused shapes; until then
    it waits in this form, which has neither a dense copy nor a backend's: fusion stacks it as it is
    (`stack`), then `sinkkernels.swap.serve_packed_linears` replaces it by a `Sparse24Linear`, or by an
    `nn.Linear` where the plan is dense alone (`to_linear`). It does not run. It is built from tensors
    (`load_sparse_linears`), not from a state dict, so its buffers are not persistent.
    """

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                 name: str = "weight") -> None:
        super().__init__()
        self.out_features, self.in_features = check_packed(values, meta, name)
        _check_bias(bias, values, self.out_features, name)
        self.name = name
        self.register_buffer("values", values.detach().contiguous(), persistent=False)
        self.register_buffer("meta", meta.detach().contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    @classmethod
    def from_bitmask(cls, compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int],
                     bias: torch.Tensor | None = None, name: str = "weight") -> Packed24Linear:
        """From compressed-tensors `sparse-24-bitmask` tensors, without building the dense weight."""
        return cls(*bitmask_to_packed(compressed, bitmask, shape, name), bias, name)

    @classmethod
    def stack(cls, layers: Sequence[Packed24Linear], name: str = "weight") -> Packed24Linear:
        """One packed layer with the output rows of `layers` stacked (q/k/v, gate/up fused for serving)."""
        return cls(*_stacked(layers, name), name)

    def to_linear(self) -> nn.Linear:
        """The `nn.Linear` that serves this layer where its plan is dense alone: the weight unpacked, the
        layer's one dense copy."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(unpack(self.values, self.meta, self.name))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"{self.name}: a packed 2:4 layer runs only once it is given its serving form "
                           "(sinkkernels.swap.serve_packed_linears)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Sparse24Linear(nn.Module):
    """`y = x @ W^T + bias` for a 2:4 sparse W `(out_features, in_features)`; inference only.

    `backend`: None ('auto': SINKSERVE_SPARSE_BACKEND, else `table`, plans measured on
    this device by `sinkkernels.measure`, else the committed dispatch table, else the
    default rule) or one of dense, triton, cusparselt, cutlass (forced; raises
    `BackendUnavailable` if it cannot run here). Build the module on the device and
    dtype it will run in: a later `.to()` rebuilds the backends' weights.
    """

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str | None = None, name: str = "weight", table: dict[str, list] | None = None) -> None:
        super().__init__()
        out_features, in_features = packed_shape(values, name)
        _check_bias(bias, values, out_features, name)
        self.in_features, self.out_features = in_features, out_features
        self.requested_backend = backend
        self.table = table
        self.name = name
        self.register_buffer("values", values.detach().contiguous())
        self.register_buffer("meta", meta.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.released = False
        self._prepare()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None,
                   name: str = "weight", table: dict[str, list] | None = None) -> Sparse24Linear:
        """From a dense 2:4 weight (ValueError naming the row and group that breaks 2:4)."""
        values, meta = pack(weight.detach(), name)
        return cls(values, meta, bias, backend, name, table)

    @classmethod
    def from_bitmask(cls, compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor | Sequence[int],
                     bias: torch.Tensor | None = None, backend: str | None = None,
                     name: str = "weight", table: dict[str, list] | None = None) -> Sparse24Linear:
        """From compressed-tensors `sparse-24-bitmask` tensors, without building the dense weight."""
        values, meta = bitmask_to_packed(compressed, bitmask, shape, name)
        return cls(values, meta, bias, backend, name, table)

    @classmethod
    def stack(cls, layers: Sequence[Sparse24Linear], name: str = "weight") -> Sparse24Linear:
        """One layer computing every one of `layers` (same input size) with their output rows stacked; a
        packed row is its own values and meta, so the stack is made without unpacking. Used to fuse q/k/v
        and gate/up for serving; the plan is made for the stacked shape."""
        for layer in layers:
            layer._check_kept("be stacked")
        return cls(*_stacked(layers, name), layers[0].requested_backend, name, layers[0].table)

    def _prepare(self) -> None:
        """Validate the packed buffers, choose the plan and build each of its backends' weights."""
        check_packed(self.values, self.meta, self.name)
        self.dtype = self.values.dtype
        self.plan: Plan = plan_for(self.values.device, self.values.dtype, self.out_features, self.in_features,
                                   self.requested_backend, self.table)
        self._runners: dict[str, Runner] = {}
        dense = None
        for backend in self.plan.backends:
            if backend == "triton":
                self._runners[backend] = _TritonRunner(self.values, self.meta)
                continue
            dense = unpack(self.values, self.meta, self.name) if dense is None else dense
            if backend == "dense":
                self._runners[backend] = _DenseRunner(dense)
            elif backend == "cusparselt":
                from .cusparselt import CusparseLtWeight  # builds the extension on first use (CUDA only)
                self._runners[backend] = CusparseLtWeight(dense)
            else:
                self._runners[backend] = _CutlassRunner(dense)
        # A plan of the dense backend alone runs what nn.Linear runs, with nothing added per call.
        self._dense_only = self._runners["dense"].weight if self.plan.backends == ("dense",) else None

    def release_packed(self) -> bool:
        """For serving: drop the packed buffers when no backend of the plan reads them (`dense`, `cusparselt`
        and `cutlass` run from forms of their own), so that the layer holds its weight in one form. The layer
        then serves as before but can no longer be moved, reloaded or unpacked. Returns whether it dropped them."""
        if self.released or "triton" in self.plan.backends:
            return False
        self.values = self.meta = None
        self.released = True
        return True

    def held_bytes(self) -> int:
        """Bytes this layer holds for its weight (bias aside): the packed buffers unless released, plus the
        form each other backend of its plan runs from."""
        held = sum(t.nbytes for t in (self.values, self.meta) if t is not None)
        for backend, runner in self._runners.items():
            if backend == "dense":
                held += runner.weight.nbytes
            elif backend == "cusparselt":
                held += runner.nbytes
            elif backend == "cutlass":
                held += runner.weight.packed.nbytes + runner.weight.meta.nbytes
        return held

    def _check_kept(self, action: str) -> None:
        if self.released:
            raise RuntimeError(f"{self.name}: this layer released its packed weights for serving "
                               f"(release_packed) and cannot {action}; load it again instead")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        self._check_kept("be moved or converted")
        super()._apply(fn, recurse)
        self._prepare()
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Module's signature
        self._check_kept("load a state dict")
        super()._load_from_state_dict(*args, **kwargs)
        self._prepare()

    def dense_weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, rebuilt from the packed buffers."""
        self._check_kept("rebuild its dense weight")
        return unpack(self.values, self.meta, self.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            if self._dense_only is not None:
                return F.linear(x, self._dense_only, self.bias)
            x2d = x.reshape(-1, self.in_features)
            y = self._runners[self.plan.backend_for(x2d.shape[0])](x2d, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        except RuntimeError as error:  # checked only on failure: the happy path does no Python work dense does not
            if x.shape[-1] != self.in_features or x.dtype != self.dtype:
                raise ValueError(f"{self.name}: expected input (..., {self.in_features}) {self.dtype}, got "
                                 f"{tuple(x.shape)} {x.dtype}") from error
            raise

    def extra_repr(self) -> str:
        steps = ", ".join(f"M<={m}: {b}" if m is not None else b for m, b in self.plan.steps)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"plan=[{steps}]"
