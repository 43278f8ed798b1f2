"""Hidden-state distillation (CPET knowledge recovery): the student's loss is its next-token
cross-entropy plus ``weight`` times the mean, over the chosen decoder layers, of the mean squared
difference between its layer outputs and those of a frozen teacher (the uncompressed model,
usually with the LoRA it was tuned with).

- ``layer_outputs(model, batch)``: the final hidden states the head reads (exactly what
  ``model(..., return_hidden=True)`` computes) and every decoder layer's output;
- ``Distill``: the teacher's graph and the loss settings, given to ``make_train_step``;
- ``build_teacher(config, model)`` / ``check_teacher(config, student, teacher)``: the teacher of
  a ``distill`` section, and the shape checks (``ConfigError`` before any compute).

The teacher's state is an input of the jitted step that nothing updates, and its outputs pass
through ``stop_gradient``: it stays bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cpmjax.errors import ConfigError
from cpmjax.models import CausalLM
from cpmjax.models.rope import rotary_tables
from cpmjax.train.config import TrainConfig
from cpmjax.train.loss import chunked_cross_entropy

SELF_UNCOMPRESSED = "self-uncompressed"


def layer_outputs(model: CausalLM, batch: dict[str, jax.Array]
                  ) -> tuple[jax.Array, list[jax.Array]]:
    """``(hidden, [layer outputs])`` of one packed batch: ``hidden`` is the normalised final
    state divided by the μP width (the head's input, as ``return_hidden=True`` gives it); the
    list holds each decoder layer's output ``[b, s, hidden_size]`` (before the final norm)."""
    positions, segment_ids = batch["positions"], batch["segment_ids"]
    x = model.embed(batch["input_ids"])
    cos, sin = rotary_tables(model.config, positions, x.dtype)
    outs = []
    for i, layer in enumerate(model.model.layers):
        x, _ = layer(x, cos, sin, positions=positions, segment_ids=segment_ids, layer=i)
        outs.append(x)
    hidden = model.model.norm(x)
    width = model.config.width_scale
    if width != 1.0:
        hidden = hidden / width
    return hidden, outs


@dataclasses.dataclass(frozen=True)
class Distill:
    """What the train step needs to distil: the teacher's graphdef (its state is passed to the
    step as a separate, never-updated argument), ``weight`` (λ) and the layer indices."""

    graphdef: Any
    weight: float
    layers: tuple[int, ...]


def distill_loss_fn(model: CausalLM, teacher: CausalLM, batch: dict[str, jax.Array],
                    spec: Distill, chunk: int, remat: bool = True
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy + λ · mean over ``spec.layers`` of the MSE of hidden states over every position;
    ``aux`` adds ``ce`` and ``hidden_mse``. With λ = 0 the loss is the plain cross-entropy."""
    hidden, outs = layer_outputs(model, batch)
    ce, aux = chunked_cross_entropy(hidden, model.head_weight(), batch["targets"],
                                    batch["loss_mask"], chunk_size=chunk, remat=remat)
    _, teacher_outs = layer_outputs(teacher, batch)
    # every position: the teacher reads the same packed tokens (segment id 0 is a real segment,
    # the continuation of a document that began in an earlier row, not padding)
    terms = []
    for i in spec.layers:
        t = jax.lax.stop_gradient(teacher_outs[i]).astype(jnp.float32)
        terms.append(jnp.mean(jnp.square(outs[i].astype(jnp.float32) - t)))
    mse = jnp.mean(jnp.stack(terms))
    loss = ce + spec.weight * mse if spec.weight else ce
    return loss, {**aux, "ce": ce, "hidden_mse": mse}


# ----------------------------------------------------------------------------------------------
# the teacher


def distill_layers(config: TrainConfig, student: CausalLM) -> tuple[int, ...]:
    layers = config.distill.layers
    n = student.config.num_hidden_layers
    return tuple(range(n)) if layers == "all" else tuple(int(i) for i in layers)


def check_teacher(config: TrainConfig, student: CausalLM, teacher: CausalLM) -> tuple[int, ...]:
    """The distilled layer indices; ``ConfigError`` naming both models' values when the teacher
    cannot teach the student (vocabulary, hidden size, a layer missing in either)."""
    d = config.distill
    s, t = student.config, teacher.config
    for field in ("vocab_size", "hidden_size"):
        a, b = getattr(s, field), getattr(t, field)
        if a != b:
            raise ConfigError(
                f"distill.teacher {d.teacher!r} has {field}={b} but the student has {field}={a}:"
                f" distillation needs the same {field}")
    if d.layers == "all" and s.num_hidden_layers != t.num_hidden_layers:
        raise ConfigError(
            f"distill.layers='all': the student has {s.num_hidden_layers} layers and "
            f"distill.teacher {d.teacher!r} has {t.num_hidden_layers}; list the layers to match")
    layers = distill_layers(config, student)
    limit = min(s.num_hidden_layers, t.num_hidden_layers)
    bad = [i for i in layers if i >= limit]
    if bad:
        raise ConfigError(
            f"distill.layers {bad} out of range: the student has {s.num_hidden_layers} layers, "
            f"distill.teacher {d.teacher!r} has {t.num_hidden_layers}")
    return layers


def build_teacher(config: TrainConfig, model: CausalLM) -> CausalLM | None:
    """The frozen teacher of ``config.distill`` (None without one): a copy of ``model`` as it is
    now (call before compressing it) for ``"self-uncompressed"``, else the HF checkpoint at
    ``distill.teacher``; ``distill.teacher_delta`` is loaded onto it (``cpmjax.delta.load``)."""
    d = config.distill
    if d.teacher is None:
        return None
    if d.teacher == SELF_UNCOMPRESSED:
        teacher = nnx.clone(model)
        # its own buffers: the train step donates the student's, which the clone would share
        nnx.update(teacher, jax.tree.map(lambda x: jnp.array(x, copy=True),
                                         nnx.state(teacher)))
    else:
        from cpmjax.hf import from_pretrained

        teacher = from_pretrained(d.teacher, dtype=config.model.dtype)
    if d.teacher_delta:
        import cpmjax.delta as delta_lib

        delta_lib.load(teacher, d.teacher_delta)
    return teacher
