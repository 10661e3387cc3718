"""Dispatch-latency and lifecycle-throughput benchmarks of the control plane (``python -m bench``)."""
