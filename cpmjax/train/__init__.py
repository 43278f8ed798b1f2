"""The MiniCPM training recipe: WSD schedule, μP optimizer groups, chunked float32 loss, packed
data, sharded train step, orbax checkpoints, and the bundled default model ``cpmjax-tiny``.

    config = cpmjax.train.load_config("configs/cpmjax-tiny.yaml", ["run.steps=100"])
    result = cpmjax.train.train(config)       # resumable; exports to config.export_dir

See ``docs/training.md``.
"""

from __future__ import annotations

import os
import shutil

from cpmjax.train.checkpoint import Checkpointer
from cpmjax.train.config import TrainConfig, load_config
from cpmjax.train.data import PackedBatches, collect_files, pack_rows, split_files
from cpmjax.train.evaluate import heldout_loss
from cpmjax.train.loop import TrainResult, export_checkpoint, train
from cpmjax.train.loss import chunked_cross_entropy, cross_entropy_reference
from cpmjax.train.metrics import flops_per_token, measure_matmul_peak
from cpmjax.train.optim import adamw_mup, mup_group, mup_labels
from cpmjax.train.schedules import cosine_schedule, wsd_schedule
from cpmjax.train.setup import make_optimizer, make_training_mesh
from cpmjax.train.step import SequenceParallel, make_train_step
from cpmjax.train.tokenizer import train_bpe

TINY_MODEL_NAME = "cpmjax-tiny"


def bundled_model_dir(name: str = TINY_MODEL_NAME) -> str:
    """Where a bundled model lives inside the package: ``cpmjax/assets/<name>``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        name)


def install_bundled_model(export_dir: str, name: str = TINY_MODEL_NAME) -> str:
    """Copy an exported HF directory (config, safetensors, tokenizer files, README.md) into the
    package's assets, replacing the previous copy."""
    target = bundled_model_dir(name)
    keep = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md", "generation_config.json")
    os.makedirs(target, exist_ok=True)
    for entry in os.listdir(target):
        if entry not in ("README.md",):
            os.remove(os.path.join(target, entry))
    for entry in keep:
        src = os.path.join(export_dir, entry)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(target, entry))
    return target


__all__ = [
    "heldout_loss",
    "Checkpointer",
    "PackedBatches",
    "SequenceParallel",
    "TrainConfig",
    "TrainResult",
    "adamw_mup",
    "bundled_model_dir",
    "chunked_cross_entropy",
    "collect_files",
    "cosine_schedule",
    "cross_entropy_reference",
    "export_checkpoint",
    "flops_per_token",
    "install_bundled_model",
    "load_config",
    "make_optimizer",
    "make_train_step",
    "make_training_mesh",
    "measure_matmul_peak",
    "mup_group",
    "mup_labels",
    "pack_rows",
    "split_files",
    "train",
    "train_bpe",
    "wsd_schedule",
]
