"""Compatibility layers for running Megatron-Core where it assumes CUDA."""
