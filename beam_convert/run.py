"""One conversion from the command line to the summary line: checks the inputs and the output
folder, picks the runner, runs the graph with progress and a quiet terminal, and says what a
failure leaves behind."""

import argparse
import contextlib
import hashlib
import json
import os
import time
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, TestOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import record_schema
import stop_signals
from beam_convert import files, products
from beam_convert.convert import finished_ranges
from beam_convert.job import ConvertConfig
from beam_convert.options import convert_config, local_path, parse_args, read_categories, resolve_inputs
from beam_convert.output_folder import (
    TMP_PREFIX, check_output_dir, discard_partial_output, prepare_tmp_dir, restore_previous_output)
from beam_convert.pipeline import build
from beam_convert.stopping import Stopped
from beam_convert.terminal import (
    beam_log_path, corrupt_bson_message, nothing_converted_message, progress_lines, say, show_beam_logs, stderr_to)

# Below this much input (~50,000 products) the in-process runner wins: worker processes cost
# several seconds to start. Above it one worker per core wins on idle cores: on 100,000 products
# (1 GB) 1.27x the plain loop's rate against the in-process runner's 1.06x, but 0.73-0.76x in a
# run with a test beside it (BUILD_NOTES.md, conversion benchmark); more as start-up is amortised.
IN_MEMORY_MAX_BYTES = 512 * 1024**2


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


def put_output_dir_back(output_dir: str, tmp_dir: str, overwrite: bool) -> None:
    """After a failure or a stop: the earlier conversion back in place (--overwrite), else no part
    of the new one in output_dir (what finalize began to write; the finished ranges are kept)."""
    if restore_previous_output(output_dir, tmp_dir):
        say(f"the earlier conversion in {output_dir} is back in place")
    elif not overwrite:  # then output_dir held no conversion before this run (check_output_dir)
        discard_partial_output(output_dir)


def stopped_message(signum: int, output_dir: str, tmp_dir: str, local: bool) -> str:
    """The one line of a run stopped by a signal: what it keeps."""
    name = stop_signals.signal_name(signum)
    if not local:  # a Dataflow (Flink, Spark) job runs on without this command
        return (f"stopped by {name}: this command no longer waits for the job, which is not stopped (cancel it "
                f"from the runner's console); if it does not finish, run the same command to resume from {tmp_dir}")
    if files.FileSystems.exists(files.join(output_dir, record_schema.METADATA_FILE)):
        return f"stopped by {name} once the conversion was complete: it is in {output_dir}"
    finished = finished_ranges(tmp_dir)
    if not finished:
        return f"stopped by {name} before any range was converted: the same command starts again"
    return f"stopped by {name}: {finished:,} converted range(s) are kept in {tmp_dir}; run the same command to resume"


def explain_failure(error: BaseException, output_dir: str, tmp_dir: str, log_path: Optional[str]) -> None:
    """What a failed run leaves behind, said only where it is true; the error line follows."""
    if corrupt_bson_message(error):  # the same command would fail the same way: nothing to resume
        files.delete_tree(tmp_dir)
        return
    if nothing_converted_message(error):  # its message names the rejection report that is kept
        return
    finished = finished_ranges(tmp_dir)
    if finished:
        say(f"{finished:,} converted range(s) are kept in {tmp_dir}; run the same command again to resume")
    if log_path and log_path != os.devnull and os.path.exists(log_path) and os.path.getsize(log_path):
        say(f"what Beam printed is in {log_path}")


def staged_files(result) -> list[str]:
    """Names of the files a Dataflow job stages for its workers (e.g. the sdist of --setup_file)."""
    job = getattr(result, "job", None)
    proto = getattr(job, "proto_pipeline", None)
    if proto is None:
        return []
    names = set()
    for environment in proto.components.environments.values():
        for dependency in environment.dependencies:
            if dependency.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
                names.add(beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dependency.role_payload).staged_name)
            else:
                names.add(os.path.basename(beam_runner_api_pb2.ArtifactFilePayload.FromString(dependency.type_payload).path))
    return sorted(names)


