"""Run untrusted Python (model-written code) in a confined child process.

Each run gets:
- its own session and process group, killed as a whole on timeout and after exit;
- a fresh empty working directory, removed afterwards, and an environment holding only
  PATH, HOME and LANG (nothing from the parent's);
- resource limits set in the child: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (files and
  the captured output), RLIMIT_NPROC, RLIMIT_NOFILE, no core dumps;
- when the parent is root: a dedicated unprivileged uid/gid per run (no supplementary
  groups), so RLIMIT_NPROC binds (it does not bind root), the child cannot read the parent's
  /proc/<pid>/environ, and after the run every process of that uid is killed, including
  any that left the process group with setsid();
- where the kernel has Landlock (Linux ≥ 5.13): writes confined to the working directory
  (plus /dev/null), TCP bind/connect denied (ABI ≥ 4) and signals to processes outside the
  sandbox blocked (ABI ≥ 6).

A run passes only if the program exits with status 0 *and* a completion marker, printed by
code appended after the program, appears on stdout: `os._exit(0)` or `sys.exit(0)` before
the checks is a failure. The marker is random per run and the program reaches the
interpreter through a pipe, so it cannot read it from a file.

Threat model: accidental or crude misbehaviour of generated code (hangs, fork bombs,
memory/output floods, early exits, stray writes, environment snooping). It is not a boundary
against deliberate exploits: a program that inspects its own interpreter's memory can forge
the marker; use a container or VM for adversarial code. Without root the uid isolation
(and with it the NPROC isolation from the user's other processes, the /proc environment
protection and the after-run sweep of setsid() escapees) is unavailable.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from jaxsample.errors import ArgumentError

_SETUP_ERROR = "jaxsample-sandbox-setup-error:"
# Per-run uids come from a range no distribution assigns to accounts.
_UID_BASE = 2_100_000_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run.

    Attributes:
      timeout_s: wall-clock limit; the whole process group is killed when it expires.
      cpu_s: CPU seconds per process (RLIMIT_CPU); None = ceil(timeout_s) + 1.
      memory_bytes: address-space limit per process (RLIMIT_AS).
      file_size_bytes: largest file a process may write (RLIMIT_FSIZE); also caps the
        captured stdout and stderr.
      max_processes: processes (threads included) the sandbox may run (RLIMIT_NPROC).
      max_open_files: RLIMIT_NOFILE.
      tail_bytes: how much of the end of stdout/stderr the result keeps.
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 8 << 20
    max_processes: int = 32
    max_open_files: int = 64
    tail_bytes: int = 4096

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ArgumentError(f"SandboxLimits.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_bytes", "file_size_bytes", "max_processes", "max_open_files",
                     "tail_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ArgumentError(f"SandboxLimits.{name} must be a positive int, got {value!r}")
        if self.cpu_s is not None and (not isinstance(self.cpu_s, int) or self.cpu_s < 1):
            raise ArgumentError(
                f"SandboxLimits.cpu_s must be a positive int or None, got {self.cpu_s!r}")

    @property
    def cpu_seconds(self) -> int:
        return math.ceil(self.timeout_s) + 1 if self.cpu_s is None else self.cpu_s


class ExecutionResult(NamedTuple):
    """Outcome of one sandboxed run.

    Attributes:
      passed: exited with status 0 after printing the completion marker.
      reason: "passed", or why not (timeout, CPU/memory/output limit, signal, exception
        line, early exit, sandbox setup failure).
      returncode: the exit status (negative: killed by that signal); None if timed out.
      stdout_tail: the end of stdout (the completion marker removed).
      stderr_tail: the end of stderr.
      duration_s: wall-clock seconds.
    """

    passed: bool
    reason: str
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float


# Runs as the sandbox user before the program: limits, Landlock, then exec of a clean
# interpreter that reads the program from stdin. Kept to the standard library.
_LAUNCHER = r"""
import ctypes, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1])
try:
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["landlock_abi"]:
        abi = cfg["landlock_abi"]
        libc = ctypes.CDLL(None, use_errno=True)
        def call(nr, *args):
            result = libc.syscall(ctypes.c_long(nr), *args)
            if result < 0:
                raise OSError(ctypes.get_errno(), "landlock syscall %d failed" % nr)
            return result
        write_file, truncate, ioctl_dev = 1 << 1, 1 << 14, 1 << 15
        # Every write-like right: write, remove, make-*, and per ABI refer/truncate/ioctl.
        fs = write_file | sum(1 << b for b in range(4, 13))
        fs |= 1 << 13 if abi >= 2 else 0
        fs |= (truncate if abi >= 3 else 0) | (ioctl_dev if abi >= 5 else 0)
        net = 0b11 if abi >= 4 else 0
        scoped = 0b11 if abi >= 6 else 0
        attr = struct.pack("QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
        ruleset = call(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
        file_rights = write_file | (truncate if abi >= 3 else 0) | (ioctl_dev if abi >= 5 else 0)
        for path, rights in ((os.getcwd(), fs), ("/dev/null", file_rights)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = struct.pack("=Qi", rights, fd)
            call(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.c_char_p(rule),
                 ctypes.c_uint32(0))
            os.close(fd)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        call(446, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        os.close(ruleset)
except Exception as e:
    sys.stderr.write("%s %r\n" % (cfg["error_tag"], e))
    sys.exit(121)
os.execv(sys.executable, [sys.executable, "-I", "-B", "-"])
"""


def run_python(
    program: str, limits: SandboxLimits = SandboxLimits(), python: str | None = None
) -> ExecutionResult:
    """Runs `program` (Python source) in the sandbox and reports whether it ran to the end.

    Args:
      program: source text; a completion-marker print is appended after it.
      limits: resource limits.
      python: interpreter for the child; default: this one if the sandbox user can run it,
        else a system python3 it can.

    Returns:
      `ExecutionResult`. Failures of the program never raise.
    """
    sandbox_user = _sandbox_user()
    interpreter = python or _default_interpreter(sandbox_user is not None)
    marker = f"__jaxsample_sandbox_done_{secrets.token_hex(16)}__"
    source = f"{program}\n\nprint({marker!r}, flush=True)\n".encode()
    config = {
        "rlimits": [
            ("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1),
            ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
            ("RLIMIT_FSIZE", limits.file_size_bytes, limits.file_size_bytes),
            ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NPROC", *(2 * [_process_limit(sandbox_user, limits.max_processes)])),
        ],
        "landlock_abi": _landlock_abi(),
        "error_tag": _SETUP_ERROR,
    }
    with tempfile.TemporaryDirectory(prefix="jaxsample-sandbox-out-") as private:
        workdir = tempfile.mkdtemp(prefix="jaxsample-sandbox-")
        try:
            identity = {}
            if sandbox_user is not None:
                uid, gid = sandbox_user
                os.chown(workdir, uid, gid)
                identity = {"user": uid, "group": gid, "extra_groups": []}
            private = Path(private)
            with open(private / "stdout", "w+b") as out, open(private / "stderr", "w+b") as err:
                start = time.monotonic()
                timed_out, returncode = _execute(
                    [interpreter, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)],
                    source, workdir, out, err, identity, limits.timeout_s)
                duration = time.monotonic() - start
                if sandbox_user is not None:
                    _kill_user_processes(interpreter, *sandbox_user)
                stdout = _read_all(out)
                stderr_tail = _tail(err, limits.tail_bytes)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    completed = marker.encode() in stdout
    stdout_tail = stdout.replace(marker.encode() + b"\n", b"")[-limits.tail_bytes :]
    reason = _reason(timed_out, returncode, completed, stderr_tail, limits)
    return ExecutionResult(reason == "passed", reason, returncode,
                           stdout_tail.decode(errors="replace"), stderr_tail, duration)


def _execute(command, source, workdir, out, err, identity, timeout_s):
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"},
            start_new_session=True, close_fds=True, **identity)
    except OSError as e:
        raise ArgumentError(f"cannot start the sandbox interpreter {command[0]} ({e})") from None
    timed_out = False
    try:
        process.communicate(source, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(process.pid)  # after a normal exit too: children it left behind
    process.communicate()
    return timed_out, (None if timed_out else process.returncode)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_user_processes(interpreter: str, uid: int, gid: int) -> None:
    """Kills every process of the per-run uid: kill(-1) as that uid reaches exactly those."""
    sweep = "import os\ntry:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n"
    for _ in range(2):
        subprocess.run([interpreter, "-I", "-S", "-c", sweep], user=uid, group=gid, extra_groups=[],
                       env={}, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)


def _read_all(file) -> bytes:
    file.seek(0)
    return file.read()


def _tail(file, size: int) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - size))
    return file.read().decode(errors="replace")


def _reason(timed_out, returncode, completed, stderr_tail, limits) -> str:
    if _SETUP_ERROR in stderr_tail:
        return "sandbox setup failed: " + stderr_tail.split(_SETUP_ERROR, 1)[1].strip()
    if timed_out:
        return f"timed out after {limits.timeout_s:g} s (wall clock)"
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return f"CPU time limit exceeded ({limits.cpu_seconds} s)"
        if sig == signal.SIGKILL:
            return "killed by SIGKILL (CPU hard limit, or out of memory)"
        return f"killed by {sig.name}"
    if "MemoryError" in stderr_tail:
        return f"memory limit exceeded ({limits.memory_bytes} bytes)"
    if "[Errno 27]" in stderr_tail:  # EFBIG: CPython ignores SIGXFSZ, so writes fail instead
        return f"file size or output limit exceeded ({limits.file_size_bytes} bytes)"
    if returncode != 0:
        lines = [line for line in stderr_tail.splitlines() if line.strip()]
        return f"exit status {returncode}: {lines[-1].strip() if lines else 'no error output'}"
    if not completed:
        return "exited before the end of the program (no completion marker)"
    return "passed"


def _sandbox_user() -> tuple[int, int] | None:
    """A fresh (uid, gid) for this run when running as root, else None."""
    if os.geteuid() != 0:
        return None
    while True:
        with _uid_lock:
            slot = next(_uid_counter) % 1000
        uid = _UID_BASE + (os.getpid() % 100_000) * 1000 + slot
        if _count_tasks(uid) == 0:  # an unreaped zombie of an earlier run would count for NPROC
            return uid, uid


def _process_limit(sandbox_user, max_processes: int) -> int:
    """RLIMIT_NPROC counts every task of the real uid: a per-run uid starts from zero."""
    if sandbox_user is not None:
        return max_processes
    uid = os.getuid()
    return _count_tasks(uid) + max_processes


def _count_tasks(uid: int) -> int:
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


@cache
def _landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 where unsupported)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(abi, 0)


@cache
def _default_interpreter(other_user: bool) -> str:
    """This interpreter, or (when the child runs as another uid) one that uid can execute."""
    if not other_user:
        return sys.executable
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable),
                  shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    for candidate in filter(None, candidates):
        if _world_usable(candidate) and _runs_as_other_user(candidate):
            return candidate
    raise ArgumentError(
        f"cannot run Python as an unprivileged uid (tried {[c for c in candidates if c]} as uid "
        f"{_UID_BASE - 1}): pass python= an interpreter every user can execute, and make sure "
        "uids from 2100000000 are mapped if this is a user namespace")


def _world_usable(path: str) -> bool:
    real = Path(os.path.realpath(path))
    try:
        if real.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def _runs_as_other_user(interpreter: str) -> bool:
    uid = _UID_BASE - 1  # probe identity, never used for runs
    try:
        probe = subprocess.run([interpreter, "-I", "-S", "-c", "pass"], user=uid, group=uid,
                               extra_groups=[], env={}, cwd="/", stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0
