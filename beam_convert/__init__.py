"""Cdiscount BSON files -> sharded TFRecords of padded product image stacks (Apache Beam).

The command: __main__ (python -m beam_convert), options (its flags), run (one conversion and
what a failure leaves), terminal (what the terminal shows), stopping (SIGINT/SIGTERM), errors
(the failures the command turns into one line), output_folder (the checks and the --overwrite
swap). The graph (pipeline): index, convert, finalize, one composite transform a stage, with the
plain types they pass in job. What the stages use: bson_reader (BSON framing), products (a
document -> a product to write, and its split key), jpeg_check (the header check), categories
(category_names.csv in, labels.csv out), mix (the record order that mixes the input into every
shard), files (Beam filesystem I/O, TFRecord framing).

It never imports model/: the two halves meet at record_schema.py (tests/test_layout.py).
"""
