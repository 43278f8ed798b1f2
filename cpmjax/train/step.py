"""The train and eval steps: pure functions over the split state of ``(model, optimizer)``, jitted
by the loop (optionally sharded), and the placement of batches and state on the devices.

- ``make_train_step(graphdef, wrt, chunk)``: ``(state, batch) -> (state, metrics)``
  (``(state, batch, teacher_state)`` with ``distill=``: CPET hidden-state distillation);
- ``make_eval_step(graphdef, chunk)``: ``(state, batch) -> (loss, tokens)``;
- ``SequenceParallel(mesh, impl, layout)``: lay a batch out over the ``sequence`` mesh axis and
  run a step under the ``"burst"`` attention backend (``run.mesh.sequence > 1``);
- ``to_device(batch, sharding)`` and ``pin_to_mesh(state, mesh)``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cpmjax import ops
from cpmjax.errors import ShapeMismatchError
from cpmjax.models import CausalLM
from cpmjax.train.distill import Distill, distill_loss_fn
from cpmjax.train.loss import chunked_cross_entropy


def loss_fn(model: CausalLM, batch: dict[str, jax.Array], chunk: int, remat: bool = True
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Chunked next-token loss of one packed batch (see ``cpmjax.train.loss``)."""
    hidden = model(batch["input_ids"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"], return_hidden=True)
    return chunked_cross_entropy(hidden, model.head_weight(), batch["targets"],
                                 batch["loss_mask"], chunk_size=chunk, remat=remat)


def make_train_step(graphdef: Any, wrt: Any, chunk: int = 128, remat: bool = True,
                    distill: Distill | None = None
                    ) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """The pure train step over the split state of ``(model, optimizer)``:
    ``step(state, batch) -> (new_state, {"loss", "grad_norm", "param_norm", "accuracy",
    "tokens"})``; ``loss`` is that of the parameters before the update, ``param_norm`` the norm
    of the trainable parameters after it.
    Jit it (``jax.jit(step, donate_argnums=0)``); with sharded inputs it runs SPMD.

    With ``distill`` (``cpmjax.train.distill.Distill``) the step is ``step(state, batch,
    teacher_state)`` and the loss adds λ · hidden-state MSE against the teacher (metrics add
    ``ce`` and ``hidden_mse``); the teacher's state is only read. A model with pruning masks
    (``cpmjax.compress.prune``) gets them re-applied after every update, so full fine-tuning
    never revives pruned weights (decided when tracing: no cost for a model without masks, or
    whose masked kernels are quantized and so frozen)."""

    def step(state, batch, teacher_state=None):
        model, optimizer = nnx.merge(graphdef, state)
        if distill is None:
            def objective(m):
                return loss_fn(m, batch, chunk, remat)
        else:
            teacher = nnx.merge(distill.graphdef, teacher_state)

            def objective(m):
                return distill_loss_fn(m, teacher, batch, distill, chunk, remat)
        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True)
        (loss, aux), grads = grad_fn(model)
        optimizer.update(model, grads)
        # re-zero pruned weights an update revived (apply_masks skips read-only quantized
        # kernels); decided at trace time, so an unpruned model pays nothing. A model carries
        # masks only if cpmjax.compress pruned it, so training never imports that package itself.
        compress = sys.modules.get("cpmjax.compress")
        if compress is not None and compress.masks(model):
            compress.apply_masks(model)
        param_norm = optax.tree.norm(nnx.state(model, wrt))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": param_norm,
                   **aux}
        return nnx.state((model, optimizer)), metrics

    return step


def make_eval_step(graphdef: Any, chunk: int = 128):
    def evaluate(state, batch):
        model, _ = nnx.merge(graphdef, state)
        loss, aux = loss_fn(model, batch, chunk)
        return loss, aux["tokens"]

    return evaluate


# ----------------------------------------------------------------------------------------------
# placement


