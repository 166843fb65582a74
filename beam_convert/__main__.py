"""python -m beam_convert --input=PATH_OR_GLOB --output_dir=DIR [options] [Beam pipeline options]

Converts Cdiscount BSON files into sharded TFRecords (docs/FORMATS.md section 1). Options this
parser does not know must be Apache Beam pipeline options (`--runner=DataflowRunner --project=...
--region=... --temp_location=gs://... --setup_file=./setup.py`); any other option is refused, so
that a typo never runs a long conversion with a default. `--flagfile=FILE` reads options from FILE.

Over 400 lines: option checking (Beam's options included), progress, quiet runs and one-line errors are the CLI's whole job; a split into cli_options/cli_run is the next step if it grows.
"""

import argparse
import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Iterator, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, if anything loads it
# Beam warns at import that the optional GCP client libraries are missing: noise for local runs.
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    DirectOptions, PipelineOptions, StandardOptions, TestOptions, _BeamArgumentParser)
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

import record_schema
from beam_convert import files, labels
from beam_convert.pipeline import (
    INDEX_MARKER, RANGE_MARKER, ConvertConfig, NothingConverted, build, finished_ranges, progress_marker,
    restore_previous_output)

# Below this much input (~50,000 products) the in-process runner wins: worker processes cost
# several seconds to start. Above it one worker per core wins: 1.2x the in-process rate on
# 100,000 products (1 GB), more as the start-up is amortised (BUILD_NOTES.md, conversion benchmark).
IN_MEMORY_MAX_BYTES = 512 * 1024**2
PROGRESS_SECONDS = 10.0
TMP_PREFIX = "_tmp-"  # output_dir/_tmp-JOB: a job's temporary files, kept to resume it
BEAM_LOG = "beam.log"  # in the job's tmp folder: what Beam and its workers print, unless --verbose
FLAGFILE = "--flagfile"


class UsageError(Exception):
    """Bad arguments, or inputs and folders that cannot be used as given: exit status 2."""


class DataError(Exception):
    """A failure the user has to fix in the data or the folders: exit status 1, the message is the line."""


def say(message: str) -> None:
    print(f"beam_convert: {message}", file=sys.stderr, flush=True)


# --- options ------------------------------------------------------------------------------------

class _OneLineErrors:
    """argparse prints its usage and exits on a bad argument; raising lets main() print one line."""

    def error(self, message: str):
        raise UsageError(message)


class _ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


class _BeamOptionsParser(_OneLineErrors, _BeamArgumentParser):
    pass


def expand_flagfiles(argv: list[str], reading: tuple[str, ...] = ()) -> list[str]:
    """argv with each --flagfile=FILE replaced, where it stands, by the options in FILE.

    The format is absl's, as for train.py: one option a line, blank lines and lines starting
    with `#` or `//` ignored, nested --flagfile lines expanded. Options after --flagfile override
    it, since the last occurrence of an option wins.
    """
    expanded, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return expanded + [arg] + rest
        if arg == FLAGFILE:
            if not rest:
                raise UsageError("--flagfile needs a file name")
            path = rest.pop(0)
        elif arg.startswith(FLAGFILE + "="):
            path = arg[len(FLAGFILE) + 1:]
        else:
            expanded.append(arg)
            continue
        expanded += expand_flagfiles(_flagfile_lines(path, reading), reading + (path,))
    return expanded


def _flagfile_lines(path: str, reading: tuple[str, ...]) -> list[str]:
    if path in reading:
        raise UsageError(f"{path}: the flagfile includes itself")
    try:
        text = files.read_bytes(_local_path(os.path.expanduser(path))).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read the flagfile: {error}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "//"))]


def _parser() -> _ArgumentParser:
    # allow_abbrev=False: a prefix such as --val must not pass for --val_fraction (Beam's parser
    # refuses prefixes too).
    parser = _ArgumentParser(prog="python -m beam_convert", description=__doc__.split("\n\n")[1],
                             allow_abbrev=False)
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
    parser.add_argument("--verbose", action="store_true",
                        help=f"show what Beam and its workers log (by default it goes to {TMP_PREFIX}*/{BEAM_LOG}, "
                             "deleted on success)")
    parser.add_argument(FLAGFILE, metavar="FILE",
                        help="read options from FILE, one --name=value a line; options after it override it")
    return parser


