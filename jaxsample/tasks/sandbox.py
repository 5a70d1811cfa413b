"""Run untrusted Python (model-written code) in a confined child process.

Each run gets:
- its own session and process group, killed as a whole on timeout and after exit;
- a fresh empty working directory, removed afterwards, and an environment holding only
  PATH, HOME and LANG (nothing from the parent's);
- resource limits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (each file and the captured
  output), RLIMIT_NPROC, RLIMIT_NOFILE, no core dumps;
- a total disk cap: the working directory is a private tmpfs of `disk_bytes` and
  `max_files` inodes, mounted in a new mount namespace (gone with the run), where
  directories the caller names (`hidden=`) are covered by an empty tmpfs nobody may enter;
- no network: an empty network namespace (no interface but a down loopback; this also
  separates abstract AF_UNIX sockets) with a new IPC namespace (System V IPC, POSIX message
  queues), and a seccomp filter that denies socket() for every
  address family, socketpair() except connected AF_UNIX stream pairs, and io_uring (which
  could open sockets past the filter), so no pathname AF_UNIX socket outside is reachable;
- when the parent is root: a dedicated unprivileged uid/gid per run (no supplementary
  groups), so RLIMIT_NPROC binds (it does not bind root), the child cannot read the parent's
  /proc/<pid>/environ, and after the run every process of that uid is killed, including
  any that left the process group with setsid(). Without root the namespaces come from an
  unprivileged user namespace where the kernel allows one;
- where the kernel has Landlock (Linux ≥ 5.13): writes confined to the working directory
  (plus /dev/null), TCP bind/connect denied (ABI ≥ 4), signals to processes outside the
  sandbox and abstract AF_UNIX sockets outside it blocked (ABI ≥ 6).

Every mechanism is probed once per process (`sandbox_capabilities()`, which really applies
it in a throwaway child and checks that it holds); each one missing on this kernel is named
in a `SandboxWarning` on every run, never assumed. A mechanism that was probed but then
fails to apply fails the run ("sandbox setup failed"); the run never proceeds without it.

Two ways to run:
- `run_python(program, limits)`: passes if the program exits with status 0 *and* a
  completion marker, printed by code appended after the program, appears on stdout. The
  marker is random per run and reaches the interpreter through a pipe, but it sits in the
  program's own code constants, so a program can forge it: use it for crude misbehaviour
  (hangs, early exits), not for a verdict an adversary must not fake.
- `run_judged(program, judge, limits)`: the program serves calls over a pipe; a trusted
  judge process outside the sandbox sends the calls, receives plain data
  (`jaxsample.tasks.plain_data`) and decides. Nothing in the sandbox can change the verdict
  other than by the values it returns. The HumanEval grader uses this. It needs a dedicated
  uid (root) or Landlock between the program and the judge, and raises `SandboxError`
  without both: under the grader's own uid the program could forge the verdict via /proc.

Threat model: accidental or crude misbehaviour of generated code, and a policy trained on
the verdict that finds cheap exploits (faked markers, objects equal to anything, patched
builtins, early exits). It is not a boundary against kernel exploits or side channels:
use a VM for code that attacks the kernel. Reads are not confined: the program can read
any world-readable file outside the directories a run hides (`hidden=`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

from jaxsample.errors import ArgumentError, SandboxError
from jaxsample.validation import check_int, check_scalar

_SETUP_ERROR = "jaxsample-sandbox-setup-error:"
# Per-run uids come from a range no distribution assigns to accounts.
_UID_BASE = 2_100_000_000
_uid_counter = itertools.count()
_uid_lock = threading.Lock()
# (audit arch, socket, socketpair, io_uring_setup) syscall numbers per machine.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 53, 425), "aarch64": (0xC00000B7, 198, 199, 425)}


class SandboxWarning(UserWarning):
    """A confinement mechanism is unavailable on this machine (named in the message)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run.

    Attributes:
      timeout_s: wall-clock limit; the whole process group is killed when it expires.
      cpu_s: CPU seconds per process (RLIMIT_CPU); None = ceil(timeout_s) + 1.
      memory_bytes: address-space limit per process (RLIMIT_AS).
      file_size_bytes: largest file a process may write (RLIMIT_FSIZE); also caps the
        captured stdout and stderr.
      disk_bytes: total bytes the working directory (a private tmpfs) may hold.
      max_files: files and directories the working directory may hold (tmpfs inodes).
      max_processes: processes (threads included) the sandbox may run (RLIMIT_NPROC).
      max_open_files: RLIMIT_NOFILE.
      tail_bytes: how much of the end of stdout/stderr the result keeps.
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 8 << 20
    disk_bytes: int = 64 << 20
    max_files: int = 4096
    max_processes: int = 32
    max_open_files: int = 64
    tail_bytes: int = 4096

    def __post_init__(self):
        # Finite: the CPU limit and the kill timer are derived from it (inf overflowed in ceil).
        check_scalar("SandboxLimits.timeout_s", self.timeout_s, "(0, inf)")
        object.__setattr__(self, "timeout_s", float(self.timeout_s))
        for name in ("memory_bytes", "file_size_bytes", "disk_bytes", "max_files",
                     "max_processes", "max_open_files", "tail_bytes"):
            object.__setattr__(self, name, check_int(f"SandboxLimits.{name}", getattr(self, name), 1))
        if self.cpu_s is not None:
            object.__setattr__(self, "cpu_s", check_int("SandboxLimits.cpu_s", self.cpu_s, 1))

    @property
    def cpu_seconds(self) -> int:
        """The RLIMIT_CPU in force: `cpu_s`, or ceil(timeout_s) + 1 when it is None."""
        return math.ceil(self.timeout_s) + 1 if self.cpu_s is None else self.cpu_s


