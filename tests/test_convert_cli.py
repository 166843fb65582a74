"""The converter's command line: options that cannot be mistyped, one-line errors, a quiet terminal."""

import pytest

from tests.convert_helpers import (
    SAMPLE_BSON, convert, convert_and_read_stderr, read_metadata, run_command, write_bson)


def _only_converter_lines(lines):
    return [line for line in lines if not line.startswith("beam_convert: ")]


# --- options that cannot be mistyped (issue 10, item 3) ------------------------------------------

@pytest.mark.parametrize("typo, meant", [
    ("--val_fracton=0.5", "--val_fraction"),
    ("--runnr=DataflowRunner", "--runner"),
    ("--direct_num_worker=2", "--direct_num_workers"),  # a Beam option misspelt
    ("--val=0.5", "--val_fraction"),  # a prefix is not taken for the option
])
def test_a_misspelt_option_exits_2_naming_it_and_the_nearest_known_one(tmp_path, capsys, typo, meant):
    out = tmp_path / "out"
    status, lines = convert_and_read_stderr(capsys, f"--input={SAMPLE_BSON}", f"--output_dir={out}", typo)
    assert status == 2
    assert lines == [f"beam_convert: error: unknown option {typo.split('=')[0]} (did you mean {meant}?)"]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--output_dir=OUT"], "the following arguments are required: --input"),
    (["--input=IN", "--output_dir=OUT", "--val_fraction=half"], "argument --val_fraction: invalid float value"),
    (["--input=IN", "--output_dir=OUT", "--val_fraction=1.5"], "--val_fraction must be in [0, 1)"),
    (["--input=IN", "--output_dir=OUT", "--direct_running_mode=fast"], "argument --direct_running_mode: invalid"),
    (["--input=IN", "--output_dir=OUT", "stray"], "unexpected argument 'stray'"),
])
def test_argument_errors_are_one_line_with_status_2(capsys, args, message):
    status, lines = convert_and_read_stderr(capsys, *args)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"beam_convert: error: {message}"), lines


def test_real_beam_options_are_passed_to_beam_unchanged():
    from beam_convert.__main__ import parse_args

    beam_args = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
                 "--project=my-project", "--region", "europe-west1", "--temp_location=gs://bucket/tmp",
                 "--setup_file=./setup.py", "--save_main_session", "--experiments=use_runner_v2"]
    args, passed_on = parse_args(["--input=in.bson", "--output_dir=out", *beam_args])
    assert passed_on == beam_args
    assert (args.input, args.output_dir) == ("in.bson", "out")


def test_a_real_beam_option_still_runs(tmp_path):
    out = tmp_path / "out"
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--direct_num_workers=2") == 0
    assert read_metadata(out)["documents"] == 82


def test_a_flagfile_sets_options_and_the_command_line_overrides_it(tmp_path):
    (tmp_path / "beam.flags").write_text("--direct_num_workers=1\n")
    (tmp_path / "convert.flags").write_text(
        "# absl's flagfile format, as for train.py\n"
        "--val_fraction=0.5\n"
        "\n"
        "// another kind of comment\n"
        "  --range_size=10  \n"
        f"--flagfile={tmp_path / 'beam.flags'}\n")
    from_file = tmp_path / "from_file"
    assert convert(f"--flagfile={tmp_path / 'convert.flags'}", f"--input={SAMPLE_BSON}",
                   f"--output_dir={from_file}") == 0
    metadata = read_metadata(from_file)
    assert metadata["val_fraction"] == 0.5
    assert sum(split["shards"] for split in metadata["splits"].values()) > 2, "--range_size=10: several shards"
    overridden = tmp_path / "overridden"
    assert convert(f"--flagfile={tmp_path / 'convert.flags'}", f"--input={SAMPLE_BSON}",
                   f"--output_dir={overridden}", "--val_fraction=0.2") == 0
    assert read_metadata(overridden)["val_fraction"] == 0.2


def test_a_misspelt_option_in_a_flagfile_is_refused_too(tmp_path, capsys):
    (tmp_path / "convert.flags").write_text("--max_image=2\n")
    status, lines = convert_and_read_stderr(capsys, f"--flagfile={tmp_path / 'convert.flags'}",
                                            f"--input={SAMPLE_BSON}", f"--output_dir={tmp_path / 'out'}")
    assert status == 2
    assert lines == ["beam_convert: error: unknown option --max_image (did you mean --max_images?)"]


def test_an_unreadable_flagfile_is_one_line(tmp_path, capsys):
    status, lines = convert_and_read_stderr(capsys, f"--flagfile={tmp_path / 'missing.flags'}",
                                            f"--input={SAMPLE_BSON}", f"--output_dir={tmp_path / 'out'}")
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"beam_convert: error: {tmp_path / 'missing.flags'}: cannot read")


