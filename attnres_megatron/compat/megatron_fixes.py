"""Version-checked fixes for Megatron-Core defects that affect every device.

* ``moe_utils.te_general_gemm`` is only defined when Transformer Engine imports, yet the
  router GEMM tests it with ``is not None``; without TE that raises ``NameError``. We
  define it as ``None`` so Megatron's own plain-PyTorch branch runs.
* Without TE, ``multi_latent_attention.TELinear`` is a placeholder (not a class) while that
  module's ``HAVE_TE`` stays true, so MLA's ``isinstance(linear_proj, TELinear)`` raises
  ``TypeError``. We mark TE as absent there.
* ``CheckpointWithoutOutput()`` (selective ``layernorm``/``mlp`` recompute) turns its default
  ``fp8=False`` into "query TE's FP8 state", which raises ``NameError`` without TE. Without
  TE there is no FP8 state to query, so we switch that query off.
"""

from __future__ import annotations


def install_router_gemm_fallback() -> None:
    """``moe_utils.te_general_gemm = None`` when TE did not define it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install_mla_without_te() -> None:
    """MLA sees TE as absent when its ``TELinear`` is only a placeholder."""
    from megatron.core.transformer import multi_latent_attention

    if multi_latent_attention.HAVE_TE and not isinstance(multi_latent_attention.TELinear, type):
        multi_latent_attention.HAVE_TE = False


def install_recompute_without_fp8_query() -> None:
    """``CheckpointWithoutOutput`` skips the FP8 state query when TE is absent."""
    from megatron.core.tensor_parallel import random as mcore_random

    if mcore_random.HAVE_TE:
        return
    original_init = mcore_random.CheckpointWithoutOutput.__init__

    def init_without_fp8(self, fp8=False):
        original_init(self, fp8=fp8)
        self.fp8 = False

    mcore_random.CheckpointWithoutOutput.__init__ = init_without_fp8