def run_pipeline(pipeline: beam.Pipeline, config: ConvertConfig, local: bool, verbose: bool, overwrite: bool):
    """Runs the job, showing progress lines and keeping Beam's chatter off the terminal; returns
    Beam's result. A stop signal becomes Stopped, whatever the runner made of it."""
    tmp_dir = config.tmp_dir
    log_path = beam_log_path(tmp_dir) if local and not verbose else None
    try:
        with stderr_to(log_path) if log_path else contextlib.nullcontext():
            with progress_lines(tmp_dir, enabled=local):
                result = pipeline.run()
                result.wait_until_finish()
                return result
    except BaseException as error:
        signum = stop_signals.received()
        if signum is None or local:  # a remote job stopped by a signal here runs on: its output is its own
            put_output_dir_back(config.output_dir, tmp_dir, overwrite)
        if signum is not None:
            raise Stopped(signum, stopped_message(signum, config.output_dir, tmp_dir, local)) from None
        explain_failure(error, config.output_dir, tmp_dir, log_path)
        raise


def convert(argv: list[str]) -> dict:
    args, beam_args = parse_args(argv)
    show_beam_logs(args.verbose)
    inputs = resolve_inputs(args.input)
    output_dir = local_path(args.output_dir)
    categories = read_categories(args.categories)
    tmp_dir = files.join(output_dir, f"{TMP_PREFIX}{job_key(inputs, args, categories)}")
    resumable = check_output_dir(output_dir, args.overwrite, tmp_dir)
    prepare_tmp_dir(output_dir, tmp_dir)
    if resumable and (done := finished_ranges(tmp_dir)):
        say(f"resuming the unfinished run in {tmp_dir}: {done} range(s) already converted")
    config = convert_config(args, output_dir=output_dir, tmp_dir=tmp_dir, categories=categories)
    input_bytes = sum(size for _, size in inputs)
    pipeline, local = make_pipeline(beam_args, input_bytes)
    say(f"{len(inputs)} input file(s), {input_bytes / 1e6:,.1f} MB -> {output_dir}")
    build(pipeline, [path for path, _ in inputs], config)
    started = time.monotonic()
    result = run_pipeline(pipeline, config, local, args.verbose, args.overwrite)
    if not local and pipeline.options.view_as(TestOptions).dry_run:
        files.delete_tree(tmp_dir)
        say(f"dry run: the {pipeline.options.view_as(StandardOptions).runner} job was built and not submitted "
            f"(nothing converted); it stages {', '.join(staged_files(result)) or 'no files'}")
        return {}
    metadata = json.loads(files.read_bytes(files.join(output_dir, record_schema.METADATA_FILE)))
    elapsed = time.monotonic() - started
    for split, counts in metadata["splits"].items():
        if args.num_shards and counts["shards"] < args.num_shards:  # never an empty shard (finalize.py)
            say(f"--num_shards={args.num_shards}: {split} has {counts['products']:,} products, "
                f"so {counts['shards']:,} shards of one product")
    unexpected = metadata["rejected"].get(products.UNEXPECTED_CATEGORY, 0)
    if unexpected:
        say(f"{unexpected:,} document{'s' if unexpected > 1 else ''} with a category_id in unlabelled input "
            f"{'were' if unexpected > 1 else 'was'} rejected ({products.UNEXPECTED_CATEGORY}), see "
            f"{files.join(output_dir, record_schema.rejected_name())}")
    if unframed := metadata.get("unframed_bson"):
        say(f"{unframed['bytes']:,} bytes of the input could not be framed as BSON documents and were skipped "
            f"(~{unframed['estimated_documents']:,} document{'' if unframed['estimated_documents'] == 1 else 's'} at "
            f"the input's mean size, lost; not in the rejected "
            f"count), see {files.join(output_dir, record_schema.rejected_name())}")
    documents = metadata["documents"]
    splits = ", ".join(f"{split} {counts['products']:,}" for split, counts in metadata["splits"].items())
    say(f"done in {elapsed:.1f} s ({documents / max(elapsed, 1e-9):,.0f} products/s): {splits}; "
        f"rejected {metadata['rejected_total']:,}; {metadata['num_classes']:,} classes; output in {output_dir}")
    return metadata
