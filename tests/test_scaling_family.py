"""The wind tunnel: family config checks, parameter counts, and a two-size micro family with one
decay branch each that trains, records its index, and does no work when run again."""

from __future__ import annotations

import json
import os

import pytest
from helpers import micro_family_config

from cpmjax.errors import ConfigError
from cpmjax.scaling import (
    family_runs,
    load_family_config,
    non_embedding_params,
    train_family,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wind_tunnel_config_spans_the_family():
    config = load_family_config(os.path.join(ROOT, "configs", "wind-tunnel.yaml"))
    counts = [non_embedding_params(config.model_fields_for(s)) for s in config.sizes]
    assert len(counts) >= 5 and counts == sorted(counts)
    assert counts[-1] / counts[0] >= 30 and config.span() == counts[-1] / counts[0]
    layers = [s.layers for s in config.sizes]
    widths = [s.hidden for s in config.sizes]
    assert layers == sorted(layers) and widths == sorted(widths) and layers[0] < layers[-1]
    assert 2 <= len(config.branches.starts) <= 3
    fields = [config.model_fields_for(s) for s in config.sizes]
    assert {f["model_type"] for f in fields} == {"minicpm"}
    assert len({(f["scale_emb"], f["dim_model_base"], f["scale_depth"]) for f in fields}) == 1
    assert config.recipe["model"]["init_std"] == 0.1


def test_non_embedding_params_matches_the_model():
    from flax import nnx

    from cpmjax.models import CausalLM, ModelConfig

    rng = __import__("random").Random(0)
    for _ in range(4):
        heads = rng.choice([1, 2, 4])
        fields = {"model_type": "minicpm", "hidden_size": 8 * heads * rng.choice([1, 2]),
                  "intermediate_size": rng.choice([16, 40]), "vocab_size": 128 * rng.randint(1, 3),
                  "num_hidden_layers": rng.randint(1, 3), "num_attention_heads": heads,
                  "num_key_value_heads": heads, "tie_word_embeddings": rng.random() < 0.5,
                  "dim_model_base": 8}
        mc = ModelConfig.from_hf_dict(fields)
        model = CausalLM(mc, rngs=nnx.Rngs(0))
        total = sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        embedding = mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2)
        assert non_embedding_params(model) == total - embedding
        assert non_embedding_params(mc) == non_embedding_params(fields) == total - embedding


def test_bad_family_configs(tmp_path):
    with pytest.raises(ConfigError, match="grow in layers and width"):
        load_family_config(micro_family_config(tmp_path, sizes=[{"name": "a", "layers": 2, "hidden": 32},
                                                   {"name": "b", "layers": 1, "hidden": 64}]))
    with pytest.raises(ConfigError, match="min_ratio"):
        load_family_config(micro_family_config(tmp_path, require={"min_ratio": 30}))
    with pytest.raises(ConfigError, match="min_sizes"):
        load_family_config(micro_family_config(tmp_path, require={"min_sizes": 5}))
    with pytest.raises(ConfigError, match="warmup"):
        load_family_config(micro_family_config(tmp_path, branches={"starts": [1]}))
    with pytest.raises(ConfigError, match="distinct"):
        load_family_config(micro_family_config(tmp_path, sizes=[{"name": "a", "layers": 1, "hidden": 16},
                                                   {"name": "a", "layers": 2, "hidden": 32}]))
    with pytest.raises(ConfigError, match="nope"):
        train_family(load_family_config(micro_family_config(tmp_path)), only=["nope"])


