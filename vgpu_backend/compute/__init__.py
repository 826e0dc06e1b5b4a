"""The compute context's simulated GPU: kernels on guest memory through the GPU page
table, executed off the event loop in per-timeline order."""
