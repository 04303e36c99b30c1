"""Hugging Face interchange: the standalone ``configuration_attnres``/``modeling_attnres`` pair that an
export directory carries (``trust_remote_code=True``), the key and config conventions, and the
export/import between attnres-pretrain checkpoints and Hugging Face directories."""
