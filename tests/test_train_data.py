"""Tokenizer training (byte-level BPE saved as an HF tokenizer), corpus split, memory-mapped
token stream, and the deterministic, resumable packed-batch iterator."""

from __future__ import annotations

import os
import shutil
import sysconfig

import numpy as np
import pytest

from cpmjax.errors import ConfigError, MissingPathError
from cpmjax.train.data import (
    PackedBatches,
    collect_files,
    open_memmap,
    split_files,
    tokenize_to_memmap,
)
from cpmjax.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_bpe

STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name in ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py",
                 "json/tool.py", "textwrap.py", "bisect.py", "colorsys.py"):
        dst = root / name.replace("/", "_")
        shutil.copy(os.path.join(STDLIB, name), dst)
    (root / "notes.md").write_text("A short English note about packing documents.\n" * 20)
    return str(root)


@pytest.fixture(scope="module")
def tokenizer(corpus_dir, tmp_path_factory):
    files = [f.path for f in collect_files([corpus_dir])]
    out = tmp_path_factory.mktemp("tok")
    return train_bpe(files, out, vocab_size=600), str(out)


def test_bpe_saved_as_hf_tokenizer_and_round_trips(tokenizer):
    from transformers import AutoTokenizer

    tok, path = tokenizer
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))
    assert os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    loaded = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert len(loaded) == 600
    assert (loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id,
            loaded.pad_token_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    code = "def fibonacci(n):\n    if n < 2:\n        return n  # ünïcode ✓\n\treturn 0\n"
    ids = loaded(code)["input_ids"]
    assert ids[0] == BOS_ID  # the post-processor prepends BOS
    assert UNK_ID not in ids  # byte-level: everything is encodable
    assert loaded.decode(ids, skip_special_tokens=True) == code


def test_bpe_learns_merges(tokenizer):
    tok, _ = tokenizer
    text = "def __init__(self):\n        return self\n"
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text.encode()) / 2


def test_bpe_rejects_bad_vocab(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe([os.path.join(corpus_dir, "bisect.py")], tmp_path, vocab_size=100)


def test_collect_and_split_are_stable(corpus_dir):
    files = collect_files([corpus_dir])
    assert [f.key for f in files] == sorted(f.key for f in files)
    train, held = split_files(files, 0.3)
    assert held and train and not {f.path for f in train} & {f.path for f in held}
    assert split_files(files, 0.3) == (train, held)
    # the split of a file does not depend on which other files are present
    train2, held2 = split_files(files[1:], 0.3)
    assert {f.key for f in held2} == {f.key for f in held} - {files[0].key}
    with pytest.raises(MissingPathError):
        collect_files([os.path.join(corpus_dir, "no-such-dir-*")])


def test_stdlib_source_exists():
    files = collect_files(["stdlib"])
    keys = {f.key for f in files}
    assert "stdlib/json/decoder.py" in keys
    assert not any("/test/" in k or "site-packages" in k for k in keys)


def test_memmap_holds_documents(tokenizer, corpus_dir, tmp_path):
    tok, _ = tokenizer
    files = collect_files([corpus_dir])[:3]
    data = tokenize_to_memmap(files, tok, tmp_path / "train.bin")
    assert data.dtype == np.uint16
    assert int((data == BOS_ID).sum()) == 3 and int((data == EOS_ID).sum()) == 3
    first_doc = data[: int(np.argmax(data == EOS_ID)) + 1]
    with open(files[0].path) as f:
        assert tok.decode(first_doc.tolist(), skip_special_tokens=True) == f.read()
    again = open_memmap(tmp_path / "train.bin")
    np.testing.assert_array_equal(again, data)
    with pytest.raises(MissingPathError):
        open_memmap(tmp_path / "missing.bin")


def test_iterator_is_deterministic_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16) % 97 + 4
    it = PackedBatches(tokens, batch_size=3, seq_len=16, seed=5, bos_id=1)
    assert it.batches_per_epoch == (999 // 16) // 3
    run = [next(it)["input_ids"] for _ in range(30)]  # crosses epochs
    # a fresh iterator restored at batch 7 continues with exactly the same batches
    resumed = PackedBatches(tokens, batch_size=3, seq_len=16, seed=5, bos_id=1)
    probe = PackedBatches(tokens, batch_size=3, seq_len=16, seed=5, bos_id=1)
    for _ in range(7):
        next(probe)
    resumed.restore(probe.state())
    for i in range(7, 30):
        np.testing.assert_array_equal(next(resumed)["input_ids"], run[i])
    # the windows of one epoch are all distinct
    it2 = PackedBatches(tokens, batch_size=3, seq_len=16, seed=5, bos_id=1)
    starts = set()
    for _ in range(it2.batches_per_epoch):
        batch = next(it2)
        for row in batch["input_ids"]:
            starts.add(tuple(row.tolist()))
    assert len(starts) == it2.batches_per_epoch * 3
    # another seed gives another order
    other = PackedBatches(tokens, batch_size=3, seq_len=16, seed=6, bos_id=1)
    assert not np.array_equal(next(other)["input_ids"], run[0])
    with pytest.raises(ConfigError, match="seed"):
        other.restore({"epoch": 0, "batch": 1, "seed": 5})


def test_iterator_targets_are_shifted_inputs():
    tokens = np.arange(200, dtype=np.uint16)
    it = PackedBatches(tokens, batch_size=2, seq_len=8, shuffle=False)
    batch = next(it)
    np.testing.assert_array_equal(batch["input_ids"][0], np.arange(8))
    np.testing.assert_array_equal(batch["targets"][0], np.arange(1, 9))
    np.testing.assert_array_equal(batch["input_ids"][1], np.arange(8, 16))
    with pytest.raises(ConfigError, match="too short"):
        PackedBatches(tokens[:10], batch_size=2, seq_len=8)


@pytest.mark.parametrize("text, expected", [
    ("MIT", True), ("BSD-3-Clause AND 0BSD AND MIT AND Zlib AND CC0-1.0", True),
    ("Apache 2.0 License", True), ("Python Software Foundation License", True),
    ("Copyright (c) 2001 Enthought | BSD License", True),
    ("GPL-3.0-or-later", False), ("MIT | GNU Lesser General Public License v3 (LGPLv3)", False),
    ("MPL-2.0", False), ("", False), ("Copyright (c) 2020 Someone", False),
    ("Proprietary", False),
])
def test_licence_texts_are_classified(text, expected):
    from cpmjax.train.data import is_permissive

    assert is_permissive(text) is expected


def test_package_sources_take_only_permissive_packages():
    from cpmjax.train.data import collect_files, package_licenses

    licences = package_licenses()
    assert "cpmjax" not in {n.lower() for n in licences}
    assert licences["numpy"]["permissive"]  # BSD-3-Clause AND ... in its License-Expression
    files = collect_files(["package-sources"])
    packages = {f.key.split("/")[1] for f in files}
    assert "numpy" in packages and "jax" in packages
    assert all(licences[p]["permissive"] for p in packages)
    assert all(f.key.startswith("package-sources/") and f.path.endswith(".py") for f in files)
    assert all(os.path.isfile(f.path) for f in files[:50])
    # a package whose licence is not permissive (or says nothing) contributes nothing
    refused = {n for n, info in licences.items() if not info["permissive"]}
    assert not packages & refused
