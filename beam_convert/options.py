"""python -m beam_convert --input=PATH_OR_GLOB --output_dir=DIR [options] [Beam pipeline options]

Converts Cdiscount BSON files into sharded TFRecords (docs/FORMATS.md section 1). Options this
parser does not know must be Apache Beam pipeline options (`--runner=DataflowRunner --project=...
--region=... --temp_location=gs://... --setup_file=./setup.py`); any other option is refused, so
that a typo never runs a long conversion with a default. `--flagfile=FILE` reads options from FILE.

The command line, read here: flagfiles expanded, the converter's own options parsed and checked,
the rest checked against Beam's pipeline options and passed on unchanged; then the inputs and
the categories file they name.

Beam's own options are known the way Beam collects them in PipelineOptions.get_all_options: each
registered PipelineOptions subclass adds its options to a parser in its `_add_argparse_args(parser)`
classmethod. Despite the underscore, that classmethod is Beam's documented extension point: the
PipelineOptions docstring defines options by overriding it, and says "The arguments for the
add_argument() method are exactly the ones described in the argparse public documentation". So
the parser here is a plain argparse.ArgumentParser, not Beam's private _BeamArgumentParser; it
adds only `add_value_provider_argument`, the one other call Beam documents for those classes
(options of templated pipelines). The public calls do not fit: get_all_options() drops unknown
options with a logged warning (or, with retain_unknown_options=True, takes them as known)
instead of returning them, and exits the process on a bad value.
"""

import argparse
import dataclasses
import difflib
import os
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from beam_convert import categories as categories_lib
from beam_convert import files
from beam_convert.errors import UsageError
from beam_convert.job import ConvertConfig
from beam_convert.output_folder import TMP_PREFIX
from beam_convert.terminal import BEAM_LOG

DESCRIPTION = __doc__.split("\n\n")[1]
FLAGFILE = "--flagfile"


class _OneLineErrors:
    """argparse prints its usage and exits on a bad argument; raising lets main() print one line."""

    def error(self, message: str):
        raise UsageError(message)


class _ArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


class _BeamOptionsParser(_OneLineErrors, argparse.ArgumentParser):
    def add_value_provider_argument(self, *args, **kwargs):
        """What Beam's own parser offers options classes for templated (ValueProvider) options.

        Here only the option's name and the type of its value matter, to check them: Beam parses
        the options again itself. As in Beam, a positional one is optional.
        """
        if not args[0].startswith("-") and kwargs.get("nargs") is None:
            kwargs["nargs"] = "?"
        self.add_argument(*args, **kwargs)


def local_path(path: str) -> str:
    return path if files.FileSystems.get_scheme(path) else os.path.abspath(path)


# --- flagfiles -----------------------------------------------------------------------------------

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
        text = files.read_bytes(local_path(os.path.expanduser(path))).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read the flagfile: {error}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "//"))]


# --- the converter's options ---------------------------------------------------------------------

def _parser() -> _ArgumentParser:
    # allow_abbrev=False: a prefix such as --val must not pass for --val_fraction (Beam's parser
    # refuses prefixes too).
    parser = _ArgumentParser(prog="python -m beam_convert", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--input", required=True, help="BSON file, or a glob of them (local, gs://, ...)")
    parser.add_argument("--output_dir", required=True,
                        help="the data folder to write (local, gs://, ...): empty, or pass --overwrite")
    parser.add_argument("--categories", help="category_names.csv: the class table (all its rows)")
    parser.add_argument("--val_fraction", type=float, default=ConvertConfig.val_fraction,
                        help="share of labelled products in the val split, in [0, 1) (default: %(default)s)")
    parser.add_argument("--max_images", type=int, default=ConvertConfig.max_images,
                        help="image slots per record; a product's extra images are dropped and counted "
                             "(default: %(default)s; the readers take it from metadata.json)")
    parser.add_argument("--num_shards", type=int, default=ConvertConfig.num_shards,
                        help="shards per split, of even record counts (default: one per index range); "
                             "at most one per product: no shard is empty")
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


# --- Beam's options ------------------------------------------------------------------------------

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
        cls._add_argparse_args(parser)  # Beam's documented extension point (module docstring)
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


def convert_config(args: argparse.Namespace, **resolved) -> ConvertConfig:
    """The conversion's config, each field taken from the option of its name, except the fields
    given in `resolved`: what is worked out from the options (output_dir made absolute, the job's
    tmp_dir, the categories read from their file)."""
    fields = [field.name for field in dataclasses.fields(ConvertConfig) if field.name not in resolved]
    return ConvertConfig(**{name: getattr(args, name) for name in fields}, **resolved)


# --- what the options name -----------------------------------------------------------------------

def resolve_inputs(pattern: str) -> list[tuple[str, int]]:
    matches = files.glob_with_sizes(local_path(pattern))
    if not matches:
        raise UsageError(f"{pattern}: no input file matches")
    return matches


def read_categories(path: Optional[str]) -> Optional[tuple[categories_lib.Category, ...]]:
    if not path:
        return None
    try:
        text = files.read_bytes(local_path(path)).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read: {error}") from None
    try:
        return tuple(categories_lib.read_categories(text, path))
    except ValueError as error:
        raise UsageError(str(error)) from None
