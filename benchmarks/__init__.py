"""Benchmarks of the fused ops against eager PyTorch and torch.compile (python -m benchmarks)."""
