"""What the terminal shows (beam_convert/terminal.py): only the converter's own lines, one-line
errors, progress. The runs are in this process with its file descriptors captured (capfd): the
worker processes write to the descriptor 2 they inherit, as under a real terminal. Only --verbose
runs in a process of its own (its test says why)."""

import time

import pytest

from tests.convert_helpers import SAMPLE_BSON, convert, read_metadata, run_command, write_bson

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


def _only_converter_lines(lines):
    return [line for line in lines if not line.startswith("beam_convert: ")]


# --- quiet by default (issue 10, item 5) ----------------------------------------------------------

MULTI_PROCESS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def _run_capturing_descriptors(capfd, *args):
    """Exit status, stdout and stderr (what reached descriptors 1 and 2, workers' included)."""
    capfd.readouterr()
    status = convert(*args)
    captured = capfd.readouterr()
    return status, captured.out, captured.err


def test_a_multi_process_run_prints_only_its_own_lines(tmp_path, capfd):
    out = tmp_path / "out"
    status, stdout, stderr = _run_capturing_descriptors(capfd, f"--input={SAMPLE_BSON}", f"--output_dir={out}",
                                                        *MULTI_PROCESS)
    assert status == 0, stderr
    lines = stderr.splitlines()
    assert not _only_converter_lines(lines), "Beam's worker lines reached the terminal"
    assert lines[-1].startswith("beam_convert: done in ")
    assert stdout == ""
    assert read_metadata(out)["documents"] == 82
    assert not list(out.glob("_tmp-*")), "the run's log goes with its temporary folder"


def test_verbose_shows_what_the_workers_log(tmp_path):
    """In its own process: --verbose gives Beam's logging a handler on descriptor 2 (logging.basicConfig),
    which in pytest's process its own log capture takes instead."""
    result = run_command(f"--input={SAMPLE_BSON}", f"--output_dir={tmp_path / 'out'}", *MULTI_PROCESS, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "sdk_worker" in result.stderr  # the worker processes' own INFO lines


def test_a_worker_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, capfd):
    from tests.convert_helpers import sample_documents

    import bson

    documents = [bson.encode(document) for document in sample_documents()[:5]]
    documents[-1] = documents[-1][: len(documents[-1]) // 2]  # a truncated last document
    offsets = write_bson(tmp_path / "truncated.bson", documents)
    status, _, stderr = _run_capturing_descriptors(capfd, f"--input={tmp_path / 'truncated.bson'}",
                                                   f"--output_dir={tmp_path / 'out'}", *MULTI_PROCESS)
    assert status == 1
    lines = stderr.splitlines()
    assert not _only_converter_lines(lines), "a traceback or Beam's log reached the terminal"
    assert lines[-1].startswith(f"beam_convert: error: {tmp_path / 'truncated.bson'}: corrupt BSON document at "
                                f"byte offset {offsets[-1]}")


def test_nothing_converted_is_read_from_a_worker_process_traceback():
    from beam_convert.terminal import one_line

    # What the FnApiRunner raises when the error happened in a worker process: the worker's traceback.
    worker_traceback = RuntimeError(
        "Traceback (most recent call last):\n"
        '  File "/work/main/beam_convert/pipeline.py", line 460, in require_products\n'
        '    raise NothingConverted(f"{source}: 0 products: every one of ...")\n'
        "beam_convert.pipeline.NothingConverted: /data/my file.bson: 0 products: every one of 3 documents was "
        "rejected (not_jpeg 3), see /out/_tmp-1/rejected-00000-of-00001.jsonl [while running 'RequireProducts']\n")
    assert one_line(worker_traceback) == (
        "/data/my file.bson: 0 products: every one of 3 documents was rejected (not_jpeg 3), "
        "see /out/_tmp-1/rejected-00000-of-00001.jsonl")


def test_progress_reports_products_done_and_rate(tmp_path, monkeypatch, capsys):
    from beam_convert import terminal

    progress_dir = tmp_path / "progress"
    progress_dir.mkdir()
    (progress_dir / "index-00000.json").write_text('{"documents": 1000}')
    (progress_dir / "range-00000-000000000000000.json").write_text('{"documents": 250, "products": 249}')
    monkeypatch.setattr(terminal, "PROGRESS_SECONDS", 0.05)
    progress = terminal.Progress(str(tmp_path))
    progress.start()
    time.sleep(0.3)
    progress.stop.set()
    progress.join()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "250 products of 1,000 (25%)" in line and "products/s" in line


def test_an_os_error_is_its_path_and_reason_even_from_a_worker_process():
    from beam_convert.terminal import one_line

    path = "/out/_tmp-1/records/train/00000-000000000000000.tfrecord"
    worker_traceback = RuntimeError(
        "Traceback (most recent call last):\n  ...\n"
        f"OSError: [Errno 28] No space left on device: '{path}' [while running 'ConvertRanges/ConvertRange']\n")
    assert one_line(worker_traceback) == f"{path}: No space left on device"
    assert one_line(OSError(13, "Permission denied", "/out/x")) == "/out/x: Permission denied"
