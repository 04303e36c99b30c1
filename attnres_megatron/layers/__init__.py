"""Megatron-Core modules for Attention Residuals."""
