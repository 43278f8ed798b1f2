"""``Sandbox``: run Python code, or a registered tool's function, in a separate, limited
process. What it guarantees and what it does not is listed in docs/tools.md.

The parent (this module) never evaluates the code: it writes a job file into a fresh temporary
directory, starts ``python -I -S _child.py`` there with an empty environment in a new session
(its own process group), reads stdout / stderr / the status descriptor with a cap and a
wall-clock deadline, and kills the whole process group when it finishes, overflows or times
out. The limits themselves are set inside the child (``_child.py``), before the code runs."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

from cpmjax.errors import ConfigError, ToolDefinitionError

__all__ = ["ERRORS", "Sandbox", "SandboxResult"]

ERRORS = ("timeout", "memory", "crash", "output_limit", "forbidden")
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")
_STATUS_SLACK = 1 << 20  # bytes the status channel may carry beyond max_output_bytes
_NOBODY = 65534


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did. ``error``: None, or one of ``ERRORS``; ``value``: the return
    value of a ``Sandbox.call``; ``exception``: ``"Type: message"`` of an uncaught exception;
    ``not_enforced``: the isolation steps the OS refused this time (empty when all held)."""

    ok: bool
    stdout: str
    stderr: str
    error: str | None
    exit_code: int | None
    seconds: float
    value: Any = None
    exception: str | None = None
    not_enforced: tuple[str, ...] = ()


def _nobody_ids() -> tuple[int, int]:
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return _NOBODY, _NOBODY


def _function_source(fn: Callable[..., Any]) -> tuple[str, str]:
    """``(source, name)`` of a module-level or nested function, decorators removed."""
    name = getattr(fn, "__name__", "")
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as exc:
        raise ToolDefinitionError(
            f"cannot read the source of tool {name or fn!r} to run it in the sandbox: "
            f"{exc}") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            node.decorator_list = []
            return ast.unparse(node), name
    raise ToolDefinitionError(
        f"tool {name or fn!r} is not a plain 'def' function; a sandboxed tool must be one")


