"""The converter's options (beam_convert/options.py): options that cannot be mistyped, flagfiles,
one-line errors."""

import pytest

from tests.convert_helpers import SAMPLE_BSON, convert, convert_and_read_stderr

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


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
    from beam_convert.options import parse_args

    beam_args = ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
                 "--project=my-project", "--region", "europe-west1", "--temp_location=gs://bucket/tmp",
                 "--setup_file=./setup.py", "--save_main_session", "--experiments=use_runner_v2"]
    args, passed_on = parse_args(["--input=in.bson", "--output_dir=out", *beam_args])
    assert passed_on == beam_args
    assert (args.input, args.output_dir) == ("in.bson", "out")


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


def test_missing_input_is_one_line_error(tmp_path, capsys):
    assert convert(f"--input={tmp_path / 'nothing*.bson'}", f"--output_dir={tmp_path / 'out'}") == 2
    assert "no input file matches" in capsys.readouterr().err


def test_the_config_takes_each_option_of_its_field_name():
    from beam_convert.job import ConvertConfig
    from beam_convert.options import convert_config, parse_args

    args, _ = parse_args(["--input=in.bson", "--output_dir=out", "--val_fraction=0.3", "--max_images=2",
                          "--num_shards=5", "--skip_corrupt", "--range_size=7", "--categories=cats.csv"])
    config = convert_config(args, output_dir="/abs/out", tmp_dir="/abs/out/_tmp-1", categories=None)
    assert config == ConvertConfig(output_dir="/abs/out", tmp_dir="/abs/out/_tmp-1", max_images=2, val_fraction=0.3,
                                   num_shards=5, skip_corrupt=True, range_size=7, categories=None)
    args, _ = parse_args(["--input=in.bson", "--output_dir=out"])
    assert convert_config(args, output_dir="o", tmp_dir="t", categories=None) == ConvertConfig("o", "t")


def test_a_flagfile_is_read_where_it_stands_and_later_options_override_it(tmp_path):
    from beam_convert.options import parse_args

    (tmp_path / "beam.flags").write_text("--direct_num_workers=1\n")
    (tmp_path / "convert.flags").write_text(
        "# absl's flagfile format, as for train.py\n"
        "--val_fraction=0.5\n"
        "\n"
        "// another kind of comment\n"
        "  --range_size=10  \n"
        f"--flagfile={tmp_path / 'beam.flags'}\n")
    args, beam_args = parse_args([f"--flagfile={tmp_path / 'convert.flags'}", "--input=in.bson", "--output_dir=out"])
    assert (args.val_fraction, args.range_size, args.input) == (0.5, 10, "in.bson")
    assert beam_args == ["--direct_num_workers=1"], "a nested flagfile's Beam option goes to Beam"
    args, _ = parse_args([f"--flagfile={tmp_path / 'convert.flags'}", "--input=in.bson", "--output_dir=out",
                          "--val_fraction=0.2"])
    assert (args.val_fraction, args.range_size) == (0.2, 10)


def test_the_pipeline_gets_the_beam_options_and_the_in_process_runner_unless_one_is_named():
    from apache_beam.options.pipeline_options import DirectOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from beam_convert.run import IN_MEMORY_MAX_BYTES, make_pipeline

    pipeline, local = make_pipeline(["--direct_num_workers=2"], input_bytes=1000)
    assert local and isinstance(pipeline.runner, FnApiRunner)
    assert pipeline.options.view_as(DirectOptions).direct_num_workers == 2
    assert pipeline.options.view_as(DirectOptions).direct_running_mode == "in_memory"
    pipeline, _ = make_pipeline([], input_bytes=IN_MEMORY_MAX_BYTES + 1)  # a large input: one worker a core
    direct = pipeline.options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 0)


def test_the_input_glob_names_every_matching_file_with_its_size(tmp_path):
    from beam_convert.options import resolve_inputs

    for name, size in (("part-b.bson", 3), ("part-a.bson", 5), ("other.bson", 1)):
        (tmp_path / name).write_bytes(b"x" * size)
    assert resolve_inputs(str(tmp_path / "part-*.bson")) == [(str(tmp_path / "part-a.bson"), 5),
                                                              (str(tmp_path / "part-b.bson"), 3)]