class SandboxCapabilities(NamedTuple):
    """Which confinement mechanisms work on this machine (each probed, not assumed).

    Attributes:
      separate_uid: runs get a dedicated unprivileged uid (the parent is root).
      network_namespace: runs get an empty network namespace and a new IPC namespace.
      socket_filter: a seccomp filter denies socket(), socketpair() other than AF_UNIX
        stream pairs, and io_uring.
      disk_quota: the working directory is a private size-limited tmpfs.
      landlock_abi: the kernel's Landlock ABI (0: none).
      problems: why each missing mechanism failed its probe.
    """

    separate_uid: bool
    network_namespace: bool
    socket_filter: bool
    disk_quota: bool
    landlock_abi: int
    problems: tuple[str, ...] = ()

    def missing(self) -> tuple[str, ...]:
        """One line per missing mechanism: what it is and what is open without it."""
        lines = []
        if not self.separate_uid:
            lines.append("no dedicated uid (not root): RLIMIT_NPROC counts the user's other "
                         "processes, /proc/<parent>/environ is readable, setsid() escapees survive")
        if not self.network_namespace:
            lines.append("no network namespace: the host's loopback and abstract AF_UNIX "
                         "sockets are separated only by the other mechanisms; System V IPC "
                         "objects outside are reachable")
        if not self.socket_filter:
            lines.append("no seccomp socket filter: pathname AF_UNIX sockets outside the "
                         "sandbox are reachable"
                         + ("" if self.network_namespace else ", and so is the network"))
        if not self.disk_quota:
            lines.append("no private tmpfs: total disk use is not capped (only RLIMIT_FSIZE "
                         "per file), and hidden directories stay readable")
        if self.landlock_abi < 1:
            lines.append("no Landlock: writes outside the working directory are stopped only "
                         "by file permissions")
        if not self.separate_uid and self.landlock_abi < 1:
            lines.append("no dedicated uid and no Landlock: the program could open the judge's "
                         "/proc/<pid>/fd as its own user and forge a verdict, so run_judged refuses")
        if 0 < self.landlock_abi < 6:
            lines.append(f"Landlock ABI {self.landlock_abi} < 6: signals to outside processes "
                         "are not blocked by Landlock")
        return tuple(lines) + self.problems