class Sandbox:
    """Limits for out-of-process runs.

    ``timeout_s``: wall clock (CPU time is capped at the next whole second above it);
    ``memory_mb``: address space; ``max_output_bytes``: stdout + stderr together;
    ``max_file_bytes``: any one file written; ``max_processes``: processes and threads of the
    sandbox user; ``allow_subprocess``: let the code start processes (the process limit still
    holds); ``audit_hook``: the in-child hook that refuses sockets, ctypes and (unless
    allowed) process creation as ``"forbidden"`` (turn off only to test the OS-level layers);
    ``site_packages``: let the code import installed packages (default: standard library)."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256,
                 max_output_bytes: int = 64 * 1024, *, max_file_bytes: int = 16 << 20,
                 max_processes: int = 8, max_open_files: int = 64,
                 allow_subprocess: bool = False, audit_hook: bool = True,
                 site_packages: bool = False, python: str | None = None) -> None:
        checks = {"timeout_s": timeout_s, "memory_mb": memory_mb,
                  "max_output_bytes": max_output_bytes, "max_file_bytes": max_file_bytes,
                  "max_processes": max_processes, "max_open_files": max_open_files}
        for key, value in checks.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"Sandbox {key} must be a positive number, got {value!r}")
        if memory_mb < 32:
            raise ConfigError(f"Sandbox memory_mb={memory_mb} is too small for Python (>= 32)")
        if max_open_files < 16:
            raise ConfigError(f"Sandbox max_open_files={max_open_files} is below 16")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.max_output_bytes = int(max_output_bytes)
        self.max_file_bytes = int(max_file_bytes)
        self.max_processes = int(max_processes)
        self.max_open_files = int(max_open_files)
        self.allow_subprocess = bool(allow_subprocess)
        self.audit_hook = bool(audit_hook)
        self.site_packages = bool(site_packages)
        self.python = python or sys.executable

    def run_python(self, code: str) -> SandboxResult:
        """Run ``code`` as a script in the child; its stdout / stderr come back (capped)."""
        if not isinstance(code, str):
            raise ConfigError(f"run_python needs a str of code, got {type(code).__name__}")
        return self._run({"mode": "python", "code": code})

    def call(self, tool: Any, arguments: dict[str, Any]) -> SandboxResult:
        """Run a tool's function (a ``Tool`` or a plain function) on ``arguments`` in the child;
        ``.value`` is its JSON return value. The function is sent as its source: it must be
        self-contained (imports inside its body)."""
        fn = getattr(tool, "fn", tool)
        source, name = _function_source(fn)
        try:
            json.dumps(arguments)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"arguments of {name} are not JSON: {exc}") from None
        return self._run({"mode": "call", "source": source, "function": name,
                          "arguments": arguments})

    # -- the parent's side of one run -------------------------------------------------------

    def _run(self, job: dict[str, Any]) -> SandboxResult:
        workdir = tempfile.mkdtemp(prefix="cpmjax-sandbox-")
        read_fd, write_fd = os.pipe()
        proc = None
        start = time.perf_counter()
        try:
            job.update(status_fd=write_fd, cpu_seconds=math.ceil(self.timeout_s) + 1,
                       memory_bytes=self.memory_mb << 20, max_file_bytes=self.max_file_bytes,
                       max_processes=self.max_processes, max_open_files=self.max_open_files,
                       allow_subprocess=self.allow_subprocess, audit_hook=self.audit_hook)
            job_path = os.path.join(workdir, ".job.json")
            with open(job_path, "w", encoding="utf-8") as f:
                json.dump(job, f)
            if os.geteuid() == 0:  # the child drops to nobody: let it use its directory
                os.chown(workdir, *_nobody_ids())
            argv = [self.python, "-I", *([] if self.site_packages else ["-S"]), _CHILD,
                    job_path]
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, cwd=workdir, env={}, start_new_session=True,
                    pass_fds=(write_fd,), close_fds=True)
            except OSError as exc:
                raise ConfigError(
                    f"cannot start the sandbox's interpreter {self.python!r}: {exc}") from None
            os.close(write_fd)
            write_fd = -1
            outcome = self._collect(proc, read_fd, start)
        finally:
            if proc is not None:
                _kill_group(proc)
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)
        return self._result(proc, outcome, time.perf_counter() - start)

    def _collect(self, proc: subprocess.Popen, status_fd: int, start: float) -> dict[str, Any]:
        """Read the three channels until they close, the deadline passes or output overflows.
        When the child itself exits, its process group is killed so that nothing it left
        behind keeps the pipes open."""
        streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
                   status_fd: bytearray()}
        caps = {status_fd: self.max_output_bytes + _STATUS_SLACK}
        selector = selectors.DefaultSelector()
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        deadline = start + self.timeout_s
        timed_out = overflow = exited = False
        try:
            while selector.get_map():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(timeout=min(remaining, 0.05)):
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fd)
                        continue
                    streams[key.fd] += data
                if (len(streams[proc.stdout.fileno()]) + len(streams[proc.stderr.fileno()])
                        > self.max_output_bytes or len(streams[status_fd]) > caps[status_fd]):
                    overflow = True
                    break
                if not exited and _has_exited(proc):
                    exited = True
                    _kill_group(proc, reap=False)
        finally:
            selector.close()
        return {"stdout": bytes(streams[proc.stdout.fileno()]),
                "stderr": bytes(streams[proc.stderr.fileno()]),
                "status": bytes(streams[status_fd]), "timed_out": timed_out,
                "overflow": overflow}

    def _result(self, proc: subprocess.Popen, outcome: dict[str, Any],
                seconds: float) -> SandboxResult:
        records = []
        for line in outcome["status"].decode("utf-8", "replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        setup = next((r["setup"] for r in records if isinstance(r, dict) and "setup" in r), {})
        final = next((r for r in records if isinstance(r, dict) and "error" in r), None)
        code = proc.returncode
        stdout, stderr = outcome["stdout"], outcome["stderr"]
        if outcome["overflow"]:
            stdout = stdout[: self.max_output_bytes]
            stderr = stderr[: max(0, self.max_output_bytes - len(stdout))]
        if outcome["timed_out"] or code == -signal.SIGXCPU:
            error = "timeout"
        elif outcome["overflow"]:
            error = "output_limit"
        elif final is None:
            error = "crash"  # killed by a signal or died before reporting
        elif final.get("forbidden"):
            error = "forbidden"
        elif final["error"] == "memory":
            error = "memory"
        elif final["error"]:
            error = "crash"
        else:
            error = None
        exit_code = final.get("exit_code") if final is not None and code == 0 else code
        return SandboxResult(
            ok=error is None, stdout=stdout.decode("utf-8", "replace"),
            stderr=stderr.decode("utf-8", "replace"), error=error, exit_code=exit_code,
            seconds=seconds, value=final.get("value") if final and error is None else None,
            exception=(final or {}).get("exception") or (
                f"forbidden: {final['forbidden']}" if final and final.get("forbidden")
                else None),
            not_enforced=tuple(setup.get("not_enforced", ())))


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (its pid, the process group id,
    stays reserved until we wait, so a later ``killpg`` cannot hit a reused id)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen, reap: bool = True) -> None:
    """SIGKILL every process of the child's group (it leads its own session), then reap it."""
    if proc.returncode is None:
        for _ in range(2):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                break
    if reap:
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
