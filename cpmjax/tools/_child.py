"""The sandbox's child process (run as a script by ``cpmjax.tools.sandbox``, standard library
only, in an isolated interpreter: ``python -I -S _child.py JOB.json``).

Order matters: read the job (then delete it), set the resource limits, leave the network
(a new, empty network namespace), drop root to ``nobody``, install the audit hook, and only
then run the untrusted code. Each step that the OS refuses is reported, not fatal. Status goes
to the parent as JSON lines on the inherited status descriptor: ``{"setup": ...}`` before the
code runs and ``{"error": ..., ...}`` after it."""

import json
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
RESERVE = bytearray(1 << 20)  # freed on MemoryError so that the status can still be written
STATE = {"forbidden": None}


class SandboxForbidden(PermissionError):
    """Raised by the audit hook for an action the sandbox does not allow."""


def _write(fd, record):
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _limit(name, value, notes):
    which = getattr(resource, name, None)
    if which is None:
        notes.append(f"{name}: not available on this OS")
        return
    try:
        resource.setrlimit(which, (value, value))
    except (OSError, ValueError) as exc:
        notes.append(f"{name}: {exc}")


def _unshare(flags):
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _leave_network(notes):
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    try:
        _unshare(flags)
    except (OSError, AttributeError) as exc:
        notes.append(f"network namespace: {exc}")


def _keep_imports_working():
    """Replace each directory of ``sys.path`` (and the paths of packages already imported) by
    a descriptor opened now, as ``/proc/self/fd/N``: once root is dropped, the standard library
    may sit below a directory the sandbox user cannot enter (``/root/...``), but a descriptor
    opened before still works."""
    moved = {}
    for entry in sys.path:
        try:
            moved[entry] = f"/proc/self/fd/{os.open(entry, os.O_RDONLY | os.O_DIRECTORY)}"
        except OSError:
            continue

    def remap(path):
        for old, new in moved.items():
            if path == old or path.startswith(old.rstrip("/") + "/"):
                return new + path[len(old.rstrip("/")):]
        return path

    sys.path[:] = [remap(p) for p in sys.path]
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            paths[:] = [remap(p) for p in paths]
    sys.path_importer_cache.clear()


def _drop_root(notes):
    if os.geteuid() != 0:
        return
    _keep_imports_working()
    try:
        import pwd

        try:
            entry = pwd.getpwnam("nobody")
            uid, gid = entry.pw_uid, entry.pw_gid
        except KeyError:
            uid = gid = 65534
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        notes.append(f"dropping root: {exc}")


def _install_hook(allow_subprocess):
    blocked = ("socket.", "ctypes.")
    if not allow_subprocess:
        blocked += ("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                    "os.system", "os.kill", "os.killpg", "subprocess.", "pty.spawn")

    def hook(event, args):
        if event.startswith(blocked):
            if STATE["forbidden"] is None:
                STATE["forbidden"] = event
            raise SandboxForbidden(f"the sandbox does not allow {event}")

    sys.addaudithook(hook)


def _run(job):
    if job["mode"] == "python":
        code = compile(job["code"], "<sandbox>", "exec")
        exec(code, {"__name__": "__main__"})  # noqa: S102 - in the sandboxed child only
        return None
    namespace = {"__name__": "__sandbox__"}
    exec(compile(job["source"], "<tool>", "exec"), namespace)  # noqa: S102 - child only
    value = namespace[job["function"]](**job["arguments"])
    json.dumps(value)  # the result must travel back as JSON
    return value


def main():
    global RESERVE
    with open(sys.argv[1], encoding="utf-8") as f:
        job = json.load(f)
    os.unlink(sys.argv[1])
    status_fd = job["status_fd"]
    notes = []
    _limit("RLIMIT_CPU", job["cpu_seconds"], notes)
    _limit("RLIMIT_AS", job["memory_bytes"], notes)
    _limit("RLIMIT_FSIZE", job["max_file_bytes"], notes)
    _limit("RLIMIT_NPROC", job["max_processes"], notes)
    _limit("RLIMIT_NOFILE", job["max_open_files"], notes)
    _limit("RLIMIT_CORE", 0, notes)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big file: an OSError, not a kill
    _leave_network(notes)
    _drop_root(notes)
    if job["audit_hook"]:
        _install_hook(job["allow_subprocess"])
    else:
        notes.append("audit hook: turned off")
    _write(status_fd, {"setup": {"not_enforced": notes, "uid": os.getuid()}})
    status = {"error": None, "exception": None, "value": None, "exit_code": 0}
    try:
        status["value"] = _run(job)
    except MemoryError:
        RESERVE = None
        status["error"] = "memory"
        status["exception"] = "MemoryError"
    except SystemExit as exc:
        code = exc.code
        status["exit_code"] = code if isinstance(code, int) else (0 if code is None else 1)
        if status["exit_code"]:
            status["error"] = "exit"
    except BaseException as exc:  # noqa: BLE001 - everything the code raises is reported
        RESERVE = None
        status["error"] = "exception"
        status["exception"] = f"{type(exc).__name__}: {exc}"[:2000]
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # show the user's frames only
        try:
            traceback.print_exception(type(exc), exc, tb)
        except Exception:  # noqa: BLE001
            pass
    status["forbidden"] = STATE["forbidden"]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a full or closed pipe
            pass
    try:
        _write(status_fd, status)
    except (TypeError, ValueError):
        status["value"] = None
        _write(status_fd, status)
    os._exit(0)


if __name__ == "__main__":
    main()
