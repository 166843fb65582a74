"""How the converter stops (issue 20, items 3 and 4): a full disk, SIGINT and SIGTERM. Each ends in
one line saying what happened and what is kept, never a traceback or a logging error.

A real process where only one shows it: worker processes on a full disk (the hang this guards
against would hang pytest), and a signal sent to the command and its workers. What follows in the
same folder (the in-process runner on a full disk, the resumed run) runs in this process."""

import glob
import os
import re
import shutil
import signal
import subprocess
import time
import uuid

import pytest

from tests.convert_helpers import (
    convert, finish_command, kill_group, run_command, shard_counts, start_command, synthetic_bson)

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


def _only_converter_lines(lines):
    return [line for line in lines if not line.startswith("beam_convert: ")]


@pytest.fixture(scope="module")
def synthetic_800(tmp_path_factory):
    """800 products, 8.5 MB."""
    return synthetic_bson(tmp_path_factory.mktemp("synthetic") / "train.bson", 800, seed=1)


# --- a full disk (item 3) ---------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs():
    """A 2 MB tmpfs, mounted for the test and unmounted after it (root only)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = f"/tmp/beam-convert-full-{uuid.uuid4().hex[:8]}"
    os.makedirs(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", folder], capture_output=True, text=True)
    if mounted.returncode:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", folder], capture_output=True).returncode:
            subprocess.run(["umount", "--lazy", folder], check=True)  # still busy: detached now, freed when idle
        os.rmdir(folder)


MULTI_PROCESS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def _convert_in_this_process(capfd, *args):
    """Exit status and stderr of a run in this process (descriptor 2 captured, as a terminal's)."""
    capfd.readouterr()
    status = convert(*args)
    return subprocess.CompletedProcess(args, status, "", capfd.readouterr().err)


@pytest.mark.parametrize("workers", [(), MULTI_PROCESS], ids=["in_process", "worker_processes"])
def test_a_full_disk_is_one_line_naming_the_path(synthetic_800, small_tmpfs, workers, capfd):
    """The worker processes' stderr went to _tmp-KEY/beam.log on the full disk: Beam's worker prints
    a failed bundle's traceback there before answering, and that print failing hung the run."""
    out = os.path.join(small_tmpfs, "out")
    args = (f"--input={synthetic_800}", f"--output_dir={out}", *workers)
    result = run_command(*args, timeout=120) if workers else _convert_in_this_process(capfd, *args)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert not _only_converter_lines(lines), result.stderr[:3000]
    assert len(lines) == 2, lines  # the run's first line, then the error
    error = lines[-1]
    assert error.startswith(f"beam_convert: error: {out}/_tmp-") and error.endswith(": No space left on device"), error


# --- SIGINT and SIGTERM (item 4) ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_6000(tmp_path_factory):
    """6,000 products, 63 MB: in ranges of 200, 30 ranges and a few seconds of converting."""
    return synthetic_bson(tmp_path_factory.mktemp("synthetic") / "train.bson", 6000, seed=2)


def _range_markers(out):
    return glob.glob(os.path.join(out, "_tmp-*", "progress", "range-*.json"))


def _stop_after_some_ranges(process, out, signum, group):
    """Sends signum once the run has finished a few ranges (it keeps converting meanwhile): to the
    converter's process, or to its whole process group, its workers too, as Ctrl-C in a terminal."""
    deadline = time.monotonic() + 120
    while len(_range_markers(out)) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no range finished in 120 s"
        time.sleep(0.02)
    if group:
        os.killpg(process.pid, signum)  # the group start_command made: this run and its workers
    else:
        os.kill(process.pid, signum)


def _workers_of(pid) -> list[int]:
    """Processes whose parent chain reaches pid (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


# Each signal in each runner mode once (a Ctrl-C in a terminal reaches the whole group): three
# runs, not the six of every pair, for the suite's time.
@pytest.mark.parametrize("signum, status, workers, group", [
    (signal.SIGINT, 130, (), False),
    (signal.SIGTERM, 143, MULTI_PROCESS, False),
    (signal.SIGINT, 130, MULTI_PROCESS, True),
], ids=["SIGINT-in_process", "SIGTERM-worker_processes", "SIGINT-worker_processes_and_their_group"])
def test_a_signal_stops_the_run_in_one_line_and_the_same_command_resumes(synthetic_6000, tmp_path, workers, group,
                                                                          signum, status, capfd):
    out = str(tmp_path / "out")
    args = (f"--input={synthetic_6000}", f"--output_dir={out}", "--range_size=200", "--num_shards=4", *workers)
    process = start_command(*args)
    try:
        _stop_after_some_ranges(process, out, signum, group)
        result = finish_command(process, timeout=60)
    finally:
        if process.poll() is None:
            kill_group(process)
    assert result.returncode == status, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert not _only_converter_lines(lines), result.stderr[-3000:]
    (tmp_dir,) = glob.glob(os.path.join(out, "_tmp-*"))
    kept = len(_range_markers(out))
    assert 3 <= kept < 30
    # The line counts the ranges finished when it is printed; a range in flight (in this process,
    # or in a worker process still finishing its write) may finish after it (seen in CI under
    # load, in both modes): one more is kept than said, never fewer.
    said = int(re.search(r": (\d+) converted range", lines[-1])[1])
    assert said in (kept, kept - 1), (said, kept)
    assert lines[-1] == (f"beam_convert: stopped by {signal.Signals(signum).name}: {said} converted range(s) are kept "
                         f"in {tmp_dir}; run the same command to resume")
    assert lines[:-1] == [lines[0]] and "input file(s)" in lines[0], lines  # nothing between start and stop
    time.sleep(0.5)
    assert not _workers_of(process.pid), "worker processes outlived the run"
    assert not os.path.exists(os.path.join(out, "metadata.json"))

    resumed = _convert_in_this_process(capfd, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"beam_convert: resuming the unfinished run in {tmp_dir}: {kept} range(s) already converted" in (
        resumed.stderr.splitlines())
    assert sum(shard_counts(out, "train")) + sum(shard_counts(out, "val")) == 6000