def _check_values(args: argparse.Namespace) -> None:
    if not 0 <= args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.max_images < 1:
        raise UsageError(f"--max_images must be at least 1, got {args.max_images}")
    if args.num_shards is not None and args.num_shards < 1:
        raise UsageError(f"--num_shards must be at least 1, got {args.num_shards}")
    if args.range_size < 1:
        raise UsageError(f"--range_size must be at least 1, got {args.range_size}")


def beam_options_parser() -> _BeamOptionsParser:
    """A parser of every option of Beam's registered PipelineOptions classes.

    Built the way PipelineOptions.get_all_options builds its own, so it knows exactly the options
    that Beam would take (including those of runners whose options classes are loaded).
    """
    parser = _BeamOptionsParser(allow_abbrev=False, add_help=False)
    classes = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [name for action in parser._actions for name in action.option_strings if name.startswith("--")]


def check_beam_args(beam_args: list[str], own_names: list[str]) -> None:
    """Refuses what neither this parser nor Beam's options know, naming the nearest known option."""
    parser = beam_options_parser()
    _, unknown = parser.parse_known_args(beam_args)
    if not unknown:
        return
    arg = unknown[0]
    if not arg.startswith("-"):
        raise UsageError(f"unexpected argument {arg!r}: options are written --name=value")
    name = arg.split("=", 1)[0]
    nearest = nearest_option(name, own_names + _option_names(parser))
    raise UsageError(f"unknown option {name}" + (f" (did you mean {nearest}?)" if nearest else ""))


def nearest_option(name: str, known: list[str]) -> Optional[str]:
    """The known option a typo most likely meant: one it abbreviates, else the closest spelling."""
    extending = sorted(option for option in known if option.startswith(name))
    close = difflib.get_close_matches(name, known, n=1)
    return extending[0] if extending else close[0] if close else None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This converter's options, and the Beam pipeline options (checked, passed on unchanged)."""
    parser = _parser()
    args, beam_args = parser.parse_known_args(expand_flagfiles(argv))
    _check_values(args)
    check_beam_args(beam_args, _option_names(parser))
    return args, beam_args


# --- inputs and output folder ------------------------------------------------------------------

def _local_path(path: str) -> str:
    return path if files.FileSystems.get_scheme(path) else os.path.abspath(path)


def resolve_inputs(pattern: str) -> list[tuple[str, int]]:
    matches = files.glob_with_sizes(_local_path(pattern))
    if not matches:
        raise UsageError(f"{pattern}: no input file matches")
    return matches


def restore_interrupted_overwrites(output_dir: str) -> None:
    """An --overwrite run killed while putting its files in place left the earlier conversion in
    its tmp folder: that goes back first, whatever this run then does."""
    for path in files.list_dir(output_dir):
        if os.path.basename(path).startswith(TMP_PREFIX) and restore_previous_output(output_dir, path):
            say(f"put back the earlier conversion that an interrupted --overwrite run had moved to {path}")


def check_output_dir(output_dir: str, overwrite: bool, tmp_dir: str) -> bool:
    """Refuses to mix with other output; returns whether an interrupted run of this job is there."""
    restore_interrupted_overwrites(output_dir)
    existing = files.list_dir(output_dir)
    resumable = tmp_dir in existing
    stale = [p for p in existing if os.path.basename(p).startswith(TMP_PREFIX) and p != tmp_dir]
    others = [p for p in existing if p not in stale and p != tmp_dir]
    if others and not overwrite:
        raise UsageError(f"{output_dir}: not empty ({len(others)} entries); pass --overwrite to replace its conversion")
    for path in stale:  # temporary files of a failed run with other inputs or options
        files.delete_tree(path)
    return resumable


