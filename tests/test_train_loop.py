"""The training loop end to end on a tiny model: loss falls, export loads, 1 device == 8 devices,
kill -9 + resume reproduces the loss sequence, corrupt/partial checkpoints, NaN stop, delta-only
training, config and CLI flags."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from cpmjax.errors import CheckpointError, ConfigError, MissingPathError, NonFiniteLossError
from cpmjax.models import CausalLM, ModelConfig
from cpmjax.train.checkpoint import Checkpointer
from cpmjax.train.config import load_config
from cpmjax.train.loop import (
    flops_per_token,
    make_optimizer,
    make_train_step,
    prepare_data,
    train,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]

TINY_MODEL = dict(model_type="minicpm", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  dim_model_base=8, scale_emb=4.0, scale_depth=1.4, tie_word_embeddings=True,
                  max_position_embeddings=64)


def _config_dict(out_dir: str, base: str | None = None, **run) -> dict:
    data = {"sources": [os.path.join(base or out_dir, "corpus")], "vocab_size": 400,
            "seq_len": 32, "batch_size": 4, "eval_fraction": 0.2}
    if base is not None:
        data.update(tokenizer=os.path.join(base, "run", "tokenizer"),
                    cache_dir=os.path.join(base, "run", "data"))
    return {
        "model": {"config": dict(TINY_MODEL), "init_std": 0.1},
        "data": data,
        "optim": {"lr": 0.01, "warmup_steps": 5, "decay_steps": 10},
        "run": {"steps": 40, "out_dir": out_dir, "log_every": 10, "checkpoint_every": 10,
                "eval_batches": 1, "progress": False, "tensorboard": False, **run},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny corpus, and one finished 40-step run (tokenizer, token cache, checkpoints)."""
    root = str(tmp_path_factory.mktemp("trainbase"))
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus)
    for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py",
                 "textwrap.py", "bisect.py", "colorsys.py", "heapq.py"):
        shutil.copy(os.path.join(STDLIB, name), os.path.join(corpus, name.replace("/", "_")))
    config = load_config(overrides={**_flatten(_config_dict(os.path.join(root, "run")))})
    config.data.sources = [corpus]
    result = train(config)
    return root, config, result


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("config", "hparams"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metrics(run_dir: str) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def test_loss_falls_and_export_loads(base):
    import cpmjax

    root, config, result = base
    losses = result.losses
    assert len(losses) == 40 and result.step == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert result.eval_loss is not None and np.isfinite(result.eval_loss)
    # exported HF layout (bf16) with tokenizer: loads and reproduces the trained model's loss
    model = cpmjax.from_pretrained(result.export_dir, dtype="float32")
    tok = cpmjax.load_tokenizer(result.export_dir)
    assert model.config.vocab_size == 512 and len(tok) == 400
    assert model.config.scale_emb == 4.0 and model.config.dim_model_base == 8
    with open(os.path.join(result.export_dir, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    ids = jnp.asarray([tok("def f(x):\n    return x\n")["input_ids"]])
    assert np.all(np.isfinite(np.asarray(model(ids))))
    # metrics log: one record per step, plus the final eval
    m = _metrics(config.run.out_dir)
    assert sorted(m) == list(range(1, 41))
    np.testing.assert_allclose([m[i] for i in range(1, 41)], losses)


@pytest.mark.slow
def test_one_device_equals_eight_devices():
    from sharding.mesh import batch_sharding, make_mesh, shard_model

    assert len(jax.devices()) >= 8
    config = load_config(overrides={"model.config": {**TINY_MODEL, "vocab_size": 64},
                                    "optim.lr": 0.01, "optim.warmup_steps": 1,
                                    "run.steps": 10})
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 64, (8, 17)).astype(np.int32)
    ids[:, 9] = 1  # a second document starts mid-row
    from cpmjax.train.data import pack_rows

    batch = pack_rows(ids, bos_id=1)

    def run(mesh):
        model = CausalLM(ModelConfig.from_hf_dict({**TINY_MODEL, "vocab_size": 64}),
                         rngs=nnx.Rngs(0))
        sharding = None
        if mesh is not None:
            shard_model(model, mesh)
            sharding = batch_sharding(mesh)
        opt = nnx.Optimizer(model, make_optimizer(config, model), wrt=nnx.Param)
        graphdef, state = nnx.split((model, opt))
        step = jax.jit(make_train_step(graphdef, nnx.Param, chunk=8))
        dev = {k: (jnp.asarray(v) if sharding is None else jax.device_put(v, sharding))
               for k, v in batch.items()}
        losses = []
        for _ in range(3):
            state, metrics = step(state, dev)
            losses.append(float(metrics["loss"]))
        params = nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))
        return losses, {p: np.asarray(v[...]) for p, v in params}, state

    losses1, params1, _ = run(None)
    mesh = make_mesh(data=2, fsdp=4)
    losses8, params8, state8 = run(mesh)
    # the step really ran sharded: the embedding is split over fsdp
    leaves = [x for x in jax.tree.leaves(state8) if getattr(x, "ndim", 0) == 2]
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in leaves)
    np.testing.assert_allclose(losses8, losses1, rtol=2e-6)
    for path in params1:
        np.testing.assert_allclose(params8[path], params1[path], rtol=1e-5, atol=1e-6)


