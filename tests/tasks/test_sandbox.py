"""The sandbox against hostile programs: each must fail with a reason, never hang or leak."""

import os
import platform
import ctypes
import json
import secrets
import select
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxsample.errors import ArgumentError, SandboxError
from jaxsample.tasks import SandboxLimits, SandboxWarning, run_python, sandbox_capabilities
from jaxsample.tasks import sandbox
from jaxsample.tasks.sandbox import _landlock_abi

LIMITS = SandboxLimits(timeout_s=2.0, memory_bytes=256 << 20, max_processes=16)
AS_ROOT = os.geteuid() == 0


def run(source, limits=LIMITS):
    return run_python(textwrap.dedent(source), limits)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie awaiting its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_correct_program_passes_and_its_directory_is_removed():
    result = run("""
        import os
        open("scratch.txt", "w").write("ok")
        print(os.getcwd(), open("scratch.txt").read(), sorted(os.listdir(".")))
    """)
    assert result.passed and result.reason == "passed" and result.returncode == 0
    workdir, content, listing = result.stdout_tail.split(" ", 2)
    assert content == "ok" and listing.strip() == "['scratch.txt']"  # started empty
    assert not Path(workdir).exists()


def test_failing_checks_fail_with_the_exception_line():
    result = run("assert 1 + 1 == 3, 'arithmetic is broken'")
    assert not result.passed and result.returncode == 1
    assert "AssertionError: arithmetic is broken" in result.reason


