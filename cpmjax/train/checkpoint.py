"""Training checkpoints with orbax's ``CheckpointManager``.

A checkpoint at step ``k`` (``k`` optimizer updates done) is the directory ``<dir>/<k>/`` with two
items:

- ``state``: the model parameters and optimizer state (a pytree of arrays, sharded arrays are
  written per shard and restored onto the current shardings);
- ``meta``: JSON with ``step``, the data iterator position, the RNG key data, and free-form
  extras (tokens seen, the config).

Saves are asynchronous (``wait()`` blocks until the last one is on disk); orbax writes each into
a temporary directory and renames it only when complete, so a save interrupted midway (even by
``kill -9``) is never taken for a checkpoint and never replaces the last good one. Only the last
``keep`` checkpoints are kept.

Several processes (``cpmjax.distributed``): every process creates the ``Checkpointer`` on the
same (shared) directory and calls ``save`` / ``restore`` together. Each process writes only
the shards its devices hold (``state/ocdbt.process_<i>``); process 0 writes ``meta`` and
renames the step into place after a barrier, once every process has finished, so a step that
one process did not finish is never complete. ``restore`` reads each array onto the template's
shardings, whatever the number of processes that wrote it (elastic restore: 2 -> 1, 1 -> 2).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from cpmjax.errors import CheckpointError, MissingPathError


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    """Save and restore training state under ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 async_save: bool = True, create: bool = True):
        ocp = _ocp()
        self.directory = os.path.abspath(os.fspath(directory))
        if not create and not os.path.isdir(self.directory):
            raise MissingPathError(f"checkpoint directory {self.directory} does not exist")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    # ------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start saving ``state`` (a pytree of arrays) and ``meta`` (JSON-able) as step
        ``step``; returns once the arrays are copied off the device."""
        ocp = _ocp()
        meta = dict(meta, step=int(step))
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore ``(state, meta)`` at ``step`` (default: latest) into the structure, dtypes
        and shardings of ``template``. A missing, partial or corrupt checkpoint raises
        ``CheckpointError`` naming the step directory."""
        ocp = _ocp()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise MissingPathError(f"no complete checkpoint in {self.directory}")
        step_dir = os.path.join(self.directory, str(step))
        if step not in self.steps():
            raise MissingPathError(
                f"no complete checkpoint for step {step} in {self.directory} "
                f"(complete: {self.steps()})"
            )
        abstract = jax.tree.map(_abstract, template)
        try:
            restored = self.manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as exc:  # orbax/tensorstore raise many kinds; name the culprit
            if "structures do not match" in str(exc):
                raise CheckpointError(
                    f"checkpoint {step_dir} was written for a different model or optimizer "
                    "structure (changed model config, delta, or trainable set?): "
                    f"{str(exc)[:400]}"
                ) from exc
            raise CheckpointError(
                f"checkpoint {step_dir} is corrupt or incomplete and cannot be restored: "
                f"{type(exc).__name__}: {str(exc)[:400]}"
            ) from exc
        state, meta = restored["state"], restored["meta"]
        if meta is None or "step" not in meta:
            raise CheckpointError(f"checkpoint {step_dir} has no readable meta item")
        _check_finite(state, step_dir)
        return state, dict(meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _check_finite(state: Any, where: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if hasattr(leaf, "dtype") and np.issubdtype(leaf.dtype, np.floating):
            if not bool(jax.numpy.all(jax.numpy.isfinite(leaf))):
                raise CheckpointError(
                    f"checkpoint {where} holds non-finite values in "
                    f"{jax.tree_util.keystr(path)}"
                )
