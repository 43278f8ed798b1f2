"""Pallas kernels and their references: arrays in, arrays out (nothing here knows of models).

- :func:`flash_attention` (Pallas, forward + backward, log-sum-exp; Mosaic GPU kernels for
  Hopper in ``flash_attention_mosaic_gpu``, portable kernels for TPU and the CPU interpreter),
  :func:`blockwise_attention` (the same algorithm in ``lax``, the CPU path) and
  :func:`attention_reference`.
- :func:`fr_lm_head` (Pallas), :func:`fr_lm_head_blockwise` (``lax``) and
  :func:`fr_lm_head_reference`: top-k log-probs over a frequency-ranked vocabulary subset.
- :func:`local_attention`: the one ``(out, lse)`` interface over the attention
  implementations, chosen by ``impl=`` from :data:`IMPLS` (``"auto"``, ``"reference"``,
  ``"blockwise"``, ``"pallas"``) or a callable; :func:`resolve_impl` maps deprecated names
  (``"xla"`` -> ``"reference"``). This is the implementation vocabulary of the whole library.
"""

from pallas_kernels.flash_attention import (
    attention_reference,
    blockwise_attention,
    flash_attention,
)
from pallas_kernels.fr_lm_head import fr_lm_head, fr_lm_head_blockwise, fr_lm_head_reference
from pallas_kernels.local_attention import (
    IMPLS,
    LocalAttention,
    local_attention,
    local_attention_fn,
    resolve_impl,
)

__all__ = [
    "IMPLS",
    "LocalAttention",
    "attention_reference",
    "blockwise_attention",
    "flash_attention",
    "fr_lm_head",
    "fr_lm_head_blockwise",
    "fr_lm_head_reference",
    "local_attention",
    "local_attention_fn",
    "resolve_impl",
]