@pytest.mark.parametrize("exit_call",
                         ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_exiting_before_the_checks_is_a_failure(exit_call):
    result = run(f"{exit_call}\nassert False, 'the checks'")
    assert not result.passed and result.returncode == 0
    assert "before the end" in result.reason


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run("while True:\n    pass")
    assert not result.passed and result.returncode is None
    assert "timed out" in result.reason
    assert time.monotonic() - start < LIMITS.timeout_s + 2


def test_cpu_limit_stops_a_busy_program_before_the_wall_clock():
    result = run("while True:\n    pass", SandboxLimits(timeout_s=10.0, cpu_s=1))
    assert not result.passed and "CPU time limit" in result.reason
    assert result.duration_s < 5


@pytest.mark.parametrize(
    "hog", ["x = bytearray(4 << 30)", "a = []\nwhile True:\n    a.append(bytearray(10**7))"])
def test_memory_hog_hits_the_memory_limit(hog):
    # A generous wall clock: filling 256 MiB takes over a second on a loaded machine.
    result = run(hog, SandboxLimits(timeout_s=10.0, memory_bytes=256 << 20))
    assert not result.passed and "memory limit" in result.reason


def test_huge_output_is_capped():
    limits = SandboxLimits(timeout_s=5.0, file_size_bytes=1 << 20, tail_bytes=1000)
    result = run("while True:\n    print('x' * 1000)", limits)
    assert not result.passed and "output limit" in result.reason
    assert len(result.stdout_tail) <= 1000 and len(result.stderr_tail) <= 1000


def test_process_count_is_capped():
    # Even as root: the program runs under a dedicated uid, where RLIMIT_NPROC binds.
    result = run("""
        import os, time
        children = 0
        for _ in range(100):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children += 1
        print(children)
    """)
    assert result.passed
    assert 0 < int(result.stdout_tail) < LIMITS.max_processes


def test_fork_bomb_is_contained_and_cleaned_up():
    result = run("""
        import os
        print(os.getuid(), flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert not result.passed and "timed out" in result.reason
    uid = int(result.stdout_tail.split()[0])
    if AS_ROOT:
        assert uid != 0
        time.sleep(0.2)
        survivors = [p for p in Path("/proc").glob("[0-9]*")
                     if _uid_of(p) == uid and _alive(int(p.name))]
        assert survivors == []


def _uid_of(proc: Path):
    try:
        for line in (proc / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None


@pytest.mark.skipif(not AS_ROOT, reason="escapees are swept by uid, which needs root")
def test_processes_escaping_the_group_are_killed():
    result = run("""
        import os, time
        pid = os.fork()
        if pid == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        print(pid)
    """)
    assert result.passed
    time.sleep(0.2)
    assert not _alive(int(result.stdout_tail))


@pytest.mark.skipif(not (AS_ROOT or _landlock_abi()),
                    reason="needs root (separate uid) or Landlock")
def test_writes_outside_the_working_directory_fail(tmp_path):
    tmp_path.chmod(0o777)  # writable by anyone: only the sandbox itself can stop the write
    targets = [tmp_path / "escaped.txt", Path("/tmp") / f"jaxsample-escape-{os.getpid()}.txt"]
    result = run(f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("escaped")
                print("WROTE", path)
            except OSError as e:
                print("refused", path, type(e).__name__)
    """)
    assert result.passed and "WROTE" not in result.stdout_tail
    for target in targets:
        assert not target.exists()


def test_the_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("JAXSAMPLE_TEST_SECRET", "jaxsample-secret-4f1c")
    result = run("import os\nprint(sorted(os.environ), os.environ.get('JAXSAMPLE_TEST_SECRET'))")
    assert result.passed
    assert result.stdout_tail.strip() == "['HOME', 'LANG', 'PATH'] None"


@pytest.mark.skipif(not AS_ROOT,
                    reason="/proc/<parent>/environ is readable by the same uid; needs root")
def test_the_parent_environment_cannot_be_read_through_proc(monkeypatch):
    secret = "jaxsample-secret-9b2e"
    monkeypatch.setenv("JAXSAMPLE_TEST_SECRET", secret)
    result = run("""
        import os
        try:
            print(open(f"/proc/{os.getppid()}/environ").read())
        except OSError as e:
            print("refused", type(e).__name__)
    """)
    assert result.passed
    assert secret not in result.stdout_tail and "refused PermissionError" in result.stdout_tail


def test_limits_are_validated():
    with pytest.raises(ArgumentError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ArgumentError, match=r"SandboxLimits.timeout_s must be a number in \(0, inf\), got inf"):
        SandboxLimits(timeout_s=float("inf"))
    with pytest.raises(ArgumentError, match=r"SandboxLimits.max_files must be an integer in \[1, inf\], got True"):
        SandboxLimits(max_files=True)
    with pytest.raises(ArgumentError, match=r"SandboxLimits.cpu_s must be an integer in \[1, inf\], got 0"):
        SandboxLimits(cpu_s=np.int64(0))
    limits = SandboxLimits(timeout_s=np.float32(2.5), memory_bytes=np.int64(1 << 28), cpu_s=np.int64(3))
    assert (limits.timeout_s, limits.memory_bytes, limits.cpu_s) == (2.5, 1 << 28, 3)
    assert type(limits.memory_bytes) is int and type(limits.cpu_s) is int
    with pytest.raises(ArgumentError, match="max_processes"):
        SandboxLimits(max_processes=0)
    with pytest.raises(ArgumentError, match="disk_bytes"):
        SandboxLimits(disk_bytes=0)
    with pytest.raises(ArgumentError, match="hidden must name existing directories"):
        run_python("pass", LIMITS, hidden=["/nonexistent-jaxsample-dir"])


# --- A closed sandbox: network, AF_UNIX sockets, disk ----------------------------------------

CAPABILITIES = sandbox_capabilities()
# Each mechanism alone (the others switched off for the run), the whole sandbox, and a
# control with every confinement of sockets off, which shows the probe reaches its target.
ONLY_NAMESPACE = dict(socket_filter=False, landlock_abi=0)
ONLY_FILTER = dict(network_namespace=False, landlock_abi=0)
ONLY_LANDLOCK = dict(network_namespace=False, socket_filter=False)
NOTHING = dict(network_namespace=False, socket_filter=False, landlock_abi=0)
quiet = pytest.mark.filterwarnings("ignore::jaxsample.tasks.SandboxWarning")


def _confine_with(monkeypatch, switched_off):
    for name, value in switched_off.items():
        if name != "landlock_abi" and not getattr(CAPABILITIES, name):
            pytest.skip(f"{name} reported missing here: {CAPABILITIES.missing()}")
    capabilities = CAPABILITIES._replace(**switched_off)
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: capabilities)


def _loopback_listeners():
    """(family, address, udp socket, tcp socket) for 127.0.0.1 and, where it works, ::1."""
    listeners = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((host, 0))
        except OSError:
            continue  # no IPv6 loopback on this machine
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.bind((host, 0))
        tcp.listen()
        for listener in (udp, tcp):
            listener.setblocking(False)
        listeners.append((family, host, udp, tcp))
    return listeners


def _arrivals(sockets, wait_s=0.3):
    """The sockets that received a datagram or a connection (waiting up to `wait_s`)."""
    ready, _, _ = select.select(sockets, [], [], wait_s)
    return ready