def prepare_tmp_dir(output_dir: str, tmp_dir: str) -> None:
    """Creates the job's temporary folder now, so that an output folder that cannot be written
    fails here, in one line, rather than after the scan of the whole input."""
    try:
        files.make_writable_folder(tmp_dir)
    except OSError as error:
        reason = f"{error.strerror}: {error.filename}" if error.strerror and error.filename else str(error)
        raise DataError(f"{output_dir}: cannot write the output folder: {reason}") from None
    except Exception as error:  # noqa: BLE001 - object stores raise their clients' own types
        raise DataError(f"{output_dir}: cannot write the output folder: {one_line(error)}") from None


def read_categories(path: Optional[str]) -> Optional[tuple[labels.Category, ...]]:
    if not path:
        return None
    try:
        text = files.read_bytes(_local_path(path)).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read: {error}") from None
    try:
        return tuple(labels.read_categories(text, path))
    except ValueError as error:
        raise UsageError(str(error)) from None


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
        # The highest counts seen: the markers vanish with tmp_dir once the output is in place.
        self.total = self.done = 0

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
            self.total = max(self.total, sum(entry["documents"] for entry in self._read(INDEX_MARKER)))
            self.done = max(self.done, sum(entry["documents"] for entry in self._read(RANGE_MARKER)))
            elapsed = time.monotonic() - self.started
            share = f" of {self.total:,} ({100 * self.done / self.total:.0f}%)" if self.total else " (indexing)"
            say(f"{self.done:,} products{share}, {self.done / elapsed:,.0f} products/s, {elapsed:.0f} s")


@contextlib.contextmanager
def progress_lines(tmp_dir: str, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    progress = Progress(tmp_dir)
    progress.start()
    try:
        yield
    finally:
        progress.stop.set()
        progress.join()  # before stderr is put back: it may be printing to it


# --- what the terminal shows -------------------------------------------------------------------

def show_beam_logs(verbose: bool) -> None:
    """Beam's own log lines: all with --verbose, else errors only (and those go to the run's log)."""
    if verbose:
        logging.basicConfig()  # a handler for them, if Beam's import did not already make one
    logging.getLogger("apache_beam").setLevel(logging.INFO if verbose else logging.ERROR)


def beam_log_path(tmp_dir: str) -> str:
    """Where Beam's output goes during a quiet local run: the job's tmp folder (deleted with it on
    success, kept for a look after a failure); dropped when that folder is not local."""
    return os.path.join(tmp_dir, BEAM_LOG) if files.FileSystems.get_scheme(tmp_dir) is None else os.devnull


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # pytest's capture, StringIO: no descriptor
        return False


@contextlib.contextmanager
def stderr_to(log_path: str) -> Iterator[None]:
    """Points file descriptor 2 at log_path for the duration; sys.stderr keeps the terminal.

    The FnApiRunner's worker processes inherit descriptor 2 and set up their own logging: INFO
    lines from the start (before any option could lower it) and no pipeline options at all, so
    `--default_sdk_harness_log_level` never reaches them. The descriptor is the one handle on what
    they print. This process's Beam logging handler also writes to descriptor 2 (it holds the
    original sys.stderr), so it follows; the converter's own lines go to a duplicate of the
    terminal through the replaced sys.stderr.
    """
    sys.stderr.flush()
    terminal = os.dup(2)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    original = sys.stderr
    if _writes_to_fd(original, 2):
        sys.stderr = open(os.dup(terminal), "w", buffering=1, encoding=original.encoding, errors="backslashreplace")
    os.dup2(log, 2)
    os.close(log)
    try:
        yield
    finally:
        original.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        if sys.stderr is not original:
            sys.stderr.close()
            sys.stderr = original


# --- running -----------------------------------------------------------------------------------

_CORRUPT = re.compile(r"(\S+: corrupt BSON document at byte offset \d+: [^\n]+?)\s*(?:'|\"|\[|\n|$)")
# A worker process's exception reaches this process as text ending with the traceback's last line,
# "module.NothingConverted: MESSAGE [while running 'STAGE']".
_NOTHING_CONVERTED = re.compile(rf"^(?:[\w.]+\.)?{NothingConverted.__name__}: (.+?)(?: \[while running [^\]]*\])?$",
                                re.MULTILINE)
_WHILE_RUNNING = re.compile(r" \[while running [^\]]*\]$")


def corrupt_bson_message(error: BaseException) -> Optional[str]:
    """The CorruptBsonError message inside an exception that Beam may have wrapped several times."""
    match = _CORRUPT.search(str(error))
    return match.group(1) if match else None


def nothing_converted_message(error: BaseException) -> Optional[str]:
    """The NothingConverted message, raised here (in-process runner) or in a worker process."""
    if isinstance(error, NothingConverted):
        return _WHILE_RUNNING.sub("", str(error).strip())
    matches = _NOTHING_CONVERTED.findall(str(error))
    return matches[-1] if matches else None


def one_line(error: BaseException) -> str:
    """The message a user needs from an exception."""
    known = corrupt_bson_message(error) or nothing_converted_message(error)
    if known:
        return known
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:1000]


