"""Where a run's metrics go: `metrics.jsonl` in the run folder always, TensorBoard when it is
installed, Weights & Biases (online, or offline when asked or without a network) when asked."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from .config import TrainConfig

logger = logging.getLogger(__name__)


class RunLogger:
    """Metrics to `out_dir/metrics.jsonl` (always), TensorBoard (if installed) and W&B (if asked)."""

    def __init__(self, out_dir: Path, config: TrainConfig) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.tensorboard = self.wandb = None
        if config.tensorboard:
            if importlib.util.find_spec("tensorboard") is None:
                logger.info("TensorBoard is not installed (pip install tensorboard): logging to %s only", self.path)
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        if config.wandb or config.wandb_offline:
            self.wandb = self._start_wandb(out_dir, config)

    @staticmethod
    def _start_wandb(out_dir: Path, config: TrainConfig):
        if importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb logging (wandb or wandb_offline) needs the wandb package: pip install wandb")
        import wandb

        kwargs = dict(project=config.wandb_project, dir=str(out_dir), config=config.to_dict())
        if config.wandb_offline:
            return wandb.init(mode="offline", **kwargs)
        try:
            return wandb.init(mode="online", **kwargs)
        except Exception as err:  # no network or no login: keep the run, write it locally instead
            logger.warning("W&B online mode failed (%s): logging offline; sync later with `wandb sync`", err)
            return wandb.init(mode="offline", **kwargs)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold "step") to every sink."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