NETWORK_PROBE = """
import socket
for family, host, udp_port, tcp_port in {targets!r}:
    try:
        socket.socket(family, socket.SOCK_DGRAM).sendto(b"escaped", (host, udp_port))
        print("udp sent", host)
    except OSError as e:
        print("udp refused", host, e.errno)
    try:
        with socket.create_connection((host, tcp_port), timeout=2) as s:
            s.sendall(b"escaped")
        print("tcp connected", host)
    except OSError as e:
        print("tcp refused", host, e.errno)
"""


@quiet
@pytest.mark.parametrize("switched_off", [{}, ONLY_NAMESPACE, ONLY_FILTER],
                         ids=["sandbox", "namespace alone", "seccomp alone"])
def test_udp_and_tcp_to_loopback_do_not_leave_the_sandbox(monkeypatch, switched_off):
    _confine_with(monkeypatch, switched_off)
    listeners = _loopback_listeners()
    targets = [(int(f), host, u.getsockname()[1], t.getsockname()[1])
               for f, host, u, t in listeners]
    try:
        result = run(NETWORK_PROBE.format(targets=targets))
        arrived = _arrivals([s for _, _, u, t in listeners for s in (u, t)])
    finally:
        for _, _, udp, tcp in listeners:
            udp.close()
            tcp.close()
    assert result.passed, result.reason
    assert arrived == []
    lines = result.stdout_tail.splitlines()
    assert len(lines) == 2 * len(listeners) and all(" refused " in line for line in lines)


@quiet
def test_the_network_probe_reaches_loopback_when_nothing_confines_it(monkeypatch):
    # The control for the test above: the same probe, no network confinement, gets through.
    _confine_with(monkeypatch, NOTHING)
    listeners = _loopback_listeners()[:1]
    (family, host, udp, tcp), = listeners
    try:
        result = run(NETWORK_PROBE.format(
            targets=[(int(family), host, udp.getsockname()[1], tcp.getsockname()[1])]))
        received = udp.recv(100) if _arrivals([udp], 2.0) else None
    finally:
        udp.close()
        tcp.close()
    assert result.passed and "udp sent" in result.stdout_tail
    assert received == b"escaped"


@pytest.fixture
def unix_listeners():
    """World-reachable AF_UNIX sockets outside the sandbox: pathname stream and datagram
    sockets in a world-writable directory, and an abstract stream socket."""
    directory = Path(tempfile.mkdtemp(prefix="jaxsample-test-sockets-"))
    directory.chmod(0o777)
    stream, datagram = directory / "stream.sock", directory / "datagram.sock"
    abstract = f"\0jaxsample-test-{os.getpid()}-{secrets.token_hex(4)}"
    sockets = {}
    for name, address, kind in (("path", stream, socket.SOCK_STREAM),
                                ("datagram", datagram, socket.SOCK_DGRAM),
                                ("abstract", abstract, socket.SOCK_STREAM)):
        listener = socket.socket(socket.AF_UNIX, kind)
        listener.bind(str(address))
        if kind == socket.SOCK_STREAM:
            listener.listen()
        listener.setblocking(False)
        if name != "abstract":
            address.chmod(0o777)
        sockets[name] = (str(address), listener)
    yield sockets
    for _, listener in sockets.values():
        listener.close()
    shutil.rmtree(directory)


UNIX_PROBE = """
import socket
addresses = {addresses!r}
for name in ("path", "abstract"):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(addresses[name])
            s.sendall(b"escaped")
        print(name, "connected")
    except OSError as e:
        print(name, "refused", e.errno)
try:  # a datagram pair re-aimed at the outside socket
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.sendto(b"escaped", addresses["datagram"])
    print("datagram sent")
except OSError as e:
    print("datagram refused", e.errno)
"""


