"""Triton kernels fused around each network call, each beside its torch reference."""
