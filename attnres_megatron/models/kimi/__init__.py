"""Kimi Linear building blocks (Kimi Delta Attention) for Megatron-Core."""
