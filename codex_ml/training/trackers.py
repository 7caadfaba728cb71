"""Where training curves go (rank 0): dvclive always (the DVC plots), and with train.report_to
TensorBoard event files and/or an MLflow file store, both local files beside dvclive's."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("codex.train")

# The loop's names -> dvclive's (the series dvc.yaml's plots and the report read).
LIVE_NAMES = {"eval_loss": "eval/loss"}


def check(report_to: list[str]) -> None:
    """Each tracker's package is importable; else a UserError naming it (before any output)."""
    from ..stage import UserError

    need = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
    for name in report_to:
        try:
            __import__(need[name])
        except ImportError:
            raise UserError(f"train.report_to: {name} needs the {need[name]} package "
                            f"(pip install {need[name]}); use one of the installed ones or []") from None


class Trackers:
    def __init__(self, report_to: list[str], live):
        self.live, self.tb, self.mlflow = live, None, None
        root = Path(live.dir) if live is not None else Path("metrics/train")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(root / "tensorboard"))
        if "mlflow" in report_to:
            import os

            # mlflow 3 (3.18 here) refuses its file store unless allowed (it would have a database; the
            # lock's mlflow-skinny has no SQLAlchemy for one): allowed, unless the user says not.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            import mlflow
            mlflow.set_tracking_uri((root / "mlruns").resolve().as_uri())
            mlflow.set_experiment("codex-pipeline")
            self.mlflow = mlflow
            mlflow.start_run()

    def log(self, step: int, values: dict) -> None:
        if self.live is not None:
            self.live.step = step
            for k, v in values.items():
                self.live.log_metric(LIVE_NAMES.get(k, k), v)
            self.live.make_summary()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(LIVE_NAMES.get(k, f"train/{k}"), v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({LIVE_NAMES.get(k, k).replace("/", "_"): v for k, v in values.items()},
                                    step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()

