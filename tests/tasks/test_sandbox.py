"""The sandbox against hostile programs: each must fail with a reason, never hang or leak."""

import os
import textwrap
import time
from pathlib import Path

import pytest

from jaxsample.errors import ArgumentError
from jaxsample.tasks import SandboxLimits, run_python
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
    result = run(hog)
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
    with pytest.raises(ArgumentError, match="max_processes"):
        SandboxLimits(max_processes=0)
