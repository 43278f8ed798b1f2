"""Recipe variants of a wind-tunnel size: each changes one ingredient of the family's recipe
(schedule, parametrization, data mix) at the family's step count, trains through
``cpmjax.train``, is recorded once and skipped when run again."""

from __future__ import annotations

import json
import math
import os

import pytest
from helpers import micro_family_config

from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.scaling import load_family_config, non_embedding_params
from cpmjax.scaling.recipes import train_variant, variant_config, variant_runs


def test_variant_configs_change_one_ingredient(tmp_path):
    config = load_family_config(micro_family_config(tmp_path))
    out = str(tmp_path / "v")
    steps = 4 + 2  # the final branch: stable 4 steps + ceil(0.5 * 4) decay steps
    cos = variant_config(config, "m2", "cosine", out_dir=out)
    assert cos.run.steps == steps and cos.optim.schedule == "cosine"
    assert cos.model.config["scale_emb"] == 12 and cos.optim.mup

    sp = variant_config(config, "m2", "no-mup", out_dir=out)
    assert sp.run.steps == steps and sp.optim.schedule == "wsd"
    assert (sp.optim.decay_start, sp.optim.decay_steps) == (4, 2)
    assert not sp.optim.mup and sp.model.init_std == 0.02
    fields = sp.model.config
    assert fields["scale_emb"] == 1.0 and fields["dim_model_base"] == 32
    assert fields["scale_depth"] / math.sqrt(fields["num_hidden_layers"]) == pytest.approx(1.0)
    # the size itself is the family's
    assert non_embedding_params(sp) == non_embedding_params(cos)

    mix = variant_config(config, "m2", "no-task-split", out_dir=out,
                         drop_tasks=["arithmetic"])
    sources = [os.path.relpath(s, config.out_dir) for s in mix.data.sources]
    assert "corpus/tasks/arithmetic" not in sources and "corpus/text" in sources
    assert "corpus/tasks/python_expr" in sources
    assert mix.data.cache_dir == os.path.join(out, "data")  # not the family's token cache

    with pytest.raises(ConfigError, match="unknown recipe variant"):
        variant_config(config, "m2", "adam-free", out_dir=out)
    with pytest.raises(ConfigError, match="drop_tasks"):
        variant_config(config, "m2", "no-task-split", out_dir=out, drop_tasks=["chess"])
    with pytest.raises(ConfigError, match="no size named"):
        variant_config(config, "m9", "cosine", out_dir=out)


def test_variants_train_record_and_skip(tmp_path, monkeypatch):
    config = load_family_config(micro_family_config(tmp_path))
    out = str(tmp_path / "variants")
    with pytest.raises(MissingPathError):
        variant_runs(out)
    cos = train_variant(config, "m1", "cosine", out_dir=out, progress=False)
    mix = train_variant(config, "m1", "no-task-split", out_dir=out, progress=False)
    runs = variant_runs(out)
    assert sorted(runs) == ["m1-cosine", "m1-no-task-split"]
    for record in (cos, mix):
        assert record["steps"] == 6 and record["tokens"] == 6 * 2 * 32
        assert os.path.isfile(os.path.join(record["export_dir"], "model.safetensors"))
        assert record["train_loss"] > 0
    # cosine: warmup to the peak at step 2, then down to cosine_min_ratio of it at the end
    lrs = [json.loads(x)["lr"] for x in open(os.path.join(out, "m1-cosine", "metrics.jsonl"))
           if '"lr"' in x]
    assert max(lrs) == pytest.approx(0.01) and lrs[-1] < 0.5 * max(lrs)
    # the mix without the task split is the text alone (12 files, some held out)
    meta = json.load(open(os.path.join(out, "m1-no-task-split", "data", "train.bin.json")))
    assert 0 < meta["files"] <= 12

    import cpmjax.scaling.family as family_module

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(family_module, "_timed_train", no_training)
    assert train_variant(config, "m1", "cosine", out_dir=out, progress=False) == cos
