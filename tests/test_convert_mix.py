"""The record order of the shards (beam_convert/mix.py): pure functions on tiny inputs, then the
whole graph (pipeline.build: ConvertRange writes buckets, RunFinalize deals them) in a TestPipeline."""

import glob
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.util import assert_that, equal_to

import record_schema
from beam_convert import mix
from beam_convert.pipeline import build
from tests.convert_helpers import product, sample_jpegs, stage_config, stage_pipeline, write_bson


def _ranges(count, size, seed=0):
    """`count` ranges of `size` distinct ids, each range's ids in its written order (range_order)."""
    ids = np.random.default_rng(seed).choice(2**40, count * size, replace=False).astype(np.int64)
    range_ids = [f"00000-{n * 1000:015d}" for n in range(count)]
    lists = []
    for n in range(count):
        chunk = ids[n * size:(n + 1) * size]
        lists.append(chunk[mix.range_order(chunk, mix.bucket_count(size))])
    return range_ids, lists


def test_splitmix64_is_the_reference_mixer():
    # The first two outputs of SplitMix64 seeded with 0 (Steele, Lea, Flood 2014; Vigna's splitmix64.c).
    assert mix.splitmix64(np.array([0, 0x9E3779B97F4A7C15], np.uint64)).tolist() == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_bucket_count_gives_pieces_of_about_piece_records():
    assert mix.bucket_count(1) == 1
    assert mix.bucket_count(mix.PIECE_RECORDS) == 1
    assert mix.bucket_count(mix.PIECE_RECORDS + 1) == 2
    assert mix.bucket_count(10_000) == -(-10_000 // mix.PIECE_RECORDS)


def test_a_range_writes_its_records_by_bucket_then_key_whatever_their_input_order():
    ids = np.arange(1000, 1200, dtype=np.int64)  # ascending, like a category-sorted dump's runs
    order = mix.range_order(ids, 5)
    assert sorted(order.tolist()) == list(range(200))
    written = ids[order]
    keys = mix.mix_keys(written)
    buckets = mix.buckets_of(keys, 5)
    assert np.all(np.diff(buckets) >= 0)
    for bucket in range(5):
        assert np.all(np.diff(keys[buckets == bucket].astype(np.float64)) > 0)
    assert not np.all(np.diff(written) > 0), "the input order is gone"
    shuffled = np.random.default_rng(0).permutation(ids)
    assert shuffled[mix.range_order(shuffled, 5)].tolist() == written.tolist()


def test_the_stream_takes_every_record_once_and_each_bucket_visits_the_ranges_in_its_own_order():
    range_ids, lists = _ranges(count=6, size=80)
    buckets = mix.bucket_count(80)  # 5 buckets of ~16 records
    stream = mix.stream_pieces(range_ids, lists, buckets)
    taken = np.concatenate([lists[s][first:end] for s, first, end in stream.tolist()])
    assert sorted(taken.tolist()) == sorted(np.concatenate(lists).tolist())
    assert np.all(stream["end"] > stream["first"])
    piece_buckets = [int(mix.buckets_of(mix.mix_keys(lists[s][first:first + 1]), buckets)[0])
                     for s, first, _ in stream.tolist()]
    assert piece_buckets == sorted(piece_buckets), "bucket 0 of every range, then bucket 1, ..."
    orders = {tuple(int(s) for s, b in zip(stream["source"], piece_buckets) if b == bucket)
              for bucket in range(buckets)}
    assert len(orders) == buckets, "striping: every bucket would visit the ranges in one order"
    again = mix.stream_pieces(list(range_ids), [ids.copy() for ids in lists], buckets)
    assert again.tobytes() == stream.tobytes()


def test_the_stream_refuses_a_range_not_in_bucket_order():
    range_ids, lists = _ranges(count=1, size=80)
    with pytest.raises(ValueError, match="not in bucket order"):
        mix.stream_pieces(range_ids, [lists[0][::-1]], mix.bucket_count(80))


def test_cut_makes_even_shards_splitting_pieces_at_the_cuts():
    stream = np.array([(0, 0, 3), (1, 0, 5), (2, 4, 6)], mix.PIECE)  # 3 + 5 + 2 = 10 records
    shards = mix.cut(stream, 4)  # [0, 2) [2, 5) [5, 7) [7, 10)
    assert [shard.tolist() for shard in shards] == [
        [(0, 0, 2)], [(0, 2, 3), (1, 0, 2)], [(1, 2, 4)], [(1, 4, 5), (2, 4, 6)]]
    assert [len(shard) for shard in mix.cut(stream, 10)] == [1] * 10
    assert mix.cut(stream, 1)[0].tolist() == stream.tolist()
    with pytest.raises(ValueError):
        mix.cut(stream, 11)


def test_every_shard_crosses_the_whole_input_from_a_place_of_its_own():
    range_ids, lists = _ranges(count=12, size=160)  # 10 buckets
    stream = mix.stream_pieces(range_ids, lists, mix.bucket_count(160))
    shards = mix.cut(stream, 8)
    for shard in shards:
        assert len(set(shard["source"].tolist())) >= 10, "a shard holds records of (nearly) every range"
        assert np.mean(shard["end"] - shard["first"]) <= 2 * mix.PIECE_RECORDS
    first_ranges = [int(shard["source"][1]) for shard in shards]  # [0] may be the cut tail of a bucket
    assert len(set(first_ranges)) >= 4


def test_the_graph_deals_a_category_sorted_input_into_class_mixed_shards(tmp_path):
    """12 categories of 10 products, in category order: 6 index ranges of 20, 3 shards. Cut in input
    order, a shard would hold 4 categories."""
    jpegs = sample_jpegs()
    path = tmp_path / "sorted.bson"
    write_bson(path, [product(7919 * n % 10**6, [jpegs[n % len(jpegs)]], category_id=1000 + n // 10)
                      for n in range(120)])
    config = stage_config(tmp_path, val_fraction=0, range_size=20, num_shards=3)
    with stage_pipeline() as pipeline:
        metadata = build(pipeline, [str(path)], config)
        assert_that(metadata | "Splits" >> beam.Map(
                        lambda m: {split: {k: v for k, v in totals.items() if k != record_schema.SHARD_FILES}
                                   for split, totals in m["splits"].items()}),
                    equal_to([{"train": {"products": 120, "images": 120, "shards": 3}}]))
    spec = record_schema.feature_spec()
    for shard in sorted(glob.glob(os.path.join(config.output_dir, record_schema.shard_pattern("train")))):
        categories = [int(tf.io.parse_single_example(raw, spec)["category_id"][0])
                      for raw in tf.data.TFRecordDataset(shard)]
        assert len(categories) == 40 and len(set(categories)) >= 2 * 4, categories  # twice an input-order cut