@quiet
@pytest.mark.parametrize("switched_off, blocked", [
    ({}, {"path", "datagram", "abstract"}),
    (ONLY_FILTER, {"path", "datagram", "abstract"}),
    (ONLY_NAMESPACE, {"abstract"}),
    (ONLY_LANDLOCK, {"abstract"}),
    (NOTHING, set()),  # control: the probe reaches every socket
], ids=["sandbox", "seccomp alone", "namespace alone", "landlock alone", "control"])
def test_unix_sockets_outside_the_sandbox_are_unreachable(monkeypatch, unix_listeners,
                                                          switched_off, blocked):
    _confine_with(monkeypatch, switched_off)
    if switched_off is ONLY_LANDLOCK and CAPABILITIES.landlock_abi < 6:
        pytest.skip(f"Landlock ABI {CAPABILITIES.landlock_abi} < 6 has no abstract-socket scope")
    if switched_off is NOTHING and not AS_ROOT:
        pytest.skip("without a separate uid the control would only show the user's own access")
    addresses = {name: address for name, (address, _) in unix_listeners.items()}
    result = run(UNIX_PROBE.format(addresses=addresses))
    assert result.passed, result.reason
    arrived = _arrivals([listener for _, listener in unix_listeners.values()])
    reached = {name for name, (_, listener) in unix_listeners.items() if listener in arrived}
    assert reached == {"path", "datagram", "abstract"} - blocked, result.stdout_tail


DISK_FILLER = """
import errno, os
total, stop = 0, None
try:
    for i in range({files}):
        fd = os.open(f"f{{i}}", os.O_WRONLY | os.O_CREAT)
        try:
            for _ in range({chunks}):
                total += os.write(fd, bytes(1 << 20))
        finally:
            os.close(fd)
except OSError as e:
    stop = errno.errorcode[e.errno]
print(total, stop, len(os.listdir(".")))
"""


def test_total_disk_use_is_capped():
    # The case: 8 MiB files (each within RLIMIT_FSIZE), 320 MiB in all.
    if not CAPABILITIES.disk_quota:
        pytest.skip(f"disk_quota reported missing here: {CAPABILITIES.missing()}")
    limits = SandboxLimits(timeout_s=10.0)
    result = run(DISK_FILLER.format(files=40, chunks=8), limits)
    total, stop, _ = result.stdout_tail.split()
    assert result.passed and stop == "ENOSPC"
    assert limits.disk_bytes - (1 << 20) <= int(total) <= limits.disk_bytes


def test_the_number_of_files_is_capped():
    if not CAPABILITIES.disk_quota:
        pytest.skip(f"disk_quota reported missing here: {CAPABILITIES.missing()}")
    result = run(DISK_FILLER.format(files=1000, chunks=0), SandboxLimits(max_files=100))
    total, stop, files = result.stdout_tail.split()
    assert result.passed and stop == "ENOSPC"
    assert 90 <= int(files) < 100  # the directory itself takes an inode


@quiet
def test_without_the_tmpfs_the_same_writes_get_through(monkeypatch):
    # Control for the cap: 2 MiB against a 1 MiB cap only fails because of the tmpfs.
    _confine_with(monkeypatch, {"disk_quota": False})
    result = run(DISK_FILLER.format(files=2, chunks=1), SandboxLimits(disk_bytes=1 << 20))
    assert result.passed and result.stdout_tail.split() == [str(2 << 20), "None", "2"]


def _has_cap_sys_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 21))
    return False


@pytest.mark.skipif(not (AS_ROOT and platform.system() == "Linux" and _has_cap_sys_admin()
                         and platform.machine() in ("x86_64", "aarch64")),
                    reason="namespaces and tmpfs need CAP_SYS_ADMIN; the filter knows two arches")
def test_every_mechanism_is_present_where_the_kernel_allows_it():
    assert CAPABILITIES.separate_uid and CAPABILITIES.network_namespace
    assert CAPABILITIES.socket_filter and CAPABILITIES.disk_quota
    assert CAPABILITIES.problems == ()
    assert CAPABILITIES.landlock_abi == _landlock_abi()
    # Only Landlock depends on the kernel version beyond these.
    assert all("Landlock" in line for line in CAPABILITIES.missing())


def test_missing_mechanisms_are_named_in_a_warning(monkeypatch):
    missing = CAPABILITIES._replace(network_namespace=False, socket_filter=False,
                                    disk_quota=False, landlock_abi=0)
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: missing)
    with pytest.warns(SandboxWarning) as caught:
        assert run("print('ran')").passed
    messages = " | ".join(str(w.message) for w in caught)
    for name in ("no network namespace", "no seccomp socket filter", "no private tmpfs",
                 "no Landlock"):
        assert name in messages