class ExecutionResult(NamedTuple):
    """Outcome of one sandboxed run.

    Attributes:
      passed: `run_python`: exited with status 0 after printing the completion marker;
        `run_judged`: the judge's verdict.
      reason: "passed", or why not (timeout, CPU/memory/output limit, signal, exception
        line, early exit, failed check, sandbox setup failure).
      returncode: the program's exit status (negative: killed by that signal); None if it
        timed out or was still serving the judge when the verdict came.
      stdout_tail: the end of the program's stdout (the completion marker removed).
      stderr_tail: the end of its stderr.
      duration_s: wall-clock seconds.
    """

    passed: bool
    reason: str
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float


# Runs before the program, as root where the parent is root: namespaces and the tmpfs, then
# the switch to the sandbox uid, limits, seccomp, Landlock, then exec of a clean interpreter
# that reads the program from stdin. In probe mode it applies each mechanism, checks that
# it holds and prints a JSON report instead. Kept to the standard library.
_LAUNCHER = r"""
import ctypes, fcntl, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)

def ok(result, what):
    if result < 0:
        raise OSError(ctypes.get_errno(), what + " failed")
    return result

def syscall(nr, *args):
    return ok(libc.syscall(ctypes.c_long(nr), *args), "syscall %d" % nr)

def enter_namespaces(network, mount):
    # CLONE_NEWNET with CLONE_NEWIPC (System V IPC and POSIX queues), CLONE_NEWNS.
    flags = (0x40000000 | 0x08000000 if network else 0) | (0x00020000 if mount else 0)
    if os.geteuid() == 0:
        ok(libc.unshare(flags), "unshare")
        return
    uid, gid = os.getuid(), os.getgid()
    ok(libc.unshare(0x10000000 | flags), "unshare(CLONE_NEWUSER)")
    maps = (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
            ("gid_map", "%d %d 1" % (gid, gid)))
    for name, text in maps:
        with open("/proc/self/" + name, "w") as f:
            f.write(text)

def mount_disk(size, files, uid, gid):
    ok(libc.mount(None, b"/", None, ctypes.c_ulong(0x4000 | 0x40000), None),
       "mount(MS_REC | MS_PRIVATE)")
    options = "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (size, files, uid, gid)
    here = os.getcwd().encode()
    ok(libc.mount(b"tmpfs", here, b"tmpfs", ctypes.c_ulong(2 | 4), options.encode()),
       "mount(tmpfs)")
    os.chdir(here)

def hide(directory):
    # An empty read-only tmpfs nobody may enter, over the directory, in this namespace only.
    flags = ctypes.c_ulong(1 | 2 | 4 | 8)  # MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    ok(libc.mount(b"tmpfs", directory.encode(), b"tmpfs", flags, b"size=4k,nr_inodes=1,mode=000"),
       "mount(tmpfs) over " + directory)

def filter_sockets(arch, socket_nr, socketpair_nr, io_uring_nr):
    ld, jeq, jge, and_, ret = 0x20, 0x15, 0x35, 0x54, 0x06
    program = [
        (ld, 0, 0, 4), (jeq, 0, "deny", arch),
        (ld, 0, 0, 0), (jge, "deny", 0, 0x40000000),  # x32 syscalls
        (jeq, "deny", 0, socket_nr), (jeq, "deny", 0, io_uring_nr),
        (jeq, 0, "allow", socketpair_nr),
        (ld, 0, 0, 16), (jeq, 0, "deny", 1),  # AF_UNIX
        (ld, 0, 0, 24), (and_, 0, 0, 0xFFFFFFFF & ~0x80800), (jeq, 0, "deny", 1),  # STREAM
        "allow", (ret, 0, 0, 0x7FFF0000),
        "deny", (ret, 0, 0, 0x00050000 | 1)]  # SECCOMP_RET_ERRNO | EPERM
    labels, code = {}, []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)
    def jump(i, target):
        return target if isinstance(target, int) else labels[target] - i - 1
    blob = b"".join(struct.pack("=HBBI", c, jump(i, t), jump(i, f), k)
                    for i, (c, t, f, k) in enumerate(code))
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    ok(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    ok(libc.prctl(22, 2, ctypes.byref(Program(len(code), blob)), 0, 0), "prctl(PR_SET_SECCOMP)")

def restrict_filesystem(abi):
    write_file, truncate, ioctl_dev = 1 << 1, 1 << 14, 1 << 15
    # Every write-like right: write, remove, make-*, and per ABI refer/truncate/ioctl.
    fs = write_file | sum(1 << b for b in range(4, 13))
    fs |= 1 << 13 if abi >= 2 else 0
    fs |= (truncate if abi >= 3 else 0) | (ioctl_dev if abi >= 5 else 0)
    net = 0b11 if abi >= 4 else 0
    scoped = 0b11 if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    ruleset = syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    file_rights = write_file | (truncate if abi >= 3 else 0) | (ioctl_dev if abi >= 5 else 0)
    for path, rights in ((os.getcwd(), fs), ("/dev/null", file_rights)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", rights, fd)
        syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.c_char_p(rule),
                ctypes.c_uint32(0))
        os.close(fd)
    ok(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    os.close(ruleset)

def attach_channel(fds):
    # The program finds its request pipe at fd 3 and its reply pipe at fd 4.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in zip((3, 4), high):
        os.dup2(fd, target)
        os.close(fd)

def confine():
    if cfg["network_namespace"] or cfg["disk"]:
        enter_namespaces(cfg["network_namespace"], bool(cfg["disk"]))
    if cfg["disk"]:
        mount_disk(*cfg["disk"])
        for directory in cfg["hidden"]:
            hide(directory)
    if cfg["user"]:
        uid, gid = cfg["user"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if cfg["socket_filter"]:
        filter_sockets(*cfg["socket_filter"])
    if cfg["landlock_abi"]:
        restrict_filesystem(cfg["landlock_abi"])
    if cfg["channel"]:
        attach_channel(cfg["channel"])

def probe():
    import _socket
    report = {}
    def attempt(name, step, *args):
        try:
            problem = step(*args)
        except Exception as e:
            problem = repr(e)
        report[name] = problem or "ok"
    def network():
        enter_namespaces(True, False)
        names = [name for _, name in _socket.if_nameindex()]
        return None if names == ["lo"] else "interfaces %r after unshare" % names
    def disk():
        enter_namespaces(False, True)
        mount_disk(1 << 20, 16, os.getuid(), os.getgid())
        try:
            with open("fill", "wb") as f:
                f.write(bytes(2 << 20))
        except OSError:
            return None
        return "a 1 MiB tmpfs took 2 MiB"
    def sockets():
        filter_sockets(*cfg["socket_filter"])
        for family, kind in ((1, 1), (2, 2), (10, 1)):
            try:
                _socket.socket(family, kind).close()
                return "socket(%d, %d) still allowed" % (family, kind)
            except PermissionError:
                pass
        _socket.socketpair(1, 1)
    attempt("network_namespace", network)
    attempt("disk_quota", disk)
    if cfg["socket_filter"]:
        attempt("socket_filter", sockets)
    else:
        report["socket_filter"] = "no seccomp syscall table for %s" % cfg["machine"]
    print(json.dumps(report))

try:
    if cfg.get("probe"):
        probe()
        sys.exit(0)
    confine()
except Exception as e:
    sys.stderr.write("%s %r\n" % (cfg["error_tag"], e))
    sys.exit(121)
os.execv(sys.executable, [sys.executable, "-I", "-B", "-"])
"""


