"""The one safetensors module: atomic writes (a failed save leaves the previous one intact),
sharded saves with an index, and a reader whose errors are typed and name the file and tensor."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

from cpmjax import errors
from cpmjax import safetensors_io as st


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    return {"a.weight": rs.randn(4, 3).astype(np.float32),
            "b.bias": rs.randn(5).astype(ml_dtypes.bfloat16),
            "c.ids": np.arange(6, dtype=np.int32).reshape(2, 3)}


def _same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    assert list(x) == list(y)
    for name in x:
        assert x[name].dtype == y[name].dtype
        np.testing.assert_array_equal(np.asarray(x[name], np.float32),
                                      np.asarray(y[name], np.float32))


def test_save_file_roundtrip_and_failed_write_keeps_previous(tmp_path, monkeypatch):
    file = tmp_path / "sub" / "w.safetensors"
    st.save_file(_tensors(0), file, metadata={"format": "pt"})
    _same(st.read_tensors(file), _tensors(0))
    before = file.read_bytes()

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:  # a half-written file, then the disk fills up
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "_write_safetensors", boom)
    with pytest.raises(OSError, match="disk full"):
        st.save_file(_tensors(1), file)
    assert file.read_bytes() == before
    assert os.listdir(file.parent) == ["w.safetensors"]  # no temporary file left behind


def test_write_sharded_single_and_index(tmp_path):
    tensors = _tensors()
    os.makedirs(tmp_path / "one")
    assert st.write_sharded(tmp_path / "one", tensors.items()) == ["model.safetensors"]
    files = st.TensorFiles(tmp_path / "one")
    assert files.names() == list(tensors)
    os.makedirs(tmp_path / "many")
    written = st.write_sharded(tmp_path / "many", tensors.items(), max_shard_bytes=30)
    assert written[-1] == "model.safetensors.index.json" and len(written) == 4
    assert written[0] == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / "many" / written[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    files = st.TensorFiles(tmp_path / "many")
    _same({n: files.get(n) for n in files.names()}, tensors)
    assert files.shape("a.weight") == (4, 3)


def test_atomic_directory_failure_leaves_previous_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    with st.atomic_directory(out) as tmp:
        st.save_file(_tensors(0), os.path.join(tmp, "model.safetensors"))
    (out / "tokenizer.json").write_text("{}")
    (out / "model-old.safetensors").write_text("stale")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError, match="midway"):
        with st.atomic_directory(out) as tmp:
            st.save_file(_tensors(1), os.path.join(tmp, "model.safetensors"))
            raise RuntimeError("failed midway")
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp-save", ".old-save"))]
    with st.atomic_directory(out, stale=lambda e: e.startswith("model")) as tmp:
        st.save_file(_tensors(1), os.path.join(tmp, "model.safetensors"))
    assert sorted(os.listdir(out)) == ["model.safetensors", "tokenizer.json"]
    _same(st.read_tensors(out / "model.safetensors"), _tensors(1))
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.CheckpointError, match="not a directory"):
        with st.atomic_directory(tmp_path / "file"):
            pass


def test_reader_errors_are_typed_and_name_the_culprit(tmp_path):
    with pytest.raises(errors.MissingPathError, match="nothing.safetensors"):
        st.read_tensors(tmp_path / "nothing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(errors.CheckpointError, match="bad.safetensors"):
        st.read_tensors(tmp_path / "bad.safetensors")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(errors.MissingPathError, match="pickle-based weights are not loaded"):
        st.TensorFiles(empty)

    st.save_file(_tensors(), tmp_path / "d" / "model.safetensors")
    files = st.TensorFiles(tmp_path / "d")
    with pytest.raises(errors.MissingTensorError, match=r"tensor z\.weight .*d"):
        files.get("z.weight")
    with pytest.raises(errors.ShapeMismatchError, match=r"a\.weight .*\(4, 3\).*\(3, 4\)"):
        files.get("a.weight", shape=(3, 4))
    assert files.get("a.weight", shape=(4, 3)).shape == (4, 3)

    (tmp_path / "d" / "model.safetensors.index.json").write_text("{ not json")
    with pytest.raises(errors.CheckpointError, match="not a valid safetensors index"):
        st.TensorFiles(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(errors.MissingPathError, match=r"model-00001-of-00002.*a\.weight"):
        st.TensorFiles(tmp_path / "d")
