"""`experiments/run_directory.py`: new folders, clean-up of failed runs, repeated units."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
from run_directory import RunDirectory  # noqa: E402

from jaxsample.errors import ArgumentError  # noqa: E402


def test_default_name_held_by_another_run_is_numbered(tmp_path):
    # two runs started in the same second share runs/COMMAND-TIMESTAMP: each gets its own folder,
    # even when the other has only just made it (still empty)
    base = tmp_path / "runs" / "power-20260101-000000"
    first = RunDirectory(base, {"alpha": 1.0}, resume=False, numbered=True)
    (tmp_path / "runs" / "power-20260101-000000-2").mkdir()
    second = RunDirectory(base, {"alpha": 2.0}, resume=False, numbered=True)
    assert first.path == base and second.path == base.with_name(base.name + "-3")
    assert "alpha: 1.0" in (base / "config.yaml").read_text()
    assert "alpha: 2.0" in (second.path / "config.yaml").read_text()
    # a name the user chose is never renamed
    with pytest.raises(ArgumentError, match="already holds a run"):
        RunDirectory(base, {}, resume=False)


def _write_caches(run_dir):
    run_dir.write_bytes("model.msgpack", b"weights")
    (run_dir.path / "twists").mkdir()
    (run_dir.path / "twists" / "0.npz").write_bytes(b"twist")
    run_dir.log.info("started")


@pytest.mark.parametrize("case", ["created", "created-with-parents", "empty-folder-given", "with-result", "resumed"])
def test_failed_new_run_leaves_nothing_behind(case, tmp_path):
    out = tmp_path / "a" / "b" / "run" if case == "created-with-parents" else tmp_path / "run"
    if case in ("empty-folder-given", "resumed"):
        out.mkdir()
    if case == "resumed":
        RunDirectory(out, {}, resume=False).log.info("first start")
    run_dir = RunDirectory(out, {}, resume=case == "resumed")
    _write_caches(run_dir)
    if case == "with-result":
        run_dir.append({"key": "unit"})
    run_dir.remove_if_no_results()
    if case in ("created", "created-with-parents"):
        assert list(tmp_path.iterdir()) == []  # caches, the folder and the parents it made
    elif case == "empty-folder-given":
        assert out.is_dir() and list(out.iterdir()) == []  # the folder was there before
    else:  # a result, or a resumed run's data: kept
        assert {"config.yaml", "model.msgpack", "twists", "log.txt"} <= {p.name for p in out.iterdir()}


def test_repeated_unit_is_argument_error_naming_the_key(tmp_path):
    run_dir = RunDirectory(tmp_path / "run", {}, resume=False)
    run_dir.append({"key": "K1-0/exact"})
    with pytest.raises(ArgumentError, match="unit 'K1-0/exact' is repeated"):
        run_dir.append({"key": "K1-0/exact"})
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 1
