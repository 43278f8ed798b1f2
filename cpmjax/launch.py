"""``cpmjax launch``: run one program as N cooperating JAX processes on this machine.

    cpmjax launch --num-processes N [--devices-per-process K] [--port P] -- train --config x.yaml
    cpmjax launch -n 2 -k 4 -- python my_script.py ARGS
    cpmjax launch -n 4 -g 2 -- train --config x.yaml      (8 GPUs: 2 per process)

A command whose first word is a ``cpmjax`` subcommand runs as ``python -m cpmjax.cli ...``
(``train``, ``generate``, ..., and any word that is neither a path nor a program on ``PATH``,
so subcommands added later work too); anything else runs as given (a ``*.py`` file with this
interpreter). Every process gets ``CPMJAX_COORDINATOR`` (127.0.0.1 and a free port),
``CPMJAX_NUM_PROCESSES`` and ``CPMJAX_PROCESS_ID`` (``cpmjax.distributed.initialize`` reads
them) and, with ``--devices-per-process K``, ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=
--xla_force_host_platform_device_count=K`` (K simulated CPU devices). Each line a process
prints comes out prefixed ``[i] ``. When a process fails (non-zero exit, a signal), or the
launcher itself gets SIGTERM or Ctrl-C, the (other) processes are terminated (SIGTERM, then SIGKILL after a grace period) and the launcher exits with
the failed process's code (128 + signal for a signal), so a run never hangs in a collective
waiting for a dead peer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from cpmjax.errors import ConfigError

# first words that name a cpmjax subcommand (run through ``python -m cpmjax.cli``)
CPMJAX_COMMANDS = ("train", "generate", "info")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_command(command: Sequence[str]) -> list[str]:
    """The argv a process runs for ``command`` (see the module docstring)."""
    command = list(command)
    if not command:
        raise ConfigError("cpmjax launch needs a command after '--' (e.g. -- train --config "
                          "x.yaml)")
    first = command[0]
    if first.endswith(".py"):
        return [sys.executable, *command]
    if first in CPMJAX_COMMANDS or (os.sep not in first and shutil.which(first) is None):
        return [sys.executable, "-m", "cpmjax.cli", *command]
    return command


def child_env(process_id: int, num_processes: int, coordinator: str,
              devices_per_process: int | None, base: dict[str, str] | None = None,
              gpus_per_process: int | None = None) -> dict[str, str]:
    """The environment of process ``process_id``: the ``CPMJAX_*`` settings, K simulated CPU
    devices with ``devices_per_process``, its own GPUs with ``gpus_per_process`` (process ``i``
    sees GPUs ``i*G .. i*G+G-1`` through ``CUDA_VISIBLE_DEVICES``)."""
    env = dict(os.environ if base is None else base)
    env.update({"CPMJAX_COORDINATOR": coordinator, "CPMJAX_NUM_PROCESSES": str(num_processes),
                "CPMJAX_PROCESS_ID": str(process_id), "PYTHONUNBUFFERED": "1"})
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
    if gpus_per_process is not None:
        first = process_id * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(g) for g in range(first, first + gpus_per_process))
    return env


def _pump(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(command: Sequence[str], num_processes: int, devices_per_process: int | None = None,
           *, gpus_per_process: int | None = None, port: int | None = None,
           grace_seconds: float = 5.0, out: IO[str] | None = None,
           env: dict[str, str] | None = None) -> int:
    """Run ``command`` as ``num_processes`` processes; returns 0 when all exit 0, else the
    exit code of the first that failed (the rest are terminated within ``grace_seconds``
    plus a moment). Output lines are written to ``out`` (default stdout) prefixed ``[i] ``."""
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ConfigError(f"--devices-per-process must be >= 1, got {devices_per_process}")
    if gpus_per_process is not None:
        if gpus_per_process < 1:
            raise ConfigError(f"--gpus-per-process must be >= 1, got {gpus_per_process}")
        if devices_per_process is not None:
            raise ConfigError("--devices-per-process (simulated CPU devices) and "
                              "--gpus-per-process exclude each other")
    out = sys.stdout if out is None else out
    argv = child_command(command)
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    try:
        for i in range(num_processes):
            p = subprocess.Popen(
                argv, env=child_env(i, num_processes, coordinator, devices_per_process, env,
                                    gpus_per_process),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, errors="replace", start_new_session=True,
            )
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", out, lock),
                                 daemon=True)
            t.start()
            pumps.append(t)
    except OSError as exc:
        _stop(procs, grace_seconds)
        raise ConfigError(f"cannot start {argv[0]!r}: {exc}") from exc
    failed: tuple[int, int] | None = None
    # a launcher stopped by SIGTERM (a scheduler, a timeout) takes its processes with it
    stop_signal: list[int] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.append(signum))
    try:
        while True:
            if stop_signal:
                failed = (-1, -stop_signal[0])
                break
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        failed = (-1, -int(signal.SIGINT))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failed is not None:
        _stop(procs, grace_seconds)
    for t in pumps:
        t.join(timeout=2.0)
    if failed is None:
        return 0
    index, code = failed
    who = (f"launcher got {_describe(code)}" if index < 0
           else f"process {index} exited with {_describe(code)}")
    with lock:
        out.write(f"[launch] {who}; stopped the other processes\n")
        out.flush()
    return _exit_code(code) or 1


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the process and whatever it started
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM every live process, SIGKILL those still alive after ``grace_seconds``."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.time() + grace_seconds
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def register(subparsers: Any) -> None:
    """Add the ``launch`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser("launch", help="run a command as N JAX processes on this machine",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, required=True)
    p.add_argument("-k", "--devices-per-process", type=int, default=None,
                   help="simulated CPU devices per process (sets JAX_PLATFORMS=cpu)")
    p.add_argument("-g", "--gpus-per-process", type=int, default=None,
                   help="GPUs per process: process i sees GPUs i*G..i*G+G-1 "
                        "(CUDA_VISIBLE_DEVICES)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    p.add_argument("--grace-seconds", type=float, default=5.0,
                   help="after a failure, how long the others get to exit before SIGKILL")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after '--': a cpmjax subcommand (train ...) or a program")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``cpmjax launch``."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return launch(command, args.num_processes, args.devices_per_process,
                  gpus_per_process=args.gpus_per_process, port=args.port,
                  grace_seconds=args.grace_seconds)
