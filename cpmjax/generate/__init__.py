"""Decoding: the ``generate`` front door, sampling, vanilla and speculative (EAGLE-2 tree,
FR-Spec) decoding on one driver, and the prefill strategies (local, ring, APB, Star).

Modules (imports run downwards in this list; none imports another's private names):

- ``api``: ``generate`` validates a whole request, then dispatches;
- ``speculative``: ``Speculative`` settings, the draft-verify cycle (``tree``, ``frspec``,
  ``eagle``: the draft model);
- ``decode``: the vanilla decode loop;
- ``prefill``: the prefill strategies;
- ``driver``: request, results, buckets, compile cache, the loop driver (streaming);
- ``sampling``: ``SamplingConfig``, logit filtering, ``sample_logits``, ``sample_nodes``.

Note: ``cpmjax.generate`` as an attribute of ``cpmjax`` is the function; import from this
package with ``from cpmjax.generate import ...``.
"""

from cpmjax.generate.api import SPECULATIVE_PREFILLS, generate
from cpmjax.generate.driver import GenerationResult, GenerationStats
from cpmjax.generate.frspec import HEAD_IMPLS
from cpmjax.generate.prefill import PREFILLS
from cpmjax.generate.sampling import (
    SamplingConfig,
    filtered_logits,
    sample_logits,
    sample_nodes,
)
from cpmjax.generate.speculative import (
    DEFAULT_FREQ_VOCAB,
    METHODS,
    Speculative,
    SpeculativeStats,
    default_draft_path,
)

__all__ = [
    "DEFAULT_FREQ_VOCAB",
    "HEAD_IMPLS",
    "METHODS",
    "PREFILLS",
    "SPECULATIVE_PREFILLS",
    "GenerationResult",
    "GenerationStats",
    "SamplingConfig",
    "Speculative",
    "SpeculativeStats",
    "default_draft_path",
    "filtered_logits",
    "generate",
    "sample_logits",
    "sample_nodes",
]
