"""python -m beam_convert --input=PATH_OR_GLOB --output_dir=DIR [options] [Beam pipeline options]

Converts Cdiscount BSON files into sharded TFRecords (docs/FORMATS.md section 1); `--help` lists
the options (beam_convert/options.py). Exit status: 0 done, 2 bad arguments or folders, 1 any
other failure, 130 / 143 stopped by SIGINT / SIGTERM (beam_convert/stopping.py); every error is one
line `beam_convert: error: ...`, a stop one line `beam_convert: stopped by SIGNAL: ...`.
"""

import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads, if anything loads it
# Beam warns at import that the optional GCP client libraries are missing: noise for local runs.
logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())

# Imported after the lines above: these modules import Beam.
import stop_signals
from beam_convert.errors import DataError, UsageError
from beam_convert.run import convert
from beam_convert.stopping import Stopped, stop_on_signals
from beam_convert.terminal import one_line, quiet_beam_logs


def main(argv: list[str]) -> int:
    quiet_beam_logs()
    with stop_on_signals():
        try:
            return _convert(argv)
        except Stopped as stop:  # also one that arrives while an error line is printed
            print(f"beam_convert: {stop.message}", file=sys.stderr)
            return stop.status


def _convert(argv: list[str]) -> int:
    try:
        convert(argv)
    except UsageError as error:
        print(f"beam_convert: error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"beam_convert: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # no handler of ours (main() called outside the main thread)
        print("beam_convert: stopped by SIGINT", file=sys.stderr)
        return stop_signals.exit_status(signal.SIGINT)
    except Exception as error:  # noqa: BLE001 - the runner wraps worker errors in many types
        if stop_signals.received() is not None:  # a stop that the runner wrapped outside run_pipeline
            raise Stopped(stop_signals.received()) from None
        print(f"beam_convert: error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """The console script cdiscount-convert (setup.py), as `python -m beam_convert`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    run()
