"""Triton kernels, one file per fused op; each file exposes the backend functions its op dispatches to."""
