"""Scripts that measure the product (kernels, a model step, the engine, the offline
stage) and static checks; run each as `python -m benchmarks.<name>` from the
repository root. They import the product; the product never imports them."""
