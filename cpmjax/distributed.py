"""Start-up of a multi-process JAX program: ``initialize()`` joins the processes of one run
through ``jax.distributed.initialize`` before any other JAX computation.

Where the settings come from, first match wins:

1. explicit arguments (``cpmjax train --coordinator HOST:PORT --num-processes N
   --process-id I``);
2. the environment ``cpmjax launch`` sets: ``CPMJAX_COORDINATOR``, ``CPMJAX_NUM_PROCESSES``,
   ``CPMJAX_PROCESS_ID``;
3. ``CPMJAX_DISTRIBUTED=auto`` (or ``--coordinator auto``): JAX's own detection on TPU pod
   slices, SLURM and other clusters it knows (``jax.distributed.initialize()`` with no
   arguments). Never tried on its own: on a single machine it would wait for peers.

Nothing set means one process, the default: ``initialize()`` does nothing. With several
processes on CPU the cross-process collectives go through gloo.

A process that dies is noticed by JAX's coordination service after ``heartbeat_seconds``
(``CPMJAX_HEARTBEAT_SECONDS``, JAX's default 100 s): the survivors then abort with an error
naming the dead task instead of waiting in a collective forever. ``cpmjax launch`` stops them
sooner (as soon as it sees a process exit).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from cpmjax.errors import ConfigError

ENV_COORDINATOR = "CPMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "CPMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CPMJAX_PROCESS_ID"
ENV_AUTO = "CPMJAX_DISTRIBUTED"
ENV_HEARTBEAT = "CPMJAX_HEARTBEAT_SECONDS"

_state: dict[str, DistributedSettings | None] = {"initialized": None}


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins a run: ``coordinator`` ``"HOST:PORT"`` (``None`` with ``auto``),
    ``num_processes`` and ``process_id`` (``None`` with ``auto``: JAX finds them)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    auto: bool = False


def _int(value: str | int | None, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={value!r} is not an integer") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: dict[str, str] | None = None
            ) -> DistributedSettings | None:
    """The settings of this process (``None``: a single-process run), from the arguments or,
    when none is given, the environment. Raises ``ConfigError`` naming the flag or variable
    when they are incomplete or inconsistent."""
    env = os.environ if environ is None else environ
    explicit = any(x is not None for x in (coordinator, num_processes, process_id))
    if explicit:
        source = ("--coordinator", "--num-processes", "--process-id")
    else:
        source = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
        coordinator = env.get(ENV_COORDINATOR) or None
        num_processes = _int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
        process_id = _int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
    if coordinator == "auto" or (not explicit and coordinator is None and num_processes is None
                                 and process_id is None
                                 and env.get(ENV_AUTO, "").lower() == "auto"):
        if num_processes is not None or process_id is not None:
            raise ConfigError(f"{source[0]} auto lets JAX detect the processes; do not also "
                              f"give {source[1]} / {source[2]}")
        return DistributedSettings(None, None, None, auto=True)
    if coordinator is None and num_processes is None and process_id is None:
        return None
    if num_processes is None:
        raise ConfigError(f"{source[1]} is required with {source[0]} / {source[2]}")
    if num_processes < 1:
        raise ConfigError(f"{source[1]} must be >= 1, got {num_processes}")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ConfigError(f"{source[2]}={process_id} but {source[1]}=1 (only process 0)")
        return None
    if process_id is None:
        raise ConfigError(f"{source[2]} is required with {source[1]}={num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(
            f"{source[2]}={process_id} is outside [0, {num_processes}) ({source[1]})")
    if coordinator is None:
        raise ConfigError(f"{source[0]} HOST:PORT is required with {source[1]}={num_processes}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{source[0]}={coordinator!r} is not HOST:PORT")
    return DistributedSettings(coordinator, num_processes, process_id)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_seconds: int | None = None
               ) -> DistributedSettings | None:
    """Join the run's processes (``jax.distributed.initialize``) when this is one of several;
    do nothing for a single process. Call it before any other JAX computation. Calling it
    again with the same settings is a no-op; returns the settings used (``None``: one
    process). ``heartbeat_seconds`` (default ``$CPMJAX_HEARTBEAT_SECONDS`` or JAX's): how
    long a silent peer may take before the others abort."""
    settings = resolve(coordinator, num_processes, process_id)
    if heartbeat_seconds is None:
        heartbeat_seconds = _int(os.environ.get(ENV_HEARTBEAT), ENV_HEARTBEAT)
    if heartbeat_seconds is not None and heartbeat_seconds < 1:
        raise ConfigError(f"heartbeat_seconds must be >= 1, got {heartbeat_seconds}")
    if settings is None:
        return None
    done = _state["initialized"]
    if done is not None:
        if done != settings:
            raise ConfigError(f"jax.distributed is already initialized with {done}, not "
                              f"{settings}")
        return done
    import jax

    # CPU collectives across processes need an implementation; gloo ships with jaxlib (the
    # setting only concerns the CPU client, so it is harmless on GPU / TPU)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    extra = {} if heartbeat_seconds is None else {"heartbeat_timeout_seconds": heartbeat_seconds}
    if settings.auto:
        jax.distributed.initialize(**extra)
    else:
        jax.distributed.initialize(coordinator_address=settings.coordinator,
                                   num_processes=settings.num_processes,
                                   process_id=settings.process_id, **extra)
    _state["initialized"] = settings
    return settings


def process_index() -> int:
    """This process's index (0 on a single-process run)."""
    import jax

    return int(jax.process_index())


def process_count() -> int:
    """The number of processes of the run (1 on a single-process run)."""
    import jax

    return int(jax.process_count())


def is_primary() -> bool:
    """Whether this process writes what a run writes once (logs, metrics, exports)."""
    return process_index() == 0


def sync(name: str) -> None:
    """A barrier across the run's processes (nothing on a single process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def add_process_flags(parser: Any) -> None:
    """The multi-process flags of a ``cpmjax`` subcommand (``--coordinator``,
    ``--num-processes``, ``--process-id``), in their own argument group."""
    group = parser.add_argument_group(
        "multi-process (one process per host; see docs/multihost.md)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's address, or 'auto' (JAX detects TPU pods / SLURM); "
                            "default: $CPMJAX_COORDINATOR (set by cpmjax launch) or one process")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def initialize_from_args(args: Any) -> None:
    """:func:`initialize` from the flags :func:`add_process_flags` added (absent flags: the
    environment, else one process)."""
    initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None))

