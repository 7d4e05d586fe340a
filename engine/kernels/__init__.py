"""Attention kernels: torch references (CPU) and Triton kernels (GPU), with shape-checking wrappers."""