def _write_config(path: str, tree: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return path


def _launch(config_path: str, log: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, os.path.join(REPO, "scripts", "train.py"), "--config", config_path],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )


def _read(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.mark.slow  # three training subprocesses
def test_kill_9_and_resume_reproduces_loss_sequence(base, tmp_path):
    root, _, _ = base
    steps = 16
    common = dict(steps=steps, checkpoint_every=4, log_every=4, throttle_seconds=0.4)
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    full_cfg = _write_config(str(tmp_path / "full.yaml"), _config_dict(full_dir, root, **common))
    kill_cfg = _write_config(str(tmp_path / "kill.yaml"),
                             _config_dict(killed_dir, root, **common))
    full = _launch(full_cfg, str(tmp_path / "full.log"))
    victim = _launch(kill_cfg, str(tmp_path / "kill.log"))
    # kill -9 once the victim has run past its second checkpoint step (a save may be in flight)
    deadline = time.time() + 400
    metrics_file = os.path.join(killed_dir, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.isfile(metrics_file) and len(_read(metrics_file).splitlines()) >= 9:
            break
        assert victim.poll() is None, _read(tmp_path / "kill.log")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert full.wait(timeout=400) == 0, _read(tmp_path / "full.log")
    killed_at = max(_metrics(killed_dir))
    assert killed_at < steps
    resumed = _launch(kill_cfg, str(tmp_path / "resume.log"))
    assert resumed.wait(timeout=400) == 0, _read(tmp_path / "resume.log")
    log = _read(tmp_path / "resume.log")
    start = int(log.split("resumed from step ")[1].split()[0])
    assert 4 <= start <= killed_at
    # the resumed run's losses from its restart step on are exactly the uninterrupted run's
    reference = _metrics(full_dir)
    after = {}
    with open(metrics_file) as f:
        lines = [json.loads(x) for x in f]
    for rec in lines[killed_at:]:  # records written by the resumed process
        if "loss" in rec:
            after[rec["step"]] = rec["loss"]
    assert sorted(after) == list(range(start + 1, steps + 1))
    for step in after:
        assert after[step] == reference[step], (step, after[step], reference[step])


def test_corrupt_and_partial_checkpoints(base, tmp_path):
    root, config, _ = base
    src = os.path.join(config.run.out_dir, "checkpoints")
    ckpt_dir = str(tmp_path / "ckpt")
    shutil.copytree(src, ckpt_dir)
    model = CausalLM(ModelConfig.from_hf_dict({**TINY_MODEL, "vocab_size": 512}),
                     rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(config, model), wrt=nnx.Param)
    _, template = nnx.split((model, opt))
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        steps = ckpt.steps()
        assert steps[-1] == 40 and len(steps) <= 3  # keep-last-N
        # a partial save (what kill -9 mid-save leaves) is not taken for a checkpoint
        os.makedirs(os.path.join(ckpt_dir, "50.orbax-checkpoint-tmp-123", "state"))
        assert ckpt.latest_step() == 40
        state, meta = ckpt.restore(template)
        assert meta["step"] == 40 and meta["data"]["batch"] > 0
    # corrupt the array data of the latest step: a clear error naming the step directory
    data_files = [p for p in glob.glob(os.path.join(ckpt_dir, "40", "state", "**", "*"),
                                       recursive=True)
                  if os.path.isfile(p) and "d/" in p.replace(os.sep, "/")]
    assert data_files
    for p in data_files:
        with open(p, "r+b") as f:
            f.truncate(max(0, os.path.getsize(p) // 3))
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        with pytest.raises(CheckpointError, match="40"):
            ckpt.restore(template)
        # an earlier step is still intact
        _, meta_prev = ckpt.restore(template, steps[-2])
        assert meta_prev["step"] == steps[-2]
        with pytest.raises(MissingPathError):
            ckpt.restore(template, 7)
    with pytest.raises(MissingPathError):
        Checkpointer(str(tmp_path / "nothing"), create=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(base, tmp_path):
    root, config, _ = base
    run_dir = str(tmp_path / "nan")
    shutil.copytree(config.run.out_dir, run_dir)
    tree = _config_dict(run_dir, root, steps=48, checkpoint_every=2)
    tree["optim"] = {"lr": 1e30, "schedule": "constant", "clip_norm": None,
                     "warmup_steps": 0}
    bad = load_config(overrides=_flatten(tree))
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is step 40"):
        train(bad)
    model = CausalLM(ModelConfig.from_hf_dict({**TINY_MODEL, "vocab_size": 512}),
                     rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_optimizer(bad, model), wrt=nnx.Param)
    with Checkpointer(os.path.join(run_dir, "checkpoints"), async_save=False) as ckpt:
        assert ckpt.latest_step() == 40
        state, _ = ckpt.restore(nnx.split((model, opt))[1])  # finite (restore checks)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.floating))


def test_delta_only_trains_delta_params():
    import cpmjax.delta as delta_lib

    config = load_config(overrides={"optim.lr": 0.05, "optim.warmup_steps": 0,
                                    "optim.weight_decay": 0.1, "run.steps": 10})
    model = CausalLM(ModelConfig.from_hf_dict({**TINY_MODEL, "vocab_size": 64}),
                     rngs=nnx.Rngs(0))
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    delta_lib.attach(model, "lora", targets=["q_proj", "v_proj"], r=2)
    wrt = delta_lib.trainable(model)
    opt = nnx.Optimizer(model, make_optimizer(config, model), wrt=wrt)
    graphdef, state = nnx.split((model, opt))
    step = jax.jit(make_train_step(graphdef, wrt, chunk=8))
    ids = np.random.default_rng(0).integers(4, 64, (2, 9)).astype(np.int32)
    from cpmjax.train.data import pack_rows

    batch = {k: jnp.asarray(v) for k, v in pack_rows(ids, bos_id=1).items()}
    delta_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, wrt))]
    for _ in range(2):
        state, _ = step(state, batch)
    model, _ = nnx.merge(graphdef, state)
    after = {p: np.asarray(v[...]) for p, v in
             nnx.to_flat_state(delta_lib.backbone(model))}
    assert len(after) == len(before)
    for (p0, v0), v1 in zip(sorted(before.items()), [after[k] for k in sorted(after)],
                            strict=True):
        np.testing.assert_array_equal(v0, v1, err_msg=str(p0))
    delta_after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, wrt))]
    assert any(not np.array_equal(a, b) for a, b in zip(delta_before, delta_after, strict=True))