@pytest.mark.slow
def test_micro_family_trains_branches_and_resumes(tmp_path, monkeypatch):
    config = load_family_config(micro_family_config(tmp_path))
    plan = train_family(config, dry_run=True, progress=False)
    assert [p["action"] for p in plan] == ["train"] * 4
    assert not os.path.exists(config.out_dir)  # a dry run touches nothing

    train_family(config, progress=False)
    runs = family_runs(config.out_dir)
    assert [r.name for r in runs] == ["m1", "m2"]
    for run in runs:
        assert len(run.branches) == 1
        branch = run.final
        assert branch.start_step == 4 and branch.steps == 6
        assert branch.tokens == 6 * 2 * 32 == run.branch_tokens[0]
        assert branch.train_loss > 0 and branch.eval_loss > 0 and run.wall_s > 0
        assert os.path.isfile(os.path.join(branch.export_dir, "model.safetensors"))
        with open(os.path.join(branch.export_dir, "config.json")) as f:
            assert json.load(f)["hidden_size"] == run.width
    assert runs[0].non_embedding_params < runs[1].non_embedding_params
    # any model scored on the family's held-out split reads what the branch recorded
    from cpmjax.hf import from_pretrained
    from cpmjax.scaling import family_heldout_loss

    for run in runs:
        model = from_pretrained(run.export_dir, dtype="float32")
        assert family_heldout_loss(model, config.out_dir) == pytest.approx(
            run.final.eval_loss, rel=1e-4)
    # a second model of a scored structure reuses the compiled step and the held-out batches
    from cpmjax.train import evaluate

    compiled, prepared = len(evaluate._STEPS), len(evaluate._DATA)
    again = from_pretrained(runs[1].export_dir, dtype="float32")
    assert family_heldout_loss(again, config.out_dir) == pytest.approx(
        runs[1].final.eval_loss, rel=1e-4)
    assert (len(evaluate._STEPS), len(evaluate._DATA)) == (compiled, prepared)
    index = json.load(open(os.path.join(config.out_dir, "family.json")))
    entry = index["runs"]["m2"]
    assert entry["branches"]["4"]["config"]["optim"]["decay_start"] == 4
    assert entry["stable"]["config"]["optim"]["schedule"] == "constant"
    # the branch started from the stable run's step-4 state: the same tokens seen before it
    stable_metrics = [json.loads(x) for x in open(
        os.path.join(config.out_dir, "m2", "stable", "metrics.jsonl")) if '"loss"' in x]
    branch_metrics = [json.loads(x) for x in open(
        os.path.join(config.out_dir, "m2", "decay-4", "metrics.jsonl")) if '"loss"' in x]
    assert [r["step"] for r in branch_metrics] == [5, 6]
    # the stable run ends at the peak rate; the branch decays from it
    assert stable_metrics[-1]["lr"] == pytest.approx(0.01)
    assert branch_metrics[0]["lr"] == pytest.approx(0.01)
    assert branch_metrics[1]["lr"] < branch_metrics[0]["lr"]

    mtimes = {p: os.path.getmtime(p) for p in (os.path.join(config.out_dir, "family.json"),
                                               runs[1].export_dir)}
    import cpmjax.scaling.family as family_module

    def no_training(*args, **kwargs):
        raise AssertionError("a finished family was trained again")

    monkeypatch.setattr(family_module, "_timed_train", no_training)
    again = train_family(config, progress=False)
    assert [p["action"] for p in again] == ["skip"] * 4
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes


def test_a_size_trains_in_one_process_at_a_time(tmp_path):
    import fcntl

    from cpmjax.errors import TrainingError

    config = load_family_config(micro_family_config(tmp_path))
    os.makedirs(os.path.join(config.out_dir, "m1"))
    with open(os.path.join(config.out_dir, "m1", ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process training m1
        with pytest.raises(TrainingError, match="another process is training m1"):
            train_family(config, only=["m1"], progress=False)
    assert not os.path.exists(os.path.join(config.out_dir, "m1", "stable"))


def test_lr_sweep_runs_each_rate_per_seed_and_summarizes(tmp_path, monkeypatch):
    from cpmjax.scaling.family import lr_sweep, lr_sweep_results, sweep_key, sweep_summary

    config = load_family_config(micro_family_config(tmp_path, lr_sweep={
        "lrs": [0.003, 0.03], "seeds": [0, 1], "steps": 3, "sizes": ["m1"]}))
    results = lr_sweep(config, progress=False)
    assert sorted(results["m1"]) == sorted(sweep_key(lr, s) for lr in (0.003, 0.03)
                                           for s in (0, 1))
    runs = results["m1"]
    assert runs["0.03@seed1"]["seed"] == 1 and runs["0.03"]["seed"] == 0
    assert runs["0.03@seed1"]["config"]["run"]["seed"] == 1
    # two seeds start from different initializations: different losses at one rate
    assert runs["0.03"]["train_loss"] != runs["0.03@seed1"]["train_loss"]
    summary = sweep_summary(results)["m1"]
    for lr in (0.003, 0.03):
        values = [runs[sweep_key(lr, s)]["eval_loss"] for s in (0, 1)]
        assert summary["rates"][lr]["n"] == 2
        assert summary["rates"][lr]["mean"] == pytest.approx(sum(values) / 2)
    best = min(summary["rates"], key=lambda lr: summary["rates"][lr]["mean"])
    assert summary["best_lr"] == best

    import cpmjax.scaling.family as family_module

    def no_training(*args, **kwargs):
        raise AssertionError("a finished sweep run was trained again")

    monkeypatch.setattr(family_module, "_timed_train", no_training)
    assert lr_sweep_results(config.out_dir) == lr_sweep(config, progress=False)
