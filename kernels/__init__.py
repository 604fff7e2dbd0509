"""2:4 sparse formats and compute (sinkserve). Knows nothing of models.

Not Hugging Face's `kernels` package: transformers probes for an importable
`kernels` and accepts it only if its distribution's version lies in the range
it supports; ours ships in the `sinkserve` distribution, whose version is far
below that range (tests/test_packaging.py guards this).
"""
