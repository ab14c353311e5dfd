"""Experiment tracking: a thin Weights & Biases wrapper, offline by default, files inside the project."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class Tracker:
    """Log scalars to W&B (offline unless ``mode`` says otherwise) or do nothing when disabled."""

    def __init__(
        self,
        enabled: bool,
        *,
        project: str,
        run_name: str,
        config: dict[str, Any],
        run_dir: str | Path = "runs",
        mode: str = "offline",
    ) -> None:
        """Start a W&B run in ``run_dir`` when ``enabled``; ``mode`` is "offline", "online" or "disabled"."""
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            name=run_name,
            config=config,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    @property
    def directory(self) -> Path | None:
        """Where this run's W&B files live (None when tracking is off)."""
        return Path(self.run.dir).parent if self.run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step`` (no-op when disabled)."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        """Flush and close the run."""
        if self.run is not None:
            self.run.finish()
            self.run = None
