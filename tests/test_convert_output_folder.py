"""The output folder (beam_convert/output_folder.py): a folder that cannot be written, one that
holds other files, and the --overwrite swap."""

import shutil

import pytest

from tests.convert_helpers import CATEGORIES_CSV, SAMPLE_BSON, convert, convert_and_read_stderr, read_metadata

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


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


def test_refuses_a_non_empty_output_dir_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out) in error and "--overwrite" in error
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--overwrite") == 0
    assert read_metadata(out)["documents"] == 82
    # A second overwrite replaces, never duplicates, the shards.
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--overwrite", "--num_shards=2") == 0
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000-of-00002.tfrecord",
                                                           "train-00001-of-00002.tfrecord"]
    assert not list(out.glob("_tmp-*"))


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def earlier_conversion(sample_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sample_output, out)
    return out, _files(out)


def test_an_overwrite_that_fails_while_finalizing_puts_the_earlier_conversion_back(
        earlier_conversion, monkeypatch, capsys):
    from beam_convert import finalize

    out, before = earlier_conversion

    def disk_full(sources, destination):
        raise OSError("No space left on device")

    monkeypatch.setattr(finalize, "write_digest_table", disk_full)  # a finalize task, after the shards moved
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}", f"--categories={CATEGORIES_CSV}",
                   "--overwrite", "--range_size=10") == 1
    assert _files(out) == before
    assert "back in place" in capsys.readouterr().err


def test_an_overwrite_killed_while_finalizing_is_put_back_by_the_next_run(earlier_conversion, monkeypatch, capsys):
    from beam_convert import finalize, run

    out, before = earlier_conversion
    args = (f"--input={SAMPLE_BSON}", f"--output_dir={out}", f"--categories={CATEGORIES_CSV}")

    def fails(task_outputs, *args):
        raise RuntimeError("killed")

    # A killed process cleans nothing up: the failure is not followed by a restore.
    monkeypatch.setattr(finalize, "write_metadata", fails)
    monkeypatch.setattr(run, "restore_previous_output", lambda output_dir, tmp_dir: False)
    assert convert(*args, "--overwrite", "--range_size=10") == 1
    assert not (out / "metadata.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert convert(*args) == 2, "the earlier conversion is back, so the folder is not empty"
    assert "put back the earlier conversion" in capsys.readouterr().err
    assert _files(out) == before
