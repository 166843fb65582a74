"""Cdiscount BSON files -> sharded TFRecords of padded product image stacks (Apache Beam)."""
