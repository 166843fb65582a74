"""The conversion stage (beam_convert/convert.py): a re-run takes up the ranges that an interrupted
job finished."""

from tests.convert_helpers import SAMPLE_BSON, convert, read_metadata, record_multiset


def test_an_interrupted_job_resumes_without_redoing_finished_ranges(tmp_path, monkeypatch, capsys):
    from beam_convert.convert import ConvertRange

    out = tmp_path / "out"
    args = (f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--range_size=10")
    original = ConvertRange.process
    calls = []

    def fails_on_the_fourth_range(self, index_range, index):
        calls.append(index_range.range_id)
        if len(calls) == 4:
            raise RuntimeError("worker lost")
        yield from original(self, index_range, index)

    monkeypatch.setattr(ConvertRange, "process", fails_on_the_fourth_range)
    assert convert(*args) == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "metadata.json").exists()
    monkeypatch.setattr(ConvertRange, "process", original)
    converted = []
    convert_range = ConvertRange._convert

    def spy(self, index_range, index):
        converted.append(index_range.range_id)
        return convert_range(self, index_range, index)

    monkeypatch.setattr(ConvertRange, "_convert", spy)
    assert convert(*args) == 0
    assert "resuming the unfinished run" in capsys.readouterr().err
    assert len(converted) == 9 - 3 and not set(converted) & set(calls[:3])
    clean = tmp_path / "clean"
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={clean}", "--range_size=10") == 0
    assert record_multiset(out) == record_multiset(clean)
    assert read_metadata(out)["images_per_product"] == read_metadata(clean)["images_per_product"]
    assert read_metadata(out)["rejected"] == {}


def test_ranges_an_earlier_version_wrote_in_input_order_are_converted_again(tmp_path, monkeypatch, capsys):
    import glob
    import json

    from beam_convert import finalize
    from beam_convert.convert import ConvertRange

    out = tmp_path / "out"
    args = (f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--range_size=10", "--num_shards=3")

    def fails(*unused):
        raise OSError("No space left on device")

    monkeypatch.setattr(finalize, "write_metadata", fails)  # every range converted, then a failure
    assert convert(*args) == 1
    monkeypatch.undo()
    markers = sorted(glob.glob(str(out / "_tmp-*" / "progress" / "range-*.json")))
    assert len(markers) == 9
    for marker in markers[:4]:  # as a version that wrote records in input order left them
        with open(marker) as f:
            data = json.load(f)
        del data["result"]["buckets"]
        with open(marker, "w") as f:
            json.dump(data, f)
    converted = []
    convert_range = ConvertRange._convert
    monkeypatch.setattr(ConvertRange, "_convert",
                        lambda self, *a: converted.append(a[0].range_id) or convert_range(self, *a))
    capsys.readouterr()
    assert convert(*args) == 0
    assert "resuming the unfinished run" in capsys.readouterr().err
    assert len(converted) == 4
    clean = tmp_path / "clean"
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={clean}", *args[2:]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "metadata.json"} == {
        p.name: p.read_bytes() for p in clean.iterdir() if p.name != "metadata.json"}
