"""A loaded model made ready to serve: what a replica and the serving benchmark both do, in one place.

First q/k/v and gate/up are fused (`EngineConfig.fuse_projections`), then, for a 2:4 model, the sparse
dispatch is measured on this device at the M values this engine produces, on the fused shapes, and
`Sparse24Linear` swapped in where a sparse backend wins (`sinkkernels.measure.swap_for_serving`). The 2:4
layers come either as `nn.Linear` with 2:4 weights (a model pruned in memory, as the serving benchmark
builds it) or packed as a replica loads an artifact (`load_model(..., packed=True)`): those are fused
packed, and only the ones whose plan is dense are unpacked, into `nn.Linear`, one at a time.
With `EngineConfig.compile_elementwise`, the blocks' norm, rotary and SwiGLU chains run compiled
(`sinkprune.dlm.layers`, process-wide). CUDA graphs are captured afterwards, by the engine's runner, on the
layers as swapped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import nn

from serve.engine.config import EngineConfig
from sinkkernels.measure import MeasuredTable, engine_m_values, swap_for_serving
from sinkprune.dlm.fusion import fuse_projections
from sinkprune.dlm.layers import compile_elementwise, set_elementwise


@dataclass
class Prepared:
    """What preparing did: the fused modules, the layers given a sparse backend, the dispatch measured."""

    fused: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    dispatch: MeasuredTable | None = None
    seconds: float = 0.0
    sparse_bytes_held: int = 0  # what the swapped layers hold for their weights
    sparse_dense_bytes: int = 0  # what the same layers' dense weights would take
    compiled_elementwise: bool = False

    def summary(self) -> dict:
        ratio = self.sparse_bytes_held / self.sparse_dense_bytes if self.sparse_dense_bytes else None
        return {"fused_projections": len(self.fused), "compiled_elementwise": self.compiled_elementwise,
                "sparse_layers": len(self.swapped),
                "sparse_dispatch": self.dispatch.summary() if self.dispatch is not None else None,
                "sparse_weight_bytes_held": self.sparse_bytes_held,
                "sparse_weight_bytes_held_vs_dense": None if ratio is None else round(ratio, 4),
                "prepare_seconds": round(self.seconds, 3)}


def prepare_for_serving(model: nn.Module, config: EngineConfig, sparse: bool,
                        backend: str | None = None) -> Prepared:
    """Fuse, then (if `sparse`: the model's linears are 2:4, or loaded packed) measure the dispatch and swap."""
    started = time.perf_counter()
    prepared = Prepared(fuse_projections(model) if config.fuse_projections else [])
    if sparse:
        m_values = engine_m_values(config.max_num_seqs, config.max_tokens_per_step)
        prepared.swapped, prepared.dispatch = swap_for_serving(model, m_values, backend)
        layers = [model.get_submodule(name) for name in prepared.swapped]
        prepared.sparse_bytes_held = sum(layer.held_bytes() for layer in layers)
        prepared.sparse_dense_bytes = sum(layer.out_features * layer.in_features * layer.dtype.itemsize
                                          for layer in layers)
    if config.compile_elementwise:
        set_elementwise(compile_elementwise())  # compiled on first use: by the runner's warm-up on a GPU
        prepared.compiled_elementwise = True
    prepared.seconds = time.perf_counter() - started
    return prepared
