"""The benchmarks' results files: each run rewrites its block between markers, notes around it stay."""

import os
import pathlib
import sys


def write_between_markers(path: str, name: str, figures: str, heading: str) -> None:
    """Puts `figures` between the `name` markers of the results file (`heading` starts a new file)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = pathlib.Path(path).read_text() if os.path.exists(path) else f"{heading}\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + begin + "\n" + figures + text[text.index(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + begin + "\n" + figures + end + "\n"
    pathlib.Path(path).write_text(text)


def publish(figures: str, module: str, argv, path, name: str, heading: str) -> None:
    """Prints a run's figures and, given a results file, writes them there under the command that
    reproduces them."""
    print("\n" + figures)
    if path:
        command = " ".join([f"python -m {module}", *(argv if argv is not None else sys.argv[1:])])
        write_between_markers(path, name, f"`{command.strip()}`\n\n{figures}", heading)
        print(f"wrote {path}")
