"""Training beyond one host: ``cpmjax launch`` (line prefixes, failure propagation), the
distributed settings, each process's share of the global batches, and ``cpmjax train`` as 2
processes x 4 CPU devices (gloo) against 1 process x 8 devices: the same losses, checkpoints
that restore across process counts (2 -> 1, 1 -> 2) bit for bit and continue the loss curve,
and kill -9 of one process: the launcher exits non-zero quickly and a restart resumes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time

import numpy as np
import pytest
import yaml

from cpmjax.distributed import DistributedSettings, resolve
from cpmjax.errors import ConfigError
from cpmjax.launch import child_command, child_env, launch
from cpmjax.train.data import PackedBatches, process_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]

# ----------------------------------------------------------------------------------------------
# launcher


def test_launch_prefixes_lines_and_sets_the_environment():
    child = textwrap.dedent("""
        import os
        print("hello", os.environ["CPMJAX_PROCESS_ID"], os.environ["CPMJAX_NUM_PROCESSES"])
        print("devices", os.environ["XLA_FLAGS"], os.environ["JAX_PLATFORMS"])
        print("coordinator", os.environ["CPMJAX_COORDINATOR"])
    """)
    out = io.StringIO()
    code = launch([sys.executable, "-c", child], 3, 2, out=out)
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    for i in range(3):
        assert f"[{i}] hello {i} 3" in lines
        assert f"[{i}] devices --xla_force_host_platform_device_count=2 cpu" in lines
    coordinators = {line.split()[-1] for line in lines if "coordinator" in line}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")


def test_launch_stops_the_others_when_one_fails():
    child = textwrap.dedent("""
        import os, sys, time
        if os.environ["CPMJAX_PROCESS_ID"] == "1":
            print("failing", flush=True)
            sys.exit(3)
        time.sleep(120)
    """)
    out = io.StringIO()
    t = time.time()
    code = launch([sys.executable, "-c", child], 2, out=out, grace_seconds=1.0)
    assert code == 3
    assert time.time() - t < 20
    text = out.getvalue()
    assert "[1] failing" in text and "process 1 exited with code 3" in text


def test_launch_reports_a_killed_process_and_ignores_sigterm_handlers():
    child = textwrap.dedent("""
        import os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a process that ignores SIGTERM
        if os.environ["CPMJAX_PROCESS_ID"] == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    out = io.StringIO()
    t = time.time()
    code = launch([sys.executable, "-c", child], 2, out=out, grace_seconds=0.5)
    assert code == 128 + signal.SIGKILL
    assert time.time() - t < 20
    assert "process 0 exited with signal SIGKILL" in out.getvalue()


