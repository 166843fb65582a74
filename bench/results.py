"""The benchmarks' results files: each run rewrites its block between markers, notes around it stay."""

import os
import pathlib


def write_between_markers(path: str, name: str, figures: str, heading: str) -> None:
    """Puts `figures` between the `name` markers of the results file (`heading` starts a new file)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = pathlib.Path(path).read_text() if os.path.exists(path) else f"{heading}\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + begin + "\n" + figures + text[text.index(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + begin + "\n" + figures + end + "\n"
    pathlib.Path(path).write_text(text)
