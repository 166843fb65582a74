"""Made-up Cdiscount-like data for the demo, tests and benchmarks.

Kept out of the `beam_convert` and `model` packages on purpose: setup.py does not list it, so the
sdist that Dataflow workers install does not carry it. Import it from the repository root.
"""
