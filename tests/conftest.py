"""Shared fixtures: tiny LLaDA and Dream models with random but non-degenerate weights."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():  # Triton decides interpreted or compiled when first imported, which building a
    os.environ.setdefault("TRITON_INTERPRET", "1")  # model on meta or profiling may do: before any test module

from sinkprune.dlm import DLMConfig, build_model  # noqa: E402

VOCAB = 96
MASK_ID = 95
PAD_ID = 94


def tiny_hf_config(model_type: str) -> dict:
    if model_type == "llada":
        return {"model_type": "llada", "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
                "mlp_hidden_size": 128, "vocab_size": VOCAB, "embedding_size": VOCAB, "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5, "mask_token_id": MASK_ID, "pad_token_id": PAD_ID, "eos_token_id": 1}
    return {"model_type": "Dream", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": VOCAB, "rope_theta": 1e6,
            "rms_norm_eps": 1e-6, "mask_token_id": MASK_ID, "pad_token_id": PAD_ID, "eos_token_id": 1}


def random_model(model_type: str, dtype=torch.float64, seed: int = 0, std: float = 0.3):
    """Weights large enough that argmax decisions differ between positions and steps."""
    config = DLMConfig.from_hf_config(tiny_hf_config(model_type))
    model = build_model(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype) * std)
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator, dtype=dtype))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator, dtype=dtype))
    return model.eval()


@pytest.fixture(params=["llada", "dream"])
def model_type(request) -> str:
    return request.param


# Deadlines for reading a request in the shared app: short, so that slow clients are dealt with
# within a test, and still far above what a whole request takes to arrive over loopback.
BODY_TIMEOUT_S = 5.0
HEADER_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def app(tmp_path_factory):
    """The Serve app on 127.0.0.1 (embedded model as `dense`, a 2:4 artifact as `pruned`) and a real
    Prometheus scraping it; shared by every end-to-end test module (it takes minutes to start).
    Serve's proxy gets the header deadline (serve.api.guards.PROXY_ENV, read when Ray starts)."""
    from serve.api.guards import HEADER_TIMEOUT_ENV, PROXY_ENV
    from serve.local import local_app
    from tests.e2e import make_dense_and_pruned, prometheus

    root = tmp_path_factory.mktemp("serve")
    dense, pruned = make_dense_and_pruned(root)
    args = {"model": dense, "pruned": pruned, "max_tokens": 32, "max_concurrent_requests": 24,
            "body_timeout_s": BODY_TIMEOUT_S}
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**PROXY_ENV, HEADER_TIMEOUT_ENV: str(HEADER_TIMEOUT_S)}.items():
            env.setenv(key, value)
        with local_app(args) as (base_url, metrics_url):
            with prometheus(metrics_url, root) as query:
                yield SimpleNamespace(base_url=base_url, metrics_url=metrics_url, query=query, pruned=pruned,
                                      body_timeout_s=BODY_TIMEOUT_S, header_timeout_s=HEADER_TIMEOUT_S)
