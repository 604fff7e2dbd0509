"""2:4 sparse formats and compute (the design's `kernels` room). Knows nothing of models.

Imported as `sinkkernels`, not `kernels`: Hugging Face's `kernels` distribution,
which transformers depends on, owns that top-level name (tests/test_packaging.py).
"""
