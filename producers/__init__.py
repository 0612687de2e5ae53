"""What emits events: the Python SDK and the synthetic workload."""