def test_judged_runs_need_a_dedicated_uid_or_landlock(monkeypatch):
    # Under the grader's own uid and no Landlock, the program could open the judge's
    # /proc/<pid>/fd/1, print a passing verdict there and kill the judge.
    judge = 'import json; print(json.dumps({"passed": True, "reason": "passed"}))'
    same_user = CAPABILITIES._replace(separate_uid=False, landlock_abi=0)
    assert any("forge a verdict" in line for line in same_user.missing())
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: same_user)
    with pytest.raises(SandboxError, match="forge its verdict"):
        sandbox.run_judged("pass", judge, LIMITS)
    if CAPABILITIES.landlock_abi:
        monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: CAPABILITIES._replace(separate_uid=False))
        with pytest.warns(SandboxWarning, match="no dedicated uid"):
            assert sandbox.run_judged("pass", judge, LIMITS).passed


def test_a_mechanism_that_fails_to_apply_fails_the_run(monkeypatch):
    if not CAPABILITIES.disk_quota:
        pytest.skip(f"disk_quota reported missing here: {CAPABILITIES.missing()}")
    broken = sandbox._LAUNCHER.replace(
        "def mount_disk(size, files, uid, gid):\n",
        "def mount_disk(size, files, uid, gid):\n    raise OSError(19, 'no tmpfs today')\n")
    monkeypatch.setattr(sandbox, "_LAUNCHER", broken)
    result = run("print('ran')")
    assert not result.passed and "ran" not in result.stdout_tail
    assert result.reason.startswith("sandbox setup failed") and "no tmpfs today" in result.reason


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(not (AS_ROOT and shutil.which("setpriv") and SYSTEM_PYTHON
                         and sandbox._world_usable(SYSTEM_PYTHON)),
                    reason="needs root, setpriv and a python3 every user can run")
def test_without_root_the_namespaces_come_from_a_user_namespace():
    # The launcher as an unprivileged user (nobody): a user namespace gives it the network
    # and mount namespaces; its capabilities there end at the exec of the program.
    nobody = 65534
    workdir = tempfile.mkdtemp(prefix="jaxsample-test-nobody-")
    os.chown(workdir, nobody, nobody)
    config = {"rlimits": [], "user": None, "network_namespace": True,
              "disk": [1 << 20, 16, nobody, nobody], "hidden": [],
              "socket_filter": sandbox._seccomp_syscalls(),
              "landlock_abi": CAPABILITIES.landlock_abi, "channel": None, "error_tag": "E"}
    program = textwrap.dedent("""
        import os, socket
        status = open("/proc/self/status").read()
        print("caps", status.split("CapEff:")[1].split()[0])
        for action in (lambda: open("fill", "wb").write(bytes(2 << 20)),
                       lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)):
            try:
                action()
                print("allowed")
            except OSError as e:
                print("refused", e.errno)
    """)
    try:
        done = subprocess.run(
            ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
             SYSTEM_PYTHON, "-I", "-S", "-c", sandbox._LAUNCHER, json.dumps(config)],
            input=program.encode(), cwd=workdir, capture_output=True, timeout=60, check=False)
    finally:
        shutil.rmtree(workdir)
    if b"unshare(CLONE_NEWUSER) failed" in done.stderr:
        pytest.skip("unprivileged user namespaces are disabled on this kernel")
    assert done.returncode == 0, done.stderr.decode()
    expected = ["caps 0000000000000000", "refused 28", "refused 1"]  # ENOSPC, EPERM
    assert done.stdout.decode().split("\n")[:3] == expected


@quiet
@pytest.mark.parametrize("switched_off, reachable", [({}, False), (NOTHING, True)],
                         ids=["sandbox", "control"])
def test_system_v_shared_memory_outside_is_unreachable(monkeypatch, switched_off, reachable):
    _confine_with(monkeypatch, switched_off)
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x6A780000 + os.getpid() % 0xFFFF
    segment = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, readable by everyone
    assert segment >= 0, os.strerror(ctypes.get_errno())
    try:
        result = run(f"""
            import ctypes
            print(ctypes.CDLL(None).shmget({key}, 0, 0) >= 0)
        """)
    finally:
        libc.shmctl(segment, 0, None)  # IPC_RMID
    assert result.passed and result.stdout_tail.strip() == str(reachable)


def test_io_uring_cannot_open_sockets_past_the_filter():
    if not CAPABILITIES.socket_filter:
        pytest.skip(f"socket_filter reported missing here: {CAPABILITIES.missing()}")
    result = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        print(libc.syscall(425, 8, params), ctypes.get_errno())  # io_uring_setup
    """)
    assert result.passed and result.stdout_tail.split() == ["-1", "1"]  # EPERM
