"""The shards (beam_convert/finalize.py, issue 20 item 1) through the command: the same bytes whatever
the workers, the line that says --num_shards was capped, and a run that fails while finalizing.
Even shards, their id lists and their mix of the input are tested on the finalize stage alone
(test_convert_finalize.py)."""

import pytest

import record_schema
from tests.convert_helpers import (
    convert_and_read_stderr, read_metadata, record_multiset, shard_counts, synthetic_bson)

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast

PRODUCTS = 800


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_bson(tmp_path_factory.mktemp("synthetic") / "train.bson", PRODUCTS, seed=1)


def _convert(capsys, synthetic, out, *extra):
    status, lines = convert_and_read_stderr(capsys, f"--input={synthetic}", f"--output_dir={out}", *extra)
    assert status == 0, lines
    return lines


def _assert_even(counts, total):
    assert sum(counts) == total
    assert min(counts) > 0, counts
    assert max(counts) - min(counts) <= 1, counts  # [k*N/S, (k+1)*N/S): never more than one apart


def test_fewer_records_than_shards_caps_the_count_and_says_so(synthetic, tmp_path, capsys):
    out = tmp_path / "out"
    lines = _convert(capsys, synthetic, out, "--num_shards=100")
    metadata = read_metadata(out)
    val = metadata["splits"]["val"]["products"]
    assert val < 100 < metadata["splits"]["train"]["products"]
    assert shard_counts(out, "val") == [1] * val
    assert len(shard_counts(out, "train")) == 100
    (line,) = [line for line in lines if "--num_shards" in line]
    assert line == f"beam_convert: --num_shards=100: val has {val} products, so {val} shards of one product"


def test_shards_are_byte_identical_whatever_the_workers_and_hold_the_same_records_whatever_the_ranges(
        synthetic, tmp_path, capsys):
    runs = {
        "ranges_of_130": ["--range_size=130"],
        "ranges_of_130_two_workers": ["--range_size=130", "--direct_running_mode=multi_processing",
                                      "--direct_num_workers=2"],
        "one_range": [],
    }
    contents = {}
    for name, extra in runs.items():
        out = tmp_path / name
        _convert(capsys, synthetic, out, "--num_shards=3", *extra)
        contents[name] = {path.name: path.read_bytes() for path in sorted(out.iterdir())
                          if path.name != record_schema.METADATA_FILE}
    first = contents["ranges_of_130"]
    assert sum(name.endswith(".tfrecord") for name in first) == 6
    assert contents["ranges_of_130_two_workers"] == first
    # Another --range_size deals the records into other buckets: the same records, in another order.
    assert contents["one_range"].keys() == first.keys() and contents["one_range"] != first
    assert record_multiset(tmp_path / "one_range") == record_multiset(tmp_path / "ranges_of_130")
    assert sum(record_multiset(tmp_path / "one_range").values()) == PRODUCTS


def test_a_run_that_fails_while_finalizing_resumes_without_converting(synthetic, tmp_path, monkeypatch, capsys):
    from beam_convert import finalize
    from beam_convert.convert import ConvertRange

    out = tmp_path / "out"
    args = (f"--input={synthetic}", f"--output_dir={out}", "--range_size=200", "--num_shards=3")

    def fails(*unused):
        raise OSError("No space left on device")

    monkeypatch.setattr(finalize, "write_metadata", fails)  # after every shard is written
    status, lines = convert_and_read_stderr(capsys, *args)
    assert status == 1
    assert "4 converted range(s) are kept" in "\n".join(lines)
    monkeypatch.undo()
    converted = []
    convert_range = ConvertRange._convert
    monkeypatch.setattr(ConvertRange, "_convert",
                        lambda self, *a: converted.append(a[0].range_id) or convert_range(self, *a))
    lines = _convert(capsys, synthetic, out, *args[2:])
    assert converted == [], "every range was finished: only finalize runs again"
    assert "resuming the unfinished run" in "\n".join(lines)
    clean = tmp_path / "clean"
    _convert(capsys, synthetic, clean, *args[2:])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "metadata.json"} == {
        p.name: p.read_bytes() for p in clean.iterdir() if p.name != "metadata.json"}
