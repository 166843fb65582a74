"""The output folder: what may be in it before a run, and the --overwrite swap.

A job keeps its temporary files in `output_dir/_tmp-KEY/` (KEY names the inputs and options, so
that the same command finds them again and resumes). `--overwrite` moves the earlier conversion
into `_tmp-KEY/previous/` once every range is converted (metadata.json first, so that output_dir
never looks complete), writes `previous/moved-aside` once all of it is there, and deletes it with
the tmp folder after the new metadata.json is written. A failure in between puts it back; after a
kill, the next run in that folder does (restore_interrupted_overwrites).
"""

import os

import record_schema
from beam_convert import files
from beam_convert.errors import DataError, UsageError
from beam_convert.job import ConvertConfig, RangeResult
from beam_convert.terminal import one_line, say

TMP_PREFIX = "_tmp-"  # output_dir/_tmp-JOB: a job's temporary files, kept to resume it

# --overwrite: the earlier conversion waits in tmp_dir/previous/ until the new one is in place.
_PREVIOUS_OUTPUT = "previous"
_MOVED_ASIDE = "moved-aside"  # written once every earlier file is in previous/


def output_files(output_dir: str) -> list[str]:
    """The files of a conversion in output_dir (docs/FORMATS.md section 1)."""
    patterns = [record_schema.METADATA_FILE, record_schema.LABELS_FILE, record_schema.IMAGE_DIGESTS_FILE,
                record_schema.rejected_pattern()]
    patterns += [record_schema.shard_pattern(split) for split in record_schema.SPLITS]
    patterns += [record_schema.product_ids_name(split) for split in record_schema.SPLITS]
    return [path for pattern in patterns for path in files.glob(files.join(output_dir, pattern))]


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
    if resumable and not files.FileSystems.exists(files.join(output_dir, record_schema.METADATA_FILE)):
        # This job stopped while finalizing (it writes into output_dir only then, and only into a
        # folder that held no other conversion, or whose conversion it had moved aside): what it
        # began to write goes, and finalize writes it again from the ranges kept in tmp_dir.
        partial = output_files(output_dir)
        if partial:
            files.delete(partial)
            say(f"removed {len(partial)} output file(s) that the interrupted run had begun to write")
            existing = files.list_dir(output_dir)
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


def discard_partial_output(output_dir: str) -> None:
    """Deletes the files of an unfinished conversion (no metadata.json) from output_dir."""
    if not files.FileSystems.exists(files.join(output_dir, record_schema.METADATA_FILE)):
        files.delete(output_files(output_dir))


def _move(paths: list[str], folder: str) -> None:
    if paths:
        files.make_folder(folder)
        files.FileSystems.rename(paths, [files.join(folder, path.rsplit("/", 1)[-1]) for path in paths])


def _split_off_metadata(paths: list[str]) -> tuple[list[str], list[str]]:
    """([metadata.json] if it is among paths, else []; the other paths)."""
    metadata = [path for path in paths if path.rsplit("/", 1)[-1] == record_schema.METADATA_FILE]
    return metadata, [path for path in paths if path not in metadata]


def move_previous_output_aside(results: list[RangeResult], config: ConvertConfig) -> list[RangeResult]:
    """Moves an earlier conversion (--overwrite) into tmp_dir/previous/, metadata.json first so
    that output_dir never looks complete.

    Takes and passes on every range's result so that it runs once all ranges are converted: a run
    that fails before then leaves the earlier output where it was. write_metadata deletes it with
    tmp_dir once the new output is complete; if finalizing fails, restore_previous_output puts it
    back.
    """
    aside = files.join(config.tmp_dir, _PREVIOUS_OUTPUT)
    if files.FileSystems.exists(files.join(aside, _MOVED_ASIDE)):  # a retry of this step
        return results
    metadata, others = _split_off_metadata(output_files(config.output_dir))
    _move(metadata, aside)
    _move(others, aside)
    files.write_bytes(files.join(aside, _MOVED_ASIDE), b"")
    return results


def restore_previous_output(output_dir: str, tmp_dir: str) -> bool:
    """Puts back an earlier conversion that a failed or killed --overwrite run had moved aside.

    Does nothing when there is none, or when the new conversion is complete (its metadata.json is
    in place). Returns whether it put one back.
    """
    aside = files.join(tmp_dir, _PREVIOUS_OUTPUT)
    exists = files.FileSystems.exists
    if not exists(files.join(aside, record_schema.METADATA_FILE)) or exists(
            files.join(output_dir, record_schema.METADATA_FILE)):
        return False
    if exists(files.join(aside, _MOVED_ASIDE)):  # then output_dir holds the new output's beginning
        files.delete(output_files(output_dir))
    metadata, others = _split_off_metadata(output_files(aside))
    _move(others, output_dir)
    _move(metadata, output_dir)  # last: output_dir looks complete only once everything is back
    files.delete_tree(aside)
    return True
