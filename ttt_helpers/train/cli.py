"""The command line `python -m ttt_helpers.train`: one option per `TrainConfig` field (its help
text, its default), over an optional --config file. Under torchrun every process runs it."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Sequence

from .checkpoints import RunFolderError
from .config import TrainConfig
from .loop import TrainingDiverged, TrainResult, train

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """--config, then one option per TrainConfig field (--no-FIELD too for true/false fields)."""
    parser = argparse.ArgumentParser(
        prog="python -m ttt_helpers.train",
        description="Train a TTT language model (or the Transformer baseline) on the Shakespeare plays with "
        "state passing. Options override the --config file; under torchrun every process trains "
        "its own rows with DistributedDataParallel.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of TrainConfig fields (default: none)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, metavar=f.type.replace(" | None", "").upper(), help=help_text)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line: the --config file (if any), then the options given."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    return TrainConfig.from_file(path, **args) if path else TrainConfig.from_dict(args)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """The command line: a bad option or config value, or a run folder that cannot serve the run
    (not empty, nothing to resume), exits with status 2 and says which in one line; a run whose
    loss stops being finite exits with status 1."""
    try:
        config = parse_config(argv)
    except (TypeError, ValueError) as err:
        build_parser().error(str(err))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        result = train(config)
    except RunFolderError as err:
        build_parser().error(str(err).replace(":\n", ": ").replace("\n", "; "))  # one line
    except TrainingDiverged as err:
        raise SystemExit(f"error: {err}") from err
    if rank == 0 and result.losses:
        logger.info(
            "step %d: loss %.4f after %d tokens; metrics in %s",
            result.step,
            result.losses[-1],
            result.tokens,
            result.out_dir / "metrics.jsonl",
        )
    if result.length_generalization is not None:
        lg = result.length_generalization
        logger.info(
            "perplexity at 1x the window: %s; worst / best over lengths: %.3f; plot in %s",
            lg.at_1x,
            lg.degradation,
            result.out_dir / "length_generalization.png",
        )
    return result
