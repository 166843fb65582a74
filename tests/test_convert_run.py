"""A run (beam_convert/run.py): what a failure says it leaves behind, and the Dataflow runner as far
as this machine allows."""

import re

import pytest

from tests.convert_helpers import REPO, SAMPLE_BSON, convert_and_read_stderr

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


def test_a_failure_before_any_range_is_converted_claims_nothing_is_kept(tmp_path, monkeypatch, capsys):
    from beam_convert.convert import ConvertRange

    def fails(self, index_range, index):
        raise RuntimeError("worker lost")
        yield  # a generator, like the real process()

    monkeypatch.setattr(ConvertRange, "process", fails)
    status, lines = convert_and_read_stderr(capsys, f"--input={SAMPLE_BSON}", f"--output_dir={tmp_path / 'out'}")
    assert status == 1
    assert not [line for line in lines if "kept" in line or "resume" in line], lines
    assert lines[-1].startswith("beam_convert: error: RuntimeError: worker lost")


# --- Dataflow, as far as this machine allows (issue 10) -------------------------------------------

def test_the_readme_dataflow_command_builds_a_job_that_stages_the_package(tmp_path, capsys, monkeypatch):
    """The README's Dataflow command with --dry_run=True (Beam's DataflowRunner builds the job,
    pickling every DoFn, and makes the sdist of --setup_file, but submits nothing). The buckets
    cannot be reached from here, so input and output are local, and the project and bucket valid names."""
    pytest.importorskip("apitools", reason="the gcp extra (pip install -e '.[gcp]') is not installed")
    monkeypatch.chdir(SAMPLE_BSON.parent.parent)  # --setup_file=./setup.py, as the README runs it
    out = tmp_path / "out"
    status, lines = convert_and_read_stderr(
        capsys, f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--categories=data/category_names.csv",
        "--runner=DataflowRunner", "--project=my-project", "--region=europe-west1",
        "--temp_location=gs://my-bucket/tmp", "--setup_file=./setup.py", "--dry_run=True")
    assert status == 0, lines[-30:]
    last = lines[-1]
    assert last.startswith("beam_convert: dry run: the DataflowRunner job was built and not submitted")
    assert "workflow.tar.gz" in last  # the sdist that --setup_file ships to every worker
    assert list(out.iterdir()) == []  # nothing converted, no temporary folder left


def test_every_option_has_its_help_and_its_readme_row():
    """`python -m beam_convert --help` says what each option means, and README section 1's table
    has a row for each (issue 26: --output_dir, --val_fraction and --max_images had no help,
    --overwrite no row)."""
    from beam_convert import options

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(--\w+)` \|", readme, flags=re.M))
    parser = options._parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        (name,) = [o for o in action.option_strings if o.startswith("--")]
        assert action.help, f"{name} has no help"
        assert name in rows, f"{name} has no row in README section 1's table"
