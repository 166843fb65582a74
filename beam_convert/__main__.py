"""python -m beam_convert --input=PATH_OR_GLOB --output_dir=DIR [options] [Beam pipeline options]

Converts Cdiscount BSON files into sharded TFRecords (docs/FORMATS.md section 1). Any option this
parser does not know is handed to Beam, so `--runner=DataflowRunner --project=... --region=...
--temp_location=gs://... --setup_file=./setup.py` works unchanged.
"""

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, if anything loads it
# Beam warns at import that the optional GCP client libraries are missing: noise for local runs.
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import record_schema
from beam_convert import files, labels
from beam_convert.pipeline import INDEX_MARKER, RANGE_MARKER, ConvertConfig, build, progress_marker

# Below this much input (~50,000 products) the in-process runner wins: worker processes cost
# several seconds to start. Above it one worker per core wins: 1.2x the in-process rate on
# 100,000 products (1 GB), more as the start-up is amortised (BUILD_NOTES.md, conversion benchmark).
IN_MEMORY_MAX_BYTES = 512 * 1024**2
PROGRESS_SECONDS = 10.0
TMP_PREFIX = "_tmp-"  # output_dir/_tmp-JOB: a job's temporary files, kept to resume it


class UsageError(Exception):
    pass


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m beam_convert", description=__doc__.split("\n\n")[1])
    parser.add_argument("--input", required=True, help="BSON file, or a glob of them (local, gs://, ...)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--categories", help="category_names.csv: the class table (all its rows)")
    parser.add_argument("--val_fraction", type=float, default=ConvertConfig.val_fraction)
    parser.add_argument("--max_images", type=int, default=ConvertConfig.max_images)
    parser.add_argument("--num_shards", type=int, default=ConvertConfig.num_shards,
                        help="shards per split (default: one per index range)")
    parser.add_argument("--range_size", type=int, default=ConvertConfig.range_size,
                        help="products per index range: the unit of parallel work")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in output_dir")
    parser.add_argument("--skip_corrupt", action="store_true",
                        help="report corrupt BSON documents in rejected-*.jsonl instead of stopping")
    args, beam_args = parser.parse_known_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_images < 1:
        parser.error(f"--max_images must be at least 1, got {args.max_images}")
    if args.num_shards is not None and args.num_shards < 1:
        parser.error(f"--num_shards must be at least 1, got {args.num_shards}")
    if args.range_size < 1:
        parser.error(f"--range_size must be at least 1, got {args.range_size}")
    return args, beam_args


def _local_path(path: str) -> str:
    return path if files.FileSystems.get_scheme(path) else os.path.abspath(path)


def resolve_inputs(pattern: str) -> list[tuple[str, int]]:
    matches = files.glob_with_sizes(_local_path(pattern))
    if not matches:
        raise UsageError(f"{pattern}: no input file matches")
    return matches


def check_output_dir(output_dir: str, overwrite: bool, tmp_dir: str) -> bool:
    """Refuses to mix with other output; returns whether an interrupted run of this job is there."""
    existing = files.list_dir(output_dir)
    resumable = tmp_dir in existing
    stale = [p for p in existing if os.path.basename(p).startswith(TMP_PREFIX) and p != tmp_dir]
    others = [p for p in existing if p not in stale and p != tmp_dir]
    if others and not overwrite:
        raise UsageError(f"{output_dir}: not empty ({len(others)} entries); pass --overwrite to replace its conversion")
    for path in stale:  # temporary files of a failed run with other inputs or options
        files.delete_tree(path)
    return resumable


def job_key(inputs: list[tuple[str, int]], args: argparse.Namespace, categories) -> str:
    """Names the temporary folder, so that re-running the same command resumes the same job."""
    identity = json.dumps([inputs, args.max_images, args.val_fraction, args.range_size, args.skip_corrupt,
                           [c.category_id for c in categories or ()]])
    return hashlib.blake2b(identity.encode(), digest_size=6).hexdigest()


def make_pipeline(beam_args: list[str], input_bytes: int) -> tuple[beam.Pipeline, bool]:
    """The user's runner if one is named, else the FnApiRunner (never the Prism download)."""
    options = PipelineOptions(beam_args)
    if any(arg.startswith("--runner") for arg in beam_args):
        return beam.Pipeline(options=options), options.view_as(StandardOptions).runner in ("DirectRunner", None)
    direct = options.view_as(DirectOptions)
    if not any(arg.startswith("--direct_running_mode") for arg in beam_args):
        if input_bytes > IN_MEMORY_MAX_BYTES:
            direct.direct_running_mode = "multi_processing"
            direct.direct_num_workers = direct.direct_num_workers if direct.direct_num_workers != 1 else 0
    return beam.Pipeline(runner=FnApiRunner(), options=options), True


