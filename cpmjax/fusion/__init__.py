"""UltraFuser: token-level fusion of specialists that share a tokenizer (see docs/fusion.md).

    fused = cpmjax.fusion.FusedLM([text_lm, code_lm, math_lm], gate="mlp",
                                  names=["text", "code", "math"])
    logits = fused(input_ids)                    # [b, s, vocab] = sum_i w_i * logits_i
    weights = fused.gate_weights(input_ids)      # [b, s, 3]
    cpmjax.generate(fused, prompts, 32)          # one KV cache per specialist
    cpmjax.fusion.save_fused(fused, "runs/fused", tokenizer_dir=...)
    fused = cpmjax.fusion.load_fused("runs/fused")

Training (two stages, balanced sampling): ``cpmjax.fusion.train_fusion`` / ``cpmjax fuse``.
"""

from cpmjax.fusion.io import (
    FUSION_CONFIG,
    from_specialist_dirs,
    is_fused_dir,
    load_fused,
    read_fusion_config,
    save_fused,
    tokenizer_fingerprint,
)
from cpmjax.fusion.model import GATES, FusedLM, Gate, check_specialists, fuse_logits

__all__ = [
    "FUSION_CONFIG",
    "GATES",
    "FusedLM",
    "Gate",
    "check_specialists",
    "from_specialist_dirs",
    "fuse_logits",
    "is_fused_dir",
    "load_fused",
    "read_fusion_config",
    "save_fused",
    "tokenizer_fingerprint",
]