# --- the read-only output message says what is true (issue 9, item 5) ----------------------------

def test_an_output_dir_that_cannot_be_created_fails_in_one_line_naming_it(tmp_path, capsys):
    # Works as root too: no permission bit stops root, but a regular file cannot hold a folder.
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "out"
    status, lines = convert_and_read_stderr(capsys, f"--input={SAMPLE_BSON}", f"--output_dir={out}")
    assert status == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"beam_convert: error: {out}: cannot write the output folder: Not a directory")


def _permission_bits_bind_this_process(folder) -> bool:
    """False for root with CAP_DAC_OVERRIDE (the usual root), which writes into read-only folders."""
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return True
    (folder / "probe").rmdir()
    return False


def test_an_output_dir_in_a_read_only_folder_fails_in_one_line_naming_it(tmp_path, capsys):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if not _permission_bits_bind_this_process(parent):
            pytest.skip("this process writes into read-only folders anyway (root); the test above covers "
                        "an output folder that cannot be created")
        status, lines = convert_and_read_stderr(capsys, f"--input={SAMPLE_BSON}", f"--output_dir={parent / 'out'}")
    finally:
        parent.chmod(0o755)
    assert status == 1
    assert lines == [f"beam_convert: error: {parent / 'out'}: cannot write the output folder: "
                     f"Permission denied: {parent / 'out'}"]


def test_a_failure_before_any_range_is_converted_claims_nothing_is_kept(tmp_path, monkeypatch, capsys):
    from beam_convert import pipeline

    def fails(self, index_range, index):
        raise RuntimeError("worker lost")
        yield  # a generator, like the real process()

    monkeypatch.setattr(pipeline.ConvertRange, "process", fails)
    status, lines = convert_and_read_stderr(capsys, f"--input={SAMPLE_BSON}", f"--output_dir={tmp_path / 'out'}")
    assert status == 1
    assert not [line for line in lines if "kept" in line or "resume" in line], lines
    assert lines[-1].startswith("beam_convert: error: RuntimeError: worker lost")


# --- quiet by default (issue 10, item 5) ----------------------------------------------------------

MULTI_PROCESS = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")


def test_a_multi_process_run_prints_only_its_own_lines(tmp_path):
    out = tmp_path / "out"
    result = run_command(f"--input={SAMPLE_BSON}", f"--output_dir={out}", *MULTI_PROCESS)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not _only_converter_lines(lines), "Beam's worker lines reached the terminal"
    assert lines[-1].startswith("beam_convert: done in ")
    assert result.stdout == ""
    assert read_metadata(out)["documents"] == 82
    assert not list(out.glob("_tmp-*")), "the run's log goes with its temporary folder"


def test_verbose_shows_what_the_workers_log(tmp_path):
    result = run_command(f"--input={SAMPLE_BSON}", f"--output_dir={tmp_path / 'out'}", *MULTI_PROCESS, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "sdk_worker" in result.stderr  # the worker processes' own INFO lines


def test_a_worker_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path):
    from tests.convert_helpers import sample_documents

    import bson

    documents = [bson.encode(document) for document in sample_documents()[:5]]
    documents[-1] = documents[-1][: len(documents[-1]) // 2]  # a truncated last document
    offsets = write_bson(tmp_path / "truncated.bson", documents)
    result = run_command(f"--input={tmp_path / 'truncated.bson'}", f"--output_dir={tmp_path / 'out'}", *MULTI_PROCESS)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert not _only_converter_lines(lines), "a traceback or Beam's log reached the terminal"
    assert lines[-1].startswith(f"beam_convert: error: {tmp_path / 'truncated.bson'}: corrupt BSON document at "
                                f"byte offset {offsets[-1]}")


def test_nothing_converted_is_read_from_a_worker_process_traceback():
    from beam_convert.__main__ import one_line

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


# --- Dataflow, as far as this machine allows (issue 10) -------------------------------------------

def test_the_readme_dataflow_command_builds_a_job_that_stages_the_package(tmp_path):
    """The README's Dataflow command with --dry_run=True (Beam's DataflowRunner builds the job,
    pickling every DoFn, and makes the sdist of --setup_file, but submits nothing). The buckets
    cannot be reached from here, so input and output are local, and the project and bucket valid names."""
    pytest.importorskip("apitools", reason="the gcp extra (pip install -e '.[gcp]') is not installed")
    out = tmp_path / "out"
    result = run_command(
        f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--categories=data/category_names.csv",
        "--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
        "--temp_location=gs://my-bucket/tmp", "--setup_file=./setup.py", "--dry_run=True")
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("beam_convert: dry run: the DataflowRunner job was built and not submitted")
    assert "workflow.tar.gz" in last  # the sdist that --setup_file ships to every worker
    assert list(out.iterdir()) == []  # nothing converted, no temporary folder left