class Progress(threading.Thread):
    """Prints products done and products/s from the marker files that workers leave in tmp_dir."""

    def __init__(self, tmp_dir: str):
        super().__init__(daemon=True)
        self.tmp_dir = tmp_dir
        self.stop = threading.Event()
        self.started = time.monotonic()

    def _read(self, kind: str) -> list[dict]:
        found = []
        for path in files.glob(progress_marker(self.tmp_dir, kind)):
            try:
                found.append(json.loads(files.read_bytes(path)))
            except (OSError, ValueError):
                pass  # being written
        return found

    def run(self) -> None:
        while not self.stop.wait(PROGRESS_SECONDS):
            total = sum(entry["documents"] for entry in self._read(INDEX_MARKER))
            done = sum(entry["documents"] for entry in self._read(RANGE_MARKER))
            elapsed = time.monotonic() - self.started
            share = f" of {total:,} ({100 * done / total:.0f}%)" if total else " (indexing)"
            print(f"beam_convert: {done:,} products{share}, {done / elapsed:,.0f} products/s, "
                  f"{elapsed:.0f} s", file=sys.stderr, flush=True)


_CORRUPT = re.compile(r"(\S+: corrupt BSON document at byte offset \d+: [^\n]+?)\s*(?:'|\"|\[|\n|$)")


def corrupt_bson_message(error: BaseException) -> Optional[str]:
    """The CorruptBsonError message inside an exception that Beam may have wrapped several times."""
    match = _CORRUPT.search(str(error))
    return match.group(1) if match else None


def one_line(error: BaseException) -> str:
    """The message a user needs from an exception."""
    corrupt = corrupt_bson_message(error)
    if corrupt:
        return corrupt
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:1000]


def convert(argv: list[str]) -> dict:
    args, beam_args = parse_args(argv)
    inputs = resolve_inputs(args.input)
    output_dir = _local_path(args.output_dir)
    categories = None
    if args.categories:
        path = _local_path(args.categories)
        try:
            text = files.read_bytes(path).decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"{args.categories}: cannot read: {error}") from None
        try:
            categories = tuple(labels.read_categories(text, args.categories))
        except ValueError as error:
            raise UsageError(str(error)) from None
    tmp_dir = files.join(output_dir, f"{TMP_PREFIX}{job_key(inputs, args, categories)}")
    if check_output_dir(output_dir, args.overwrite, tmp_dir):
        done = len(files.glob(progress_marker(tmp_dir, RANGE_MARKER)))
        print(f"beam_convert: resuming the interrupted run in {tmp_dir}: {done} range(s) already converted",
              file=sys.stderr, flush=True)
    config = ConvertConfig(
        output_dir=output_dir,
        tmp_dir=tmp_dir,
        max_images=args.max_images,
        val_fraction=args.val_fraction,
        num_shards=args.num_shards,
        skip_corrupt=args.skip_corrupt,
        range_size=args.range_size,
        categories=categories,
    )
    input_bytes = sum(size for _, size in inputs)
    pipeline, local = make_pipeline(beam_args, input_bytes)
    print(f"beam_convert: {len(inputs)} input file(s), {input_bytes / 1e6:,.1f} MB -> {output_dir}",
          file=sys.stderr, flush=True)
    build(pipeline, [path for path, _ in inputs], config)
    progress = Progress(tmp_dir) if local else None
    started = time.monotonic()
    try:
        if progress:
            progress.start()
        pipeline.run().wait_until_finish()
    except BaseException as error:
        if corrupt_bson_message(error):  # the same command would fail the same way
            files.delete_tree(tmp_dir)
        else:
            print(f"beam_convert: what was converted is kept in {tmp_dir}; run the same command again to "
                  "resume", file=sys.stderr, flush=True)
        raise
    finally:
        if progress:
            progress.stop.set()
    metadata = json.loads(files.read_bytes(files.join(output_dir, record_schema.METADATA_FILE)))
    elapsed = time.monotonic() - started
    documents = metadata["documents"]
    splits = ", ".join(f"{split} {counts['products']:,}" for split, counts in metadata["splits"].items())
    print(f"beam_convert: done in {elapsed:.1f} s ({documents / max(elapsed, 1e-9):,.0f} products/s): "
          f"{splits}; rejected {metadata['rejected_total']:,}; {metadata['num_classes']:,} classes; "
          f"output in {output_dir}", file=sys.stderr, flush=True)
    return metadata


def _is_not_corrupt_bson(record: logging.LogRecord) -> bool:
    # Beam logs a worker's exception with its traceback before re-raising it; for a corrupt
    # document the one line that main() prints says all there is to say.
    return "CorruptBsonError" not in record.getMessage()


def main(argv: list[str]) -> int:
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    logging.getLogger("apache_beam.runners.common").addFilter(_is_not_corrupt_bson)
    try:
        convert(argv)
    except UsageError as error:
        print(f"beam_convert: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the runner wraps worker errors in many types
        print(f"beam_convert: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