def test_a_terminated_launcher_takes_its_processes_with_it():
    child = "import time; print('ready', flush=True); time.sleep(120)"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cpmjax.cli", "launch", "-n", "2", "--grace-seconds", "1", "--",
         sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        ready = [launcher.stdout.readline() for _ in range(2)]
        assert sorted(ready) == ["[0] ready\n", "[1] ready\n"]
        children = _children(launcher.pid)
        assert len(children) == 2
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=20) == 128 + signal.SIGTERM
        assert "launcher got signal SIGTERM" in launcher.stdout.read()
        deadline = time.time() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in children):
            assert time.time() < deadline, "a child outlived the launcher"
            time.sleep(0.05)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_launch_command_forms_and_bad_settings():
    assert child_command(["train", "--config", "x"])[1:] == ["-m", "cpmjax.cli", "train",
                                                             "--config", "x"]
    assert child_command(["run.py", "a"]) == [sys.executable, "run.py", "a"]
    assert child_command(["echo", "a"]) == ["echo", "a"]
    assert child_command(["./prog", "a"]) == ["./prog", "a"]
    # a word that is no program: a cpmjax subcommand (cpmjax's parser names a wrong one)
    assert child_command(["no-such-program-xyz"])[1:] == ["-m", "cpmjax.cli",
                                                         "no-such-program-xyz"]
    with pytest.raises(ConfigError, match="needs a command"):
        child_command([])
    with pytest.raises(ConfigError, match="--num-processes"):
        launch(["echo"], 0)
    env = child_env(1, 2, "h:1", 4, base={"XLA_FLAGS": "--xla_foo --xla_force_host_platform_"
                                                       "device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
    env = child_env(2, 4, "h:1", None, base={}, gpus_per_process=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5" and "JAX_PLATFORMS" not in env
    with pytest.raises(ConfigError, match="exclude each other"):
        launch(["echo"], 2, 2, gpus_per_process=1)


def test_launch_through_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "cpmjax.cli", "launch", "-n", "2", "--", sys.executable, "-c",
         "import os; print('id', os.environ['CPMJAX_PROCESS_ID'])"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:2]) == ["[0] id 0", "[1] id 1"]


# ----------------------------------------------------------------------------------------------
# distributed settings


def test_distributed_settings_from_flags_and_environment():
    assert resolve(environ={}) is None
    assert resolve(num_processes=1, environ={}) is None
    assert resolve("h:12", 2, 1, environ={}) == DistributedSettings("h:12", 2, 1)
    env = {"CPMJAX_COORDINATOR": "127.0.0.1:5", "CPMJAX_NUM_PROCESSES": "4",
           "CPMJAX_PROCESS_ID": "3"}
    assert resolve(environ=env) == DistributedSettings("127.0.0.1:5", 4, 3)
    # explicit flags win over the environment
    assert resolve("h:1", 2, 0, environ=env) == DistributedSettings("h:1", 2, 0)
    assert resolve(environ={"CPMJAX_DISTRIBUTED": "auto"}).auto
    assert resolve("auto", environ={}).auto
    for args, match in [(("h:1", None, 0), "--num-processes is required"),
                        (("h:1", 2, None), "--process-id is required"),
                        (("h:1", 2, 2), r"--process-id=2 is outside \[0, 2\)"),
                        ((None, 2, 0), "--coordinator HOST:PORT is required"),
                        (("nohost", 2, 0), "is not HOST:PORT"),
                        (("auto", 2, 0), "auto lets JAX detect"),
                        ((None, 1, 1), "only process 0")]:
        with pytest.raises(ConfigError, match=match):
            resolve(*args, environ={})
    with pytest.raises(ConfigError, match="CPMJAX_NUM_PROCESSES='two'"):
        resolve(environ={"CPMJAX_NUM_PROCESSES": "two"})


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    from cpmjax.distributed import initialize

    for name in ("CPMJAX_COORDINATOR", "CPMJAX_NUM_PROCESSES", "CPMJAX_PROCESS_ID",
                 "CPMJAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert initialize() is None
    monkeypatch.setenv("CPMJAX_HEARTBEAT_SECONDS", "0")
    with pytest.raises(ConfigError, match="heartbeat_seconds must be >= 1"):
        initialize()


_PEER = textwrap.dedent("""
    import os, time
    from cpmjax.distributed import initialize, sync
    initialize()
    sync("up")
    print("up", flush=True)
    if os.environ["CPMJAX_PROCESS_ID"] == "1":
        os.kill(os.getpid(), 9)
    sync("never")  # process 1 is dead: JAX's coordination service must end this one
""")


@pytest.mark.slow
def test_without_the_launcher_a_dead_peer_ends_the_others_after_the_heartbeat():
    from cpmjax.launch import free_port

    env = child_env(0, 2, f"127.0.0.1:{free_port()}", 1)
    env["CPMJAX_HEARTBEAT_SECONDS"] = "4"
    procs = [subprocess.Popen([sys.executable, "-c", _PEER],
                              env={**env, "CPMJAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    t = time.time()
    try:
        out = procs[0].communicate(timeout=60)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode != 0 and time.time() - t < 60
    assert "up" in out and "heartbeat timeout" in out


def test_train_flags_that_do_not_fit_are_config_errors(capsys):
    from cpmjax.cli import main

    assert main(["train", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "ConfigError: --coordinator HOST:PORT is required" in capsys.readouterr().err
    assert main(["train", "--coordinator", "h:1", "--num-processes", "2",
                 "--process-id", "5"]) == 2
    assert "--process-id=5 is outside [0, 2)" in capsys.readouterr().err


@pytest.mark.slow
def test_an_error_in_every_process_reaches_the_user(tmp_path):
    # a mesh of 8 devices on 2 processes x 2 devices: every process raises ConfigError
    config = _config(str(tmp_path), str(tmp_path / "run"), {"data": 2, "fsdp": 4})
    log = str(tmp_path / "log")
    proc = _launch(2, 2, config, log)
    assert proc.wait(timeout=120) == 2
    text = _read(log)
    assert "ConfigError: run.mesh 2,4,1,1 covers 8 devices, but the 2 processes" in text
    assert "process " in text and "exited with code 2" in text


# ----------------------------------------------------------------------------------------------
# each process's share of the batches


def test_processes_read_their_rows_of_one_global_order():
    tokens = np.arange(5000, dtype=np.int32) % 97

    def stream(rows=None, skip=0):
        b = PackedBatches(tokens, 8, 16, seed=3, rows=rows)
        for _ in range(skip):
            next(b)
        return b

    whole = stream()
    per_epoch = whole.batches_per_epoch
    expected = [next(whole) for _ in range(per_epoch + 3)]  # crosses an epoch
    for processes in (2, 4, 8):
        share = 8 // processes
        parts = [stream((p * share, (p + 1) * share)) for p in range(processes)]
        for batch in expected:
            local = [next(part) for part in parts]
            for key, value in batch.items():
                np.testing.assert_array_equal(np.concatenate([x[key] for x in local]), value)
        # the position is global: the same in every process, whatever their number
        assert all(part.state() == whole.state() for part in parts)
    resumed = stream((4, 8))
    resumed.restore(whole.state())
    reference = stream(skip=per_epoch + 3)
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(reference)["input_ids"][4:])
    fixed = stream((2, 4)).fixed_batches(2)
    for got, full in zip(fixed, stream().fixed_batches(2), strict=True):
        np.testing.assert_array_equal(got["targets"], full["targets"][2:4])
    with pytest.raises(ConfigError, match="rows"):
        PackedBatches(tokens, 8, 16, rows=(4, 9))


class _FakeSharding:
    def __init__(self, spans):
        self.spans = spans

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(self.spans)}


def test_process_rows_of_a_sharding():
    import jax

    from sharding.mesh import batch_sharding, make_mesh

    mesh = make_mesh(data=2, fsdp=4)
    assert process_rows(batch_sharding(mesh), (16, 32)) == (0, 16)  # one process: all rows
    assert process_rows(_FakeSharding([(4, 6), (6, 8)]), (8, 4)) == (4, 8)
    assert process_rows(_FakeSharding([(0, 8), (0, 8)]), (8, 4)) == (0, 8)  # replicated
    with pytest.raises(ConfigError, match="contiguous"):
        process_rows(_FakeSharding([(0, 2), (4, 6)]), (8, 4))
    assert jax.process_count() == 1


# ----------------------------------------------------------------------------------------------
# training as several processes (through cpmjax launch)

TINY_MODEL = dict(model_type="minicpm", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  dim_model_base=8, scale_emb=4.0, scale_depth=1.4, tie_word_embeddings=True,
                  max_position_embeddings=64)
STEPS = 8


def _config(root: str, out_dir: str, mesh: dict, **run) -> str:
    tree = {
        "model": {"config": dict(TINY_MODEL), "init_std": 0.1},
        "data": {"sources": [os.path.join(root, "corpus")], "vocab_size": 400, "seq_len": 32,
                 "batch_size": 8, "eval_fraction": 0.2,
                 "tokenizer": os.path.join(root, "tokenizer"),
                 "cache_dir": os.path.join(root, "data")},
        "optim": {"lr": 0.01, "warmup_steps": 2, "decay_steps": 3},
        "run": {"steps": STEPS, "out_dir": out_dir, "log_every": 4, "checkpoint_every": 4,
                "eval_batches": 1, "progress": False, "tensorboard": False, "mesh": mesh,
                **run},
    }
    path = out_dir + ".yaml"
    with open(path, "w") as f:
        yaml.safe_dump(tree, f)
    return path


def _launch(processes: int, devices: int, config: str, log: str, *extra: str
            ) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    # the runs of this module compile the same few programs: share them across processes
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.dirname(config), "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cpmjax.cli", "launch", "-n", str(processes), "-k",
             str(devices), "--grace-seconds", "2", "--", "train", "--config", config, *extra],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _train(processes: int, devices: int, config: str, log: str, *extra: str) -> str:
    proc = _launch(processes, devices, config, log, *extra)
    assert proc.wait(timeout=400) == 0, _read(log)[-4000:]
    return _read(log)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _losses(out_dir: str, after_line: int = 0) -> dict[int, float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in records[after_line:] if "loss" in r}


def _assert_close(got: dict[int, float], want: dict[int, float], steps, rtol=1e-6):
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= rtol * abs(want[step]), (step, got, want)


def _copy_run(src: str, dst: str, keep_step: int) -> None:
    """A run directory holding only the checkpoint of ``keep_step`` (and no metrics)."""
    os.makedirs(dst)
    shutil.copytree(os.path.join(src, "checkpoints", str(keep_step)),
                    os.path.join(dst, "checkpoints", str(keep_step)))


def _restore(out_dir: str, step: int, mesh_sizes: dict | None):
    """The (params, optimizer state) of a run's checkpoint as numpy, restored in this one
    process onto a (data, fsdp) mesh of its 8 devices or onto one device."""
    import jax
    from flax import nnx

    from cpmjax.train.checkpoint import Checkpointer
    from cpmjax.train.config import load_config
    from cpmjax.train.setup import build_model, make_optimizer
    from cpmjax.train.step import pin_to_mesh
    from sharding.mesh import make_mesh, shard_model

    config = load_config(out_dir + ".yaml")
    model = build_model(config, 400)
    mesh = None
    if mesh_sizes:
        mesh = make_mesh(**mesh_sizes)
        shard_model(model, mesh)
    optimizer = nnx.Optimizer(model, make_optimizer(config, model), wrt=nnx.Param)
    _, state = nnx.split((model, optimizer))
    if mesh is not None:
        state, _ = pin_to_mesh(state, mesh)
    with Checkpointer(os.path.join(out_dir, "checkpoints"), create=False) as ckpt:
        state, meta = ckpt.restore(state, step)
    if mesh is not None:
        leaves = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2]
        assert any(not x.sharding.is_fully_replicated for x in leaves)
    flat = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}, meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny corpus, its tokenizer and token cache, and the reference runs of 8 steps: 1
    process x 8 devices and 2 processes x 4 devices on a (data=2, fsdp=4) mesh."""
    root = str(tmp_path_factory.mktemp("multihost"))
    corpus = os.path.join(root, "corpus")
    os.makedirs(corpus)
    for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
                 "bisect.py", "colorsys.py", "heapq.py"):
        shutil.copy(os.path.join(STDLIB, name), os.path.join(corpus, name.replace("/", "_")))
    mesh = {"data": 2, "fsdp": 4}
    one = os.path.join(root, "one")
    two = os.path.join(root, "two")
    # the single-process run builds the tokenizer (into the shared data.tokenizer dir) first
    _train(1, 8, _config(root, one, mesh), one + ".log", "--set", "data.tokenizer=null")
    shutil.copytree(os.path.join(one, "tokenizer"), os.path.join(root, "tokenizer"))
    log_two = _train(2, 4, _config(root, two, mesh), two + ".log")
    return root, mesh, one, two, log_two


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    root, mesh, one, two, log = runs
    _assert_close(_losses(two), _losses(one), range(1, STEPS + 1))
    # logs, metrics and the export come from process 0 alone
    assert log.count("final loss") == 1 and "[0] [cpmjax train] step 8" in log
    assert os.path.isfile(os.path.join(two, "hf", "model.safetensors"))
    # every process wrote its own shards of the checkpoint
    state_dir = os.path.join(two, "checkpoints", str(STEPS), "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))
    # the 2-process checkpoint restores in one process, onto 8 devices or onto one, bit for
    # bit; and it holds what the 1-process run holds (to float32 reduction order)
    sharded, meta = _restore(two, STEPS, mesh)
    single, _ = _restore(two, STEPS, None)
    reference, meta_one = _restore(one, STEPS, mesh)
    assert meta["data"] == meta_one["data"] and meta["step"] == STEPS
    assert sharded.keys() == single.keys() == reference.keys()
    for key in sharded:
        np.testing.assert_array_equal(sharded[key], single[key], err_msg=key)
        np.testing.assert_allclose(sharded[key], reference[key], rtol=1e-4, atol=1e-6,
                                   err_msg=key)


_DUMP = textwrap.dedent("""
    import sys
    from cpmjax.distributed import initialize
    initialize()
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils
    from cpmjax.train.checkpoint import Checkpointer
    from cpmjax.train.config import load_config
    from cpmjax.train.setup import build_model, make_optimizer, make_training_mesh
    from cpmjax.train.step import pin_to_mesh
    from sharding.mesh import shard_model

    run_dir, step, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    config = load_config(run_dir + ".yaml")
    mesh, _ = make_training_mesh(config)
    model = build_model(config, 400)
    shard_model(model, mesh)
    optimizer = nnx.Optimizer(model, make_optimizer(config, model), wrt=nnx.Param)
    _, state = nnx.split((model, optimizer))
    state, _ = pin_to_mesh(state, mesh)
    with Checkpointer(run_dir + "/checkpoints", create=False) as ckpt:
        state, _ = ckpt.restore(state, step)
    flat = jax.tree_util.tree_leaves_with_path(state)
    arrays = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
              for p, x in flat}
    if jax.process_index() == 0:
        np.savez(out, **arrays)
""")


@pytest.mark.slow
def test_elastic_restore_one_to_two_is_bit_identical_and_continues(runs, tmp_path):
    root, mesh, one, two, _ = runs
    # restored by 2 processes, a 1-process checkpoint holds exactly what 1 process restores
    script = str(tmp_path / "dump.py")
    with open(script, "w") as f:
        f.write(_DUMP)
    out = str(tmp_path / "restored.npz")
    proc = subprocess.run(
        [sys.executable, "-m", "cpmjax.cli", "launch", "-n", "2", "-k", "4", "--", script, one,
         "4", out], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    here, _ = _restore(one, 4, None)
    with np.load(out) as saved:
        assert set(saved.files) == set(here)
        for key in here:
            np.testing.assert_array_equal(saved[key], here[key], err_msg=key)
    # ... and 2 processes continue the 1-process loss curve from it
    elastic = os.path.join(root, "one_to_two")
    _copy_run(one, elastic, 4)
    log = _train(2, 4, _config(root, elastic, mesh), elastic + ".log")
    assert "resumed from step 4" in log
    _assert_close(_losses(elastic), _losses(one), range(5, STEPS + 1))


@pytest.mark.slow
def test_elastic_restore_two_to_one_continues(runs):
    root, mesh, one, two, _ = runs
    elastic = os.path.join(root, "two_to_one")
    _copy_run(two, elastic, 4)
    log = _train(1, 8, _config(root, elastic, mesh), elastic + ".log")
    assert "resumed from step 4" in log
    _assert_close(_losses(elastic), _losses(two), range(5, STEPS + 1))
    _assert_close(_losses(elastic), _losses(one), range(5, STEPS + 1))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.slow
def test_kill_9_of_one_process_stops_the_run_and_a_restart_resumes(runs):
    root, mesh, one, two, _ = runs
    victim_dir = os.path.join(root, "killed")
    config = _config(root, victim_dir, mesh, throttle_seconds=0.5)
    log = victim_dir + ".log"
    launcher = _launch(2, 4, config, log)
    metrics = os.path.join(victim_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:  # past the step-4 checkpoint (a save may be in flight)
        if os.path.isfile(metrics) and len(_read(metrics).splitlines()) >= 5:
            break
        assert launcher.poll() is None, _read(log)[-3000:]
        time.sleep(0.05)
    children = _children(launcher.pid)
    assert len(children) == 2
    os.kill(children[1], signal.SIGKILL)
    t = time.time()
    code = launcher.wait(timeout=60)
    assert code != 0 and time.time() - t < 60
    assert "process 1 exited with signal SIGKILL" in _read(log)
    for pid in children:  # nobody is left behind
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in _read(f"/proc/{pid}/status")
    killed_at = max(_losses(victim_dir))
    assert 5 <= killed_at < STEPS
    lines = len(_read(metrics).splitlines())
    restart = _train(2, 4, config, victim_dir + ".restart.log")
    start = int(restart.split("resumed from step ")[1].split()[0])
    assert start in (4, 8) and start <= killed_at + 1
    # the restarted run reproduces the uninterrupted 2-process run from its restart step on
    after = _losses(victim_dir, lines)
    assert sorted(after) == list(range(start + 1, STEPS + 1))
    for step, loss in after.items():
        assert loss == _losses(two)[step], (step, loss)


@pytest.mark.slow
def test_sequence_mesh_two_processes_train_like_one(runs):
    root, _, _, _, _ = runs
    mesh = {"data": 2, "sequence": 4}  # each sequence cut over one process's 4 devices
    steps = 6
    one, two = os.path.join(root, "seq_one"), os.path.join(root, "seq_two")
    log = _train(1, 8, _config(root, one, mesh, steps=steps, checkpoint_every=steps), one + ".log")
    assert "sequence parallel over 4 devices" in log
    _train(2, 4, _config(root, two, mesh, steps=steps, checkpoint_every=steps), two + ".log")
    _assert_close(_losses(two), _losses(one), range(1, steps + 1))
    got, _ = _restore(two, steps, None)
    want, _ = _restore(one, steps, None)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