def run_python(
    program: str,
    limits: SandboxLimits = SandboxLimits(),
    python: str | None = None,
    hidden: Sequence[str] = (),
) -> ExecutionResult:
    """Runs `program` (Python source) in the sandbox and reports whether it ran to the end.

    Args:
      program: source text; a completion-marker print is appended after it.
      limits: resource limits.
      python: interpreter for the child; default: this one if the sandbox user can run it,
        else a system python3 it can.
      hidden: directories the program must not read: each gets an empty tmpfs nobody may
        enter mounted over it in the run's mount namespace (where there is one).

    Returns:
      `ExecutionResult`. Failures of the program never raise.
    """
    marker = f"__jaxsample_sandbox_done_{secrets.token_hex(16)}__"
    with _Sandbox(limits, python, hidden) as box:
        process = box.start(f"{program}\n\nprint({marker!r}, flush=True)\n")
        try:
            process.wait(limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        returncode = None if timed_out else box.stop(process)
        stdout, stderr_tail = box.stdout(), box.stderr_tail()
    completed = marker.encode() in stdout
    stdout_tail = stdout.replace(marker.encode() + b"\n", b"")[-limits.tail_bytes :]
    if completed and returncode == 0:
        reason = "passed"
    else:
        reason = _reason(timed_out, returncode, stderr_tail, limits,
                         "exited before the end of the program (no completion marker)")
    return ExecutionResult(reason == "passed", reason, returncode,
                           stdout_tail.decode(errors="replace"), stderr_tail, box.duration_s)


def run_judged(
    program: str,
    judge: str,
    limits: SandboxLimits = SandboxLimits(),
    python: str | None = None,
    hidden: Sequence[str] = (),
) -> ExecutionResult:
    """Runs `program` in the sandbox as a worker for `judge`, a trusted process that decides.

    The program reads requests from file descriptor 3 and writes replies to 4. The judge runs
    outside the sandbox (`sys.executable -I -S`, source on stdin, its own session, empty
    environment), with the other ends of the two pipes at the descriptors `int(sys.argv[1])`
    (requests, to write) and `int(sys.argv[2])` (replies, to read). It prints its verdict
    on stdout as one JSON object `{"passed": bool, "reason": str}`, with
    `"program_gone": true` added when the program stopped answering (the reason then says how
    the program ended). `limits.timeout_s` bounds the whole exchange; the program is killed
    once the verdict is in. `python` and `hidden` are as in `run_python`.

    Returns:
      `ExecutionResult` with the judge's verdict; failures of the program never raise.

    Raises:
      SandboxError: neither a dedicated uid (root) nor Landlock separates the program from
        the judge: running as the grader's own user, it could write a verdict into the
        judge's stdout through /proc and kill the judge.
    """
    capabilities = sandbox_capabilities()
    if not capabilities.separate_uid and capabilities.landlock_abi < 1:
        raise SandboxError(
            "run_judged needs a dedicated uid (run as root) or Landlock (Linux >= 5.13) so that the "
            "program cannot reach the judge through /proc and forge its verdict; this process is not "
            "root and the kernel has no Landlock")
    with _Sandbox(limits, python, hidden) as box:
        fds = (*os.pipe(), *os.pipe())  # requests (read, write), replies (read, write)
        try:
            process = box.start(program, channel=(fds[0], fds[3]))
            judge_fds = (fds[1], fds[2])
            # The judge's source (the tests) goes through stdin: /proc/<pid>/cmdline is
            # readable by every user, the sandbox's included.
            referee = subprocess.Popen(
                [sys.executable, "-I", "-S", "-", *map(str, judge_fds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=judge_fds, start_new_session=True, env={}, cwd="/")
        finally:
            for fd in fds:  # from here on only the program and the judge hold the pipes
                os.close(fd)
        try:
            verdict, complaint = referee.communicate(judge.encode(), timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(referee.pid)
            verdict, complaint = referee.communicate()
        _kill_group(referee.pid)
        report = None if timed_out else _parse_verdict(verdict)
        if report is not None and report.get("program_gone"):
            _wait_briefly(process)  # it closed its reply pipe: it is ending
        finished = process.poll() is not None
        returncode = box.stop(process)
        if not finished:  # it was still serving the judge: killed, no status of its own
            returncode = None
        stdout_tail = box.stdout()[-limits.tail_bytes :].decode(errors="replace")
        stderr_tail = box.stderr_tail()
    if _SETUP_ERROR in stderr_tail or timed_out:
        passed, reason = False, _reason(timed_out, returncode, stderr_tail, limits, "")
    elif report is None:
        lines = complaint.decode(errors="replace").strip().splitlines() or ["no verdict"]
        passed, reason = False, f"judge failed: {lines[-1]}"
    elif report["passed"]:
        passed, reason = True, "passed"
    elif report.get("program_gone") and finished:
        passed, reason = False, _reason(False, returncode, stderr_tail, limits, report["reason"])
    else:
        passed, reason = False, report["reason"]
    return ExecutionResult(passed, reason, returncode, stdout_tail, stderr_tail, box.duration_s)


def _parse_verdict(verdict: bytes) -> dict | None:
    try:
        report = json.loads(verdict)
    except ValueError:
        return None
    valid = (isinstance(report, dict) and type(report.get("passed")) is bool
             and type(report.get("reason")) is str)
    return report if valid else None


def _wait_briefly(process, grace_s: float = 0.5) -> None:
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass


class _Sandbox:
    """One run's working directory, identity, captured output and process, all cleaned up."""

    def __init__(self, limits: SandboxLimits, python: str | None, hidden: Sequence[str]):
        capabilities = sandbox_capabilities()
        for line in capabilities.missing():
            warnings.warn(f"sandbox: {line}", SandboxWarning, stacklevel=3)
        self.capabilities = capabilities
        self.limits = limits
        self.hidden = [os.path.realpath(directory) for directory in hidden]
        missing = [d for d in self.hidden if not os.path.isdir(d)]
        if missing:
            raise ArgumentError(f"hidden must name existing directories, got {missing}")
        self.user = _sandbox_user()
        self.interpreter = python or _default_interpreter(self.user is not None)
        self.duration_s = 0.0
        self._process = None

    def __enter__(self):
        self._private = tempfile.TemporaryDirectory(prefix="jaxsample-sandbox-out-")
        self.workdir = tempfile.mkdtemp(prefix="jaxsample-sandbox-")
        if self.user is not None:
            os.chown(self.workdir, *self.user)
        private = Path(self._private.name)
        self._out = open(private / "stdout", "w+b")
        self._err = open(private / "stderr", "w+b")
        return self

    def __exit__(self, *exc):
        try:
            if self._process is not None:
                self.stop(self._process)
        finally:
            self._out.close()
            self._err.close()
            self._private.cleanup()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self, source: str, channel: tuple[int, int] | None = None) -> subprocess.Popen:
        """Starts the launcher on `source`; `channel` (read fd, write fd) becomes fds 3 and 4."""
        limits, caps = self.limits, self.capabilities
        nproc = _process_limit(self.user, limits.max_processes)
        owner = self.user or (os.getuid(), os.getgid())
        config = {
            "rlimits": [
                ("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 1),
                ("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes),
                ("RLIMIT_FSIZE", limits.file_size_bytes, limits.file_size_bytes),
                ("RLIMIT_NOFILE", limits.max_open_files, limits.max_open_files),
                ("RLIMIT_CORE", 0, 0),
                ("RLIMIT_NPROC", nproc, nproc),
            ],
            "user": self.user,
            "network_namespace": caps.network_namespace,
            "disk": [limits.disk_bytes, limits.max_files, *owner] if caps.disk_quota else None,
            "hidden": self.hidden,
            "socket_filter": _seccomp_syscalls() if caps.socket_filter else None,
            "landlock_abi": caps.landlock_abi,
            "channel": channel,
            "error_tag": _SETUP_ERROR,
        }
        command = [self.interpreter, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)]
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=self._out, stderr=self._err,
                cwd=self.workdir, env={"PATH": "/usr/bin:/bin", "HOME": self.workdir,
                                       "LANG": "C.UTF-8"},
                start_new_session=True, close_fds=True, pass_fds=channel or ())
        except OSError as e:
            raise ArgumentError(
                f"cannot start the sandbox interpreter {command[0]} ({e})") from None
        self._process, self._started = process, start
        threading.Thread(target=_feed, args=(process.stdin, source.encode()), daemon=True).start()
        return process

    def stop(self, process: subprocess.Popen) -> int:
        """Kills what is left of the run (its group, and as root its uid) and reaps it."""
        _kill_group(process.pid)  # after a normal exit too: children it left behind
        process.wait()
        self.duration_s = time.monotonic() - self._started
        self._process = None
        if self.user is not None:
            _kill_user_processes(self.user[0])
        return process.returncode

    def stdout(self) -> bytes:
        self._out.seek(0)
        return self._out.read()

    def stderr_tail(self) -> str:
        self._err.seek(0, os.SEEK_END)
        self._err.seek(max(0, self._err.tell() - self.limits.tail_bytes))
        return self._err.read().decode(errors="replace")


def _feed(pipe, data: bytes) -> None:
    try:
        pipe.write(data)
        pipe.close()
    except (BrokenPipeError, OSError, ValueError):  # the program ended before reading it all
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_user_processes(uid: int) -> None:
    """Kills every process of the per-run uid, until a scan finds none left alive.

    A process forking during a scan leaves a child that the next scan finds; the loop ends
    because killed processes fork no more and RLIMIT_NPROC bounds the rest.
    """
    while True:
        found = False
        for pid, task_uid, state, _ in _tasks():
            if task_uid == uid and state not in "ZX":
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not found:
            return


def _reason(timed_out, returncode, stderr_tail, limits, unfinished: str) -> str:
    """Why a run did not pass; `unfinished` when it exited with status 0 too early."""
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
    return unfinished


@cache
def sandbox_capabilities() -> SandboxCapabilities:
    """Probes each confinement mechanism once per process, in a throwaway child that applies
    it and checks that it holds (e.g. that a 1 MiB tmpfs refuses 2 MiB)."""
    landlock_abi = _landlock_abi()
    if not sys.platform.startswith("linux"):
        return SandboxCapabilities(False, False, False, False, 0, ("not Linux",))
    config = {"probe": True, "socket_filter": _seccomp_syscalls(),
              "machine": platform.machine(), "error_tag": _SETUP_ERROR}
    names = ("network_namespace", "socket_filter", "disk_quota")
    root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="jaxsample-sandbox-probe-") as scratch:
        try:
            probe = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(config)], cwd=scratch,
                env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
            report = json.loads(probe.stdout)
            states = [report[name] for name in names]
        except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired) as e:
            return SandboxCapabilities(root, False, False, False, landlock_abi,
                                       (f"the sandbox probe failed ({e!r})",))
    problems = tuple(f"{name} probe: {state}" for name, state in zip(names, states)
                     if state != "ok")
    return SandboxCapabilities(root, *(state == "ok" for state in states), landlock_abi,
                               problems)


def _seccomp_syscalls() -> tuple[int, int, int, int] | None:
    """This machine's seccomp audit arch and syscall numbers, where the filter knows them."""
    if sys.byteorder != "little":  # the filter reads the low word of 64-bit arguments
        return None
    return _SECCOMP_ARCH.get(platform.machine())


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
    return sum(threads for _, task_uid, _, threads in _tasks() if task_uid == uid)


def _tasks():
    """(pid, real uid, state letter, threads) of every process, from /proc."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # it ended during the scan
            continue
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        try:
            task = (int(status.parent.name), int(fields["Uid"].split()[0]),
                    fields["State"].split()[0], int(fields["Threads"]))
        except (KeyError, ValueError, IndexError):
            continue
        yield task


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