def test_config_yaml_overrides_and_cli_flags(tmp_path):
    import argparse

    from cpmjax.train.cli import overrides_from_args, register

    path = _write_config(str(tmp_path / "c.yaml"), {"optim": {"lr": 0.02},
                                                    "run": {"steps": 7}})
    config = load_config(path, ["optim.decay=linear", "run.mesh.fsdp=2"])
    assert config.optim.lr == 0.02 and config.run.steps == 7
    assert config.optim.decay == "linear" and config.run.mesh.fsdp == 2
    assert config.decay_steps == 1 and config.decay_start == 6
    with pytest.raises(ConfigError, match="optim"):
        load_config(path, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(path, ["run.mesh.data=3"])
    with pytest.raises(MissingPathError):
        load_config(str(tmp_path / "missing.yaml"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", path, "--steps", "9", "--delta", "lora",
                              "--delta-targets", "q_proj, v_proj", "--mesh", "2,4,1",
                              "--set", "delta.hparams={r: 4}", "--no-resume"])
    over = overrides_from_args(args)
    cfg = load_config(args.config, over)
    assert cfg.run.steps == 9 and cfg.delta.method == "lora"
    assert cfg.delta.targets == ["q_proj", "v_proj"] and cfg.delta.hparams == {"r": 4}
    assert (cfg.run.mesh.data, cfg.run.mesh.fsdp, cfg.run.mesh.tensor) == (2, 4, 1)
    assert cfg.run.resume is False


def test_flops_per_token_counts_matmuls():
    mc = ModelConfig.from_hf_dict({**TINY_MODEL, "vocab_size": 64})
    h, i, layers, hd = 32, 64, 2, 8
    per_layer = h * hd * (4 + 2 + 2 + 4) // 1 + 3 * h * i  # q,k,v,o with GQA + MLP
    expected = 6 * (layers * per_layer + 64 * h) + 6 * layers * 16 * 4 * hd
    assert flops_per_token(mc, 16) == expected


def test_prepare_data_reuses_cache(base):
    root, config, _ = base
    tok, train_tokens, eval_tokens = prepare_data(config)
    assert len(tok) == 400 and train_tokens.size > 1000 and eval_tokens is not None
    assert os.path.isfile(os.path.join(config.run.out_dir, "data", "train.bin"))


def test_heldout_loss_reads_eval_loss_and_never_trains_a_tokenizer(base, tmp_path):
    from cpmjax.errors import MissingPathError
    from cpmjax.hf import from_pretrained
    from cpmjax.train import heldout_loss

    root, config, result = base
    model = from_pretrained(result.export_dir, dtype="float32")
    assert heldout_loss(model, config) == pytest.approx(result.eval_loss, rel=1e-4)
    # a config naming no tokenizer, whose run directory holds none, is refused untouched
    fresh = load_config(overrides=_flatten(_config_dict(str(tmp_path / "run"))))
    fresh.data.sources = config.data.sources
    with pytest.raises(MissingPathError, match="data.tokenizer"):
        heldout_loss(model, fresh)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_sequence_parallel_train_equals_one_device(base, tmp_path, capsys):
    """``cpmjax train --mesh 2,1,1,4`` (data 2 x sequence 4, zigzag layout, burst ring) gives
    the per-step losses and eval loss of the one-device run, and resumes like it."""
    from cpmjax.train.cli import main

    root, _, _ = base
    common = dict(steps=3, checkpoint_every=0, log_every=1, eval_batches=1,
                  async_checkpointing=False)

    def tree(name):
        out = _config_dict(str(tmp_path / name), root, **common)
        out["optim"].update(warmup_steps=1, decay_steps=1)
        return out

    single = train(load_config(overrides=_flatten(tree("one"))), export=False)
    path = _write_config(str(tmp_path / "sp.yaml"), tree("sp"))
    argv = ["--config", path, "--mesh", "2,1,1,4", "--set", "run.mesh.sequence_impl=burst",
            "--no-progress"]
    assert main(argv) == 0
    assert "sequence parallel over 4 devices (attention burst, layout zigzag)" in (
        capsys.readouterr().err)
    losses = _metrics(str(tmp_path / "sp"))
    assert sorted(losses) == [1, 2, 3]
    np.testing.assert_allclose([losses[i] for i in (1, 2, 3)], single.losses, rtol=1e-5)
    with open(tmp_path / "sp" / "metrics.jsonl") as f:
        final = [json.loads(x) for x in f if "final_eval_loss" in x]
    np.testing.assert_allclose(final[-1]["final_eval_loss"], single.eval_loss, rtol=1e-5)
    saved = load_config(str(tmp_path / "sp" / "config.yaml"))
    assert (saved.run.mesh.data, saved.run.mesh.sequence) == (2, 4)


def test_sequence_parallel_bad_settings_name_the_setting(tmp_path):
    from cpmjax.train.cli import overrides_from_args, register
    from cpmjax.train.config import check_sequence_parallel

    with pytest.raises(ConfigError, match=r"data.seq_len=36 .*2\*run.mesh.sequence=8"):
        load_config(overrides={"data.seq_len": 36, "run.mesh.sequence": 4})
    with pytest.raises(ConfigError, match=r"data.seq_len=30 .*run.mesh.sequence=4"):
        load_config(overrides={"data.seq_len": 30, "run.mesh.sequence": 4,
                               "run.mesh.sequence_layout": "contiguous"})
    with pytest.raises(ConfigError, match="sequence_impl"):
        load_config(overrides={"run.mesh.sequence_impl": "fast"})
    config = load_config(overrides={"data.seq_len": 32, "run.mesh.sequence": 4,
                                    "run.out_dir": str(tmp_path)})
    config.data.seq_len = 20  # changed after validation: train() checks again, before any work
    with pytest.raises(ConfigError, match="data.seq_len=20"):
        train(config)
    check_sequence_parallel(load_config(overrides={"data.seq_len": 24,
                                                   "run.mesh.sequence": 4,
                                                   "run.mesh.sequence_layout": "contiguous"}))
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    over = overrides_from_args(parser.parse_args(["train", "--mesh", "2,1,1,4"]))
    assert over == {"run.mesh.data": 2, "run.mesh.fsdp": 1, "run.mesh.tensor": 1,
                    "run.mesh.sequence": 4}
    with pytest.raises(ConfigError, match="DATA,FSDP,TENSOR\\[,SEQUENCE\\]"):
        overrides_from_args(parser.parse_args(["train", "--mesh", "2,4"]))
