"""The README's shell commands, read without running them: every folder a command reads is one an
earlier command of the README writes.

A user follows the README from top to bottom, so `--data_dir` must name a conversion's output
folder (the one with metadata.json: `tfrecords/train`, not `tfrecords`), evaluate.py's
`--model_dir` a folder train.py wrote, and the file submitted to Kaggle one evaluate.py wrote.
Runs no command (tests/test_docs_readme.py runs those that can run here); also the parser both
tests share.
"""

import dataclasses
import pathlib
import posixpath
import re
import shlex

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@dataclasses.dataclass(frozen=True)
class Command:
    text: str  # as written, continuation lines joined (what bash runs)
    line: int  # README line where it starts
    section: str  # the README heading above it

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def key(self) -> str:
        """The command with whitespace, comments and continuations normalised: how tests name it."""
        return " ".join(self.words)

    def option(self, name: str):
        """The value of --name=value (the last one), or None."""
        values = [w.split("=", 1)[1] for w in self.words if w.startswith(f"--{name}=")]
        return values[-1] if values else None

    @property
    def program(self) -> str:
        """What runs: `beam_convert`, `train.py`, `evaluate.py`, `kaggle`, `gsutil`, ... (environment
        assignments and the interpreter skipped)."""
        words = [w for w in self.words if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
        if not words:
            return ""
        if words[0].endswith(("python", "python3")) and len(words) > 1:
            return words[2] if words[1] == "-m" and len(words) > 2 else words[1]
        return posixpath.basename(words[0])


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of the README's ```bash blocks, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    commands, section, block, pending, start = [], "", False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not block and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        commands.append(Command((pending + stripped).strip(), start, section))
        pending = ""
    assert not block, "a ```bash block of the README is not closed"
    return commands


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def test_the_readme_has_commands_and_each_one_parses():
    commands = readme_commands()
    assert len(commands) > 10
    for command in commands:
        assert command.words, f"README line {command.line}: empty command {command.text!r}"


def path_problems(commands: list[Command]) -> list[str]:
    """Each command that reads a folder (or the submitted file) no earlier command writes."""
    conversions, models, evaluations = set(), set(), set()  # folders written so far
    problems = []
    for command in commands:
        where = f"README line {command.line} ({command.section}): {command.key}"
        if command.key == "make demo":  # demo.py: its conversion and its models, under demo_output/
            import demo

            conversions.add("demo_output/data")
            models.update(f"demo_output/models/{fusion}" for fusion in demo.FUSION_MODELS)
        elif command.program == "beam_convert":
            conversions.add(command.option("output_dir"))
        elif command.program == "gsutil" and "-r" in command.words:
            source, destination = command.words[-2:]
            # gsutil cp -r gs://B/tfrecords . -> ./tfrecords/... for every conversion under it
            copied = {posixpath.normpath(posixpath.join(destination, posixpath.basename(source.rstrip("/")),
                                                        posixpath.relpath(folder, source)))
                      for folder in conversions if _under(folder, source)}
            assert copied, f"{where}: copies nothing an earlier command wrote"
            conversions |= copied
        elif command.program == "train.py":
            data_dir = command.option("data_dir")
            if data_dir not in conversions:
                problems.append(f"{where}: --data_dir={data_dir} is no conversion's --output_dir "
                                f"(written so far: {sorted(conversions)})")
            models.add(command.option("model_dir"))
        elif command.program == "evaluate.py":
            data_dir, model_dir = command.option("data_dir"), command.option("model_dir")
            if data_dir not in conversions:
                problems.append(f"{where}: --data_dir={data_dir} is no conversion's --output_dir")
            for member in model_dir.split(","):  # an ensemble: A,B
                if member not in models:
                    problems.append(f"{where}: --model_dir={member} was written by no train.py command before it")
            split = command.option("split") or "val"
            evaluations.add(command.option("output_dir") or posixpath.join(model_dir.split(",")[0], f"eval_{split}"))
        elif command.program == "kaggle" and "submit" in command.words:
            submitted = command.words[command.words.index("-f") + 1]
            if posixpath.basename(submitted) != "submission.csv" or posixpath.dirname(submitted) not in evaluations:
                problems.append(f"{where}: {submitted} is written by no evaluate.py --split=test before it "
                                f"(evaluations so far: {sorted(evaluations)})")
    return problems


def test_every_folder_a_readme_command_reads_is_written_by_an_earlier_one():
    problems = path_problems(readme_commands())
    assert not problems, "\n".join(problems)


def test_the_path_check_catches_the_mistakes_the_readme_once_made():
    """Section 6 trained on the parent of the conversion's folder, and section 3 submitted a file
    of a model_dir no command made."""
    text = "\n".join([
        "```bash",
        "python -m beam_convert --input=gs://BUCKET/train.bson --output_dir=gs://BUCKET/tfrecords/train",
        "python train.py --flagfile=configs/xception_gpu.flags --data_dir=gs://BUCKET/tfrecords \\",
        "  --model_dir=gs://BUCKET/runs/x1",
        "kaggle competitions submit -c cdiscount-image-classification-challenge \\",
        "    -f runs/xception/eval_test/submission.csv -m 'xception mean_max'",
        "```",
    ])
    commands = readme_commands(text)
    assert [c.program for c in commands] == ["beam_convert", "train.py", "kaggle"]
    problems = path_problems(commands)
    assert len(problems) == 2
    assert "--data_dir=gs://BUCKET/tfrecords is no conversion's --output_dir" in problems[0]
    assert "runs/xception/eval_test/submission.csv is written by no evaluate.py" in problems[1]
