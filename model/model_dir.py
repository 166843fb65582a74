"""The files of a train.py model_dir (docs/FORMATS.md section 4), for every reader and writer:
their names, and RunFolder, a model_dir's path that gives each file's path.

Free of TensorFlow so that evaluate.py's flag checks, demo.py and the tests can name the files
without loading it.
"""

import dataclasses
import os

import record_schema

FLAGS_FILE = "flags.txt"  # the effective flags, re-usable with --flagfile
CONFIG_FILE = "train_config.json"  # model + input settings evaluate.py needs to rebuild inputs
STATE_FILE = "train_state.json"  # written when training has finished
MODEL_FILE = "model.keras"
BEST_FILE = "best.keras"  # the epoch with the best val top-1 so far
BEST_SCORE_FILE = "best.json"  # that epoch and its score: a resumed run compares against it
EXPORT_DIR = "export"  # the SavedModel of the final model
BEST_EXPORT_DIR = "export_best"  # the SavedModel of best.keras
BACKUP_DIR = "backup"
LOGS_DIR = "logs"
LOCK_FILE = "run.lock"  # held by the running trainer (host, pid, start time, heartbeat)
WORKERS_DIR = "workers"  # multi-worker runs: what the non-chief workers write

# Inside an evaluation folder (default: model_dir/eval_SPLIT).
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.png"
SUBMISSION_FILE = "submission.csv"


# Which of a run's models to read: the final one (model.keras, export/) or the epoch with the best
# val top-1 (best.keras, export_best/); both BatchNorm-recalibrated at the end of training.
CHECKPOINTS = ("final", "best")


def model_file(checkpoint: str = "final") -> str:
    return {"final": MODEL_FILE, "best": BEST_FILE}[_checked(checkpoint)]


def export_dir(checkpoint: str = "final") -> str:
    return {"final": EXPORT_DIR, "best": BEST_EXPORT_DIR}[_checked(checkpoint)]


def _checked(checkpoint: str) -> str:
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    return checkpoint


def eval_dir(model_dir: str, split: str) -> str:
    return os.path.join(model_dir, f"eval_{split}")


def worker_dir(model_dir: str, task_type: str, task_id: int) -> str:
    return os.path.join(model_dir, WORKERS_DIR, f"{task_type}_{task_id}")


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A model_dir, local or gs://...: `RunFolder(model_dir).config_file`, `.export("best")`, ...
    are its files' paths, joined here and nowhere else."""
    path: str

    def _join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    @property
    def flags_file(self) -> str:
        return self._join(FLAGS_FILE)

    @property
    def config_file(self) -> str:
        return self._join(CONFIG_FILE)

    @property
    def state_file(self) -> str:
        return self._join(STATE_FILE)

    @property
    def labels_file(self) -> str:
        """The labels.csv of the data the run trained on, copied in."""
        return self._join(record_schema.LABELS_FILE)

    @property
    def model_file(self) -> str:
        return self._join(MODEL_FILE)

    @property
    def best_file(self) -> str:
        return self._join(BEST_FILE)

    @property
    def best_score_file(self) -> str:
        return self._join(BEST_SCORE_FILE)

    @property
    def backup(self) -> str:
        return self._join(BACKUP_DIR)

    @property
    def logs(self) -> str:
        return self._join(LOGS_DIR)

    @property
    def lock_file(self) -> str:
        return self._join(LOCK_FILE)

    def model(self, checkpoint: str = "final") -> str:
        """model.keras or best.keras."""
        return self._join(model_file(checkpoint))

    def export(self, checkpoint: str = "final") -> str:
        """export/ or export_best/."""
        return self._join(export_dir(checkpoint))

    def eval_dir(self, split: str) -> str:
        return eval_dir(self.path, split)

    def worker_dir(self, task_type: str, task_id: int) -> str:
        return worker_dir(self.path, task_type, task_id)


@dataclasses.dataclass(frozen=True)
class EvalFolder:
    """An evaluation's output folder (default: RunFolder(model_dir).eval_dir(split)): its files' paths."""
    path: str

    @property
    def metrics_file(self) -> str:
        return os.path.join(self.path, METRICS_FILE)

    @property
    def report_file(self) -> str:
        return os.path.join(self.path, REPORT_FILE)

    @property
    def submission_file(self) -> str:
        return os.path.join(self.path, SUBMISSION_FILE)