def explain_failure(error: BaseException, output_dir: str, tmp_dir: str, log_path: Optional[str]) -> None:
    """What a failed run leaves behind, said only where it is true; the error line follows."""
    if restore_previous_output(output_dir, tmp_dir):
        say(f"the earlier conversion in {output_dir} is back in place")
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


def run_pipeline(pipeline: beam.Pipeline, config: ConvertConfig, local: bool, verbose: bool):
    """Runs the job, showing progress lines and keeping Beam's chatter off the terminal; returns
    Beam's result."""
    tmp_dir = config.tmp_dir
    log_path = beam_log_path(tmp_dir) if local and not verbose else None
    try:
        with stderr_to(log_path) if log_path else contextlib.nullcontext():
            with progress_lines(tmp_dir, enabled=local):
                result = pipeline.run()
                result.wait_until_finish()
                return result
    except BaseException as error:
        explain_failure(error, config.output_dir, tmp_dir, log_path)
        raise


def convert(argv: list[str]) -> dict:
    args, beam_args = parse_args(argv)
    show_beam_logs(args.verbose)
    inputs = resolve_inputs(args.input)
    output_dir = _local_path(args.output_dir)
    categories = read_categories(args.categories)
    tmp_dir = files.join(output_dir, f"{TMP_PREFIX}{job_key(inputs, args, categories)}")
    resumable = check_output_dir(output_dir, args.overwrite, tmp_dir)
    prepare_tmp_dir(output_dir, tmp_dir)
    if resumable and (done := finished_ranges(tmp_dir)):
        say(f"resuming the unfinished run in {tmp_dir}: {done} range(s) already converted")
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
    say(f"{len(inputs)} input file(s), {input_bytes / 1e6:,.1f} MB -> {output_dir}")
    build(pipeline, [path for path, _ in inputs], config)
    started = time.monotonic()
    result = run_pipeline(pipeline, config, local, args.verbose)
    if not local and pipeline.options.view_as(TestOptions).dry_run:
        files.delete_tree(tmp_dir)
        say(f"dry run: the {pipeline.options.view_as(StandardOptions).runner} job was built and not submitted "
            f"(nothing converted); it stages {', '.join(staged_files(result)) or 'no files'}")
        return {}
    metadata = json.loads(files.read_bytes(files.join(output_dir, record_schema.METADATA_FILE)))
    elapsed = time.monotonic() - started
    documents = metadata["documents"]
    splits = ", ".join(f"{split} {counts['products']:,}" for split, counts in metadata["splits"].items())
    say(f"done in {elapsed:.1f} s ({documents / max(elapsed, 1e-9):,.0f} products/s): {splits}; "
        f"rejected {metadata['rejected_total']:,}; {metadata['num_classes']:,} classes; output in {output_dir}")
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
    except DataError as error:
        print(f"beam_convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("beam_convert: error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the runner wraps worker errors in many types
        print(f"beam_convert: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
