"""docs/RATES.md holds each rate and projection once; the other documents cite its rows.

- Every row id cited (`R25`) in the README, BUILD_NOTES.md, bench/RESULTS_*.md, docs/*.md and the
  flag files' comments exists in docs/RATES.md, and each id is defined once.
- Where the README or a flag comment repeats a figure next to its citation, the figure is the
  row's: every number in a sentence (or table cell) that cites rows must appear in those rows.
  So a figure changed in RATES.md and not where it is quoted (or the reverse) fails here.
- Every `tests/FILE.py::test_name` the documents name exists (they are the evidence they cite;
  `name...` names a prefix).
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RATES = REPO / "docs" / "RATES.md"
CITING = [REPO / "README.md", REPO / "BUILD_NOTES.md", *sorted((REPO / "bench").glob("RESULTS_*.md")),
          *sorted(p for p in (REPO / "docs").glob("*.md") if p != RATES)]
FLAGFILES = sorted((REPO / "configs").glob("*.flags"))

ROW_ID = re.compile(r"(?<![\w/.])R(\d{1,3})\b")
NUMBER = re.compile(r"(?<![\w.,])\d[\d,]*(?:\.\d+)?")
CODE = re.compile(r"`[^`]*`")
URL = re.compile(r"https?://\S+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`*(\[])")


def rows() -> dict[str, str]:
    """id -> the whole table row of docs/RATES.md that defines it."""
    defined = {}
    for line in RATES.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*(R\d+)\s*\|", line)
        if match:
            assert match.group(1) not in defined, f"docs/RATES.md defines {match.group(1)} twice"
            defined[match.group(1)] = line
    return defined


def numbers(text: str) -> set[str]:
    """The figures of a text: numbers outside code spans, URLs and row ids, commas dropped."""
    text = ROW_ID.sub(" ", URL.sub(" ", CODE.sub(" ", text)))
    return {n.replace(",", "").rstrip(",") for n in NUMBER.findall(text)}


def cited(text: str) -> list[str]:
    return [f"R{n}" for n in ROW_ID.findall(text)]


def flag_comments(path: pathlib.Path) -> list[str]:
    """The comment paragraphs of a flag file (consecutive `#` lines joined)."""
    paragraphs, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        example = line.startswith("#   ")  # an indented example command: a paragraph of its own
        if line.startswith("#") and not example:
            current.append(line.lstrip("#").strip())
            continue
        if current:
            paragraphs.append(" ".join(current))
            current = []
        if example:
            paragraphs.append(line.lstrip("#").strip())
    return paragraphs + ([" ".join(current)] if current else [])


def readme_segments() -> list[str]:
    """The README's table cells, and its prose paragraphs (code blocks left out)."""
    segments, paragraph, block = [], [], False
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("```"):
            block = not block
            continue
        if block:
            continue
        if line.startswith("|"):
            segments += [cell.strip() for cell in line.strip("|").split("|")]
        elif line.strip() and not line.startswith("#"):
            paragraph.append(line.strip())
            continue
        if paragraph:
            segments.append(" ".join(paragraph))
            paragraph = []
    return segments


def sentences(segment: str) -> list[str]:
    return SENTENCE_END.split(segment)


def test_rates_defines_rows_and_every_cited_row_exists():
    defined = rows()
    assert len(defined) >= 30
    missing = []
    for path in [*CITING, *FLAGFILES]:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".flags":
            text = "\n".join(flag_comments(path))
        missing += [f"{path.relative_to(REPO)}: {row}" for row in cited(text) if row not in defined]
    assert not missing, f"cited rows that docs/RATES.md does not define: {missing}"
    rates_text = RATES.read_text(encoding="utf-8")
    assert not [row for row in cited(rates_text) if row not in defined], "RATES.md cites a row it lacks"


def test_the_documents_that_give_figures_cite_rates():
    for path in (REPO / "README.md", REPO / "BUILD_NOTES.md", REPO / "configs" / "xception_gpu.flags"):
        assert "docs/RATES.md" in path.read_text(encoding="utf-8"), path


def _quoted_figures_not_in_their_rows(segments: list[str]) -> list[str]:
    defined = rows()
    problems = []
    for segment in segments:
        for sentence in sentences(segment):
            ids = [row for row in cited(sentence) if row in defined]
            if not ids:
                continue
            source = " ".join(defined[row] for row in ids)
            allowed = numbers(source) | {n.replace(",", "") for n in NUMBER.findall(source)}
            stray = sorted(numbers(sentence) - allowed)
            if stray:
                problems.append(f"{stray} not in {ids}: {sentence[:160]}")
    return problems


def test_figures_quoted_in_the_readme_are_the_rows_they_cite():
    problems = _quoted_figures_not_in_their_rows(readme_segments())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", FLAGFILES, ids=lambda p: p.name)
def test_figures_quoted_in_flag_comments_are_the_rows_they_cite(path):
    problems = _quoted_figures_not_in_their_rows(flag_comments(path))
    assert not problems, "\n".join(problems)


def test_the_quote_check_catches_a_figure_that_drifted():
    assert _quoted_figures_not_in_their_rows(["An epoch takes ~22 min on 8 GPUs (R25)."])
    assert not _quoted_figures_not_in_their_rows(["An epoch takes ~9 min on 8 GPUs (R25)."])


def test_every_test_the_documents_name_exists():
    missing = []
    for path in [*CITING, RATES]:
        text = re.sub(r"::\s+", "::", path.read_text(encoding="utf-8"))
        for file, name, elided in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+)(\.\.\.)?)?", text):
            if not (REPO / file).exists():
                missing.append(f"{path.relative_to(REPO)}: {file}")
            elif name and not re.search(rf"def {name}" + ("" if elided else r"\b"),
                                        (REPO / file).read_text(encoding="utf-8")):
                missing.append(f"{path.relative_to(REPO)}: {file}::{name}{elided}")
    assert not missing, missing
