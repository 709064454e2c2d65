"""Training TTT language models, and a Transformer of the same size, with one loop.

Documents are read in consecutive segments of `window` tokens; a TTT model passes its state from
one segment of a document to the next (state passing), and gradients stop at segment boundaries.
Around the loop: JSON-lines, TensorBoard and W&B logging, atomic checkpoints with exact resume,
DistributedDataParallel under `torchrun`, and evaluation of length generalization after training.

    config.py       TrainConfig: every setting of a run, checked; from keyword arguments or a file
    stream.py       the plays as token ids, and SegmentStream, batches of consecutive segments
    windows.py      a corpus as one token stream, and RandomWindows, batches of windows at random starts
    build.py        the model, the optimizer, the learning-rate schedule, the precision
    logger.py       RunLogger: metrics.jsonl, TensorBoard, W&B
    distributed.py  devices and the process group under torchrun
    checkpoints.py  atomic checkpoints, resume, run folders
    loop.py         Trainer (one process's steps) and train (a whole run)
    cli.py          the command line: run `python -m ttt_helpers.train --help` for every option

Streaming generation from a trained model is in `ttt_helpers.inference.generate`.
"""

from .build import bf16_autocast, build_model, build_optimizer, learning_rate
from .checkpoints import CorruptCheckpoint, latest_checkpoint
from .cli import build_parser, main, parse_config
from .config import MODEL_KINDS, PRECISIONS, TrainConfig
from .logger import RunLogger
from .loop import (
    Trainer,
    TrainingDiverged,
    TrainResult,
    carry_state,
    evaluate_length_generalization,
    segment_loss,
    train,
)
from .stream import Batch, SegmentStream, load_tokenizer, play_documents
from .windows import RandomWindows, corpus_stream

__all__ = [
    "MODEL_KINDS",
    "PRECISIONS",
    "Batch",
    "CorruptCheckpoint",
    "RandomWindows",
    "RunLogger",
    "SegmentStream",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "bf16_autocast",
    "build_model",
    "build_optimizer",
    "build_parser",
    "carry_state",
    "corpus_stream",
    "evaluate_length_generalization",
    "latest_checkpoint",
    "learning_rate",
    "load_tokenizer",
    "main",
    "parse_config",
    "play_documents",
    "segment_loss",
    "train",
]
