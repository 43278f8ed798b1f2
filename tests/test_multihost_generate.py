"""``cpmjax generate`` with a distributed prefill as a multi-process program: through ``cpmjax
launch``, 2 processes x 4 CPU devices (gloo) generate exactly what 1 process x 8 devices does
(greedy), with APB and with the exact ring; only process 0 prints, and an error in every
process reaches the user as a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import word_tokenizer, write_random_minicpm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96
PROMPT_WORDS = 128  # one token each: 16 per device of 8
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random MiniCPM whose every token id is a word (so the printed text shows every
    generated id), a prompt file of random words, and a compilation cache the runs share."""
    root = tmp_path_factory.mktemp("mh_generate")
    model = root / "m"
    # weights large enough that greedy decoding does not repeat one token: a wrong logit
    # anywhere shows up as different words
    write_random_minicpm(model, vocab_size=VOCAB, max_position_embeddings=256,
                         initializer_range=1.0)
    word_tokenizer(model, " ".join(f"w{i}" for i in range(VOCAB - 3)))
    rng = np.random.default_rng(0)
    prompt = " ".join(f"w{i}" for i in rng.integers(0, VOCAB - 3, PROMPT_WORDS))
    (root / "prompt.txt").write_text(prompt, encoding="utf-8")
    return root, prompt


def _generate(root, processes: int, devices: int, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "cpmjax.cli", "launch", "-n", str(processes), "-k", str(devices),
         "--grace-seconds", "2", "--", "generate", "--model", str(root / "m"),
         "--prompt-file", str(root / "prompt.txt"), "--max-new-tokens", str(NEW_TOKENS),
         "--no-stop", *flags],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def _lines(text: str, process: int) -> list[str]:
    """What process ``process`` printed (its ``[i] `` prefix removed), without gloo's chatter
    (``[Gloo] Rank r is connected ...``, written to stderr by several threads at once)."""
    prefix = f"[{process}] "
    return [line[len(prefix):] for line in text.splitlines()
            if line.startswith(prefix) and "Gloo" not in line and "peer ranks" not in line]


def _run_pair(root, prompt: str, *flags: str) -> str:
    one = _generate(root, 1, 8, *flags)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    two = _generate(root, 2, 4, *flags)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    reference = _lines(one.stdout, 0)
    text = _lines(two.stdout, 0)
    # the prompt echoed, then the new words: the same in 2 processes as in 1
    assert len(reference) == 2 and reference[0].startswith(prompt), reference
    generated = reference[0][len(prompt):].split()  # (the EOS id decodes to nothing)
    assert len(set(generated)) >= 3, reference[0]
    assert text[0] == reference[0]
    assert f"generated {NEW_TOKENS} tok" in text[1] and "[cpmjax] prompt 128 tok" in text[1]
    # process 1 computes alongside but prints nothing of its own (gloo's connection notes on
    # stderr aside)
    quiet = "\n".join(_lines(two.stdout, 1))
    assert "[cpmjax]" not in quiet and prompt[:20] not in quiet, two.stdout[-2000:]
    return " ".join(generated)


@pytest.mark.slow
def test_apb_prefill_in_two_processes_generates_like_one(setup):
    root, prompt = setup
    _run_pair(root, prompt, "--prefill", "apb", "--anchor-len", "8", "--passing-len", "4",
              "--query-len", "4")


@pytest.mark.slow
def test_ring_prefill_in_two_processes_generates_like_one(setup):
    root, prompt = setup
    _run_pair(root, prompt, "--prefill", "ring")


@pytest.mark.slow
def test_a_generate_error_in_every_process_reaches_the_user(setup):
    root, _ = setup
    # 128 prompt tokens over 8 devices leave APB an anchor of 4: a query of 6 does not fit
    proc = _generate(root, 2, 4, "--prefill", "apb", "--query-len", "6")
    assert proc.returncode == 2
    assert "ConfigError: query_len=6" in proc.stdout and "exited with code 2" in proc.stdout


def test_generate_flags_that_do_not_fit_are_config_errors(capsys):
    from cpmjax.cli import main

    assert main(["generate", "--prompt", "x", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "ConfigError: --coordinator HOST:PORT is required" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--coordinator", "h:1", "--num-processes", "2",
                 "--process-id", "5"]) == 2
    assert "--process-id=5 is outside [0, 2)" in capsys.readouterr().err


def test_on_mesh_keeps_what_is_on_the_mesh_and_replicates_the_rest():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from cpmjax.generate.driver import on_mesh, to_host
    from sharding.mesh import make_mesh

    mesh = make_mesh(sequence=8)
    sharded = jax.device_put(np.arange(16.0), NamedSharding(mesh, PartitionSpec("sequence")))
    tree = on_mesh({"a": sharded, "b": jnp.ones((2, 3)), "c": np.int32(3), "d": None}, mesh)
    assert tree["a"] is sharded and tree["d"] is None
    for key in ("b", "c"):
        assert tree[key].sharding.is_fully_replicated
        assert tree[key].sharding.device_set == set(mesh.devices.flat)
    np.testing.assert_array_equal(to_host(tree["a"]), np.arange(16.0))
    assert int(to_host(tree["c"])) == 3
