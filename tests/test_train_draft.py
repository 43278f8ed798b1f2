"""Draft training on the recipe's pieces (cpmjax.train.draft): the schedule is the recipe's
cosine schedule, records go to metrics.jsonl through MetricsLog, checkpoints through the
Checkpointer resume, and token_windows cuts the batches."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from cpmjax.errors import ConfigError
from cpmjax.generate.eagle import new_draft, train_draft
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.data import token_windows
from cpmjax.train.draft import draft_optimizer, draft_schedule
from cpmjax.train.metrics import read_records
from cpmjax.train.schedules import cosine_schedule


def _target() -> CausalLM:
    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, initializer_range=0.2)
    return CausalLM(cfg, rngs=nnx.Rngs(0))


def test_schedule_is_the_recipes_cosine():
    for lr, warmup, steps in ((1e-3, 20, 100), (3e-3, 20, 10), (1e-3, 5, 1)):
        w = max(1, min(warmup, steps // 2))
        ref = cosine_schedule(lr, w, max(steps, 2), min_ratio=0.1)
        got = draft_schedule(lr, warmup, steps)
        for k in range(0, steps + 2):
            assert float(got(k)) == float(ref(k))
    assert draft_optimizer(1e-3, 20, 100) is draft_optimizer(1e-3, 20, 100)


def test_token_windows():
    ids = np.arange(40)
    batch = next(token_windows(ids, 8, 3, seed=0))
    assert batch.shape == (3, 8) and batch.dtype == np.int32
    assert all(np.array_equal(row, np.arange(row[0], row[0] + 8)) for row in batch)
    with pytest.raises(ConfigError, match="seq_len=64"):
        next(token_windows(ids, 64, 2))


def test_train_draft_logs_checkpoints_and_resumes(tmp_path):
    target = _target()
    corpus = np.random.RandomState(0).randint(0, 32, 600)
    windows = token_windows(corpus, 16, 4)
    kw = dict(steps=50, learning_rate=1e-3, warmup=2, log_every=2,
              checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=3)
    draft = new_draft(target, seed=1)
    history = train_draft(target, draft, (next(windows) for _ in range(4)),
                          log_dir=str(tmp_path / "log"), **kw)
    assert [h["step"] for h in history] == [1, 2, 4]
    assert read_records(str(tmp_path / "log")) == history
    assert {"loss", "feature_loss", "token_loss", "top1"} <= set(history[0])
    again = new_draft(target, seed=2)
    assert train_draft(target, again, iter([]), **kw) == []  # resumed at step 4, no data
    for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(draft, nnx.Param)),
                              nnx.to_flat_state(nnx.state(again, nnx.Param)), strict=True):
        np.testing.assert_array_equal(x[...], y[...], err_msg=str(p))
    assert [h["step"] for h in train_draft(target, again, (next(windows) for _ in range(1)),
                                           **kw)] == [5]
    with pytest.raises(ConfigError, match="log_every=0"):
        train_draft(target, again, iter([]), steps=1, log_every=0)
