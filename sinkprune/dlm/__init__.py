"""The diffusion LMs themselves: configs, architectures, loading, noising, decoding."""
from sinkprune.dlm.config import DLMConfig
from sinkprune.dlm.loading import build_model, load_model, load_tokenizer, save_model
from sinkprune.dlm.model import DiffusionLM, DLMOutput

__all__ = ["DLMConfig", "DiffusionLM", "DLMOutput", "build_model", "load_model", "load_tokenizer", "save_model"]