def place_rows(x: np.ndarray, sharding: Any, global_rows: int | None = None) -> jax.Array:
    """``x`` (this process's rows of a global array of ``global_rows`` rows) as a global array
    placed with ``sharding``: ``jax.device_put`` on one process, and
    ``jax.make_array_from_process_local_data`` on several (each process passes only the rows
    its devices hold; ``global_rows`` defaults to ``x``'s own row count)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    rows = x.shape[0] if global_rows is None else int(global_rows)
    return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))


def to_device(batch: dict[str, np.ndarray], sharding: Any, global_rows: int | None = None
              ) -> dict[str, jax.Array]:
    """Every array of ``batch`` on the device(s): placed with ``sharding``, or on the default
    device when it is ``None``. With several processes ``batch`` holds this process's rows of
    a global batch of ``global_rows`` rows (see ``place_rows``)."""
    if sharding is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: place_rows(v, sharding, global_rows) for k, v in batch.items()}


def pin_to_mesh(state: Any, mesh: Any) -> tuple[Any, Any]:
    """``(state, shardings)``: leaves not yet on ``mesh`` (optimizer counters) replicated onto
    it. Jitting the step with ``out_shardings=shardings`` hands back the state exactly as it came
    in, so the second step hits the compilation cache instead of compiling again."""
    from jax.sharding import NamedSharding, PartitionSpec

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    state = jax.tree.map(place, state)
    return state, jax.tree.map(lambda x: x.sharding, state)


# ----------------------------------------------------------------------------------------------
# sequence parallelism


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Sequence parallelism of the train and eval steps on a mesh with a ``sequence`` axis.

    :meth:`shard_batch` puts every per-token array of a batch (``[batch, seq]``: input_ids,
    targets, positions, segment_ids, loss_mask) in layout order (``sharding.layout.to_layout``:
    with ``"zigzag"`` device ``r`` of the ``G`` sequence devices holds chunks ``r`` and
    ``2G - 1 - r`` of ``2G``, so causal work is balanced) and shards it batch over
    ``data``/``fsdp`` and sequence over ``sequence``. :meth:`wrap` runs a step function under
    the ``"burst"`` attention backend (``sharding.burst``: exact ring attention, ``impl`` one of
    ``auto|burst|ring|allgather``). Positions travel with their tokens (RoPE sees the true
    positions) and the ring masks by true token index, so every token's loss is the one of the
    natural order; the loss and accuracy are means over tokens, hence unchanged, and so are the
    gradients. The data iterator never sees the layout (its position and resume are as
    without it)."""

    mesh: Any  # jax.sharding.Mesh with a "sequence" axis
    impl: str = "auto"
    layout: str = "zigzag"

    @property
    def num_shards(self) -> int:
        return int(self.mesh.shape["sequence"])

    def shard_batch(self, batch: Mapping[str, Any], global_rows: int | None = None
                    ) -> dict[str, jax.Array]:
        """``{name: [batch, seq]}`` in natural order -> the same arrays in layout order, placed
        with ``batch_sharding(mesh, sequence=True)`` (several processes: ``batch`` holds this
        process's rows of ``global_rows``, see ``place_rows``)."""
        from sharding.layout import check_layout, to_layout
        from sharding.mesh import batch_sharding

        sharding = batch_sharding(self.mesh, sequence=True)
        out = {}
        for name, x in batch.items():
            if np.ndim(x) != 2:
                raise ShapeMismatchError(
                    f"batch[{name!r}] must be [batch, seq] for sequence parallelism, got shape "
                    f"{tuple(np.shape(x))}")
            check_layout(self.layout, x.shape[1], self.num_shards)
            out[name] = place_rows(to_layout(x, self.num_shards, self.layout), sharding,
                                   global_rows)
        return out

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` traced under ``ops.attention_backend("burst", mesh=, schedule=, layout=)``; jit
        the result (the backend is chosen when ``jit`` traces)."""

        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with ops.attention_backend("burst", mesh=self.mesh, schedule=self.impl,
                                       layout=self.layout):
                return fn(*args, **kwargs)

        return wrapped
