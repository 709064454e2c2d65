"""Checkpoints and run folders.

A checkpoint `out_dir/checkpoints/step-NNNNNNNN` holds the weights (`model/`, loadable with
AutoModelForCausalLM), the optimizer state, `trainer_state.json` and one `rank-R.pt` per process
(its data position, carried TTT caches and RNG states) and `manifest.json` (the sha256 of every
file, checked on resuming); it is written atomically and resumed exactly. A run folder that already holds a run is refused unless the run resumes or overwrites it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import file_sha256
from ..model import TTTCache
from .build import load_model, no_progress_bars
from .config import TrainConfig
from .distributed import all_processes, barrier

if TYPE_CHECKING:
    from .loop import Trainer

logger = logging.getLogger(__name__)


class RunFolderError(ValueError):
    """The run folder cannot serve the run as asked (not empty, a file, nothing to resume, a
    checkpoint of another config): a usage error, which the command line reports in one line."""


class CorruptCheckpoint(ValueError):
    """A file of a checkpoint cannot be read (truncated or garbled), or differs from when it was saved."""


MANIFEST = "manifest.json"  # in every checkpoint: {"sha256": {path relative to the checkpoint: hex digest}}


def _write_manifest(folder: Path) -> None:
    """Record the sha256 of every file of checkpoint `folder` in its manifest."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=1))


def _check_manifest(folder: Path, rank: int) -> None:
    """Raise a CorruptCheckpoint naming the first file of `folder` that is missing or differs from
    the sha256 recorded when it was saved (a flipped bit included): process 0 checks the shared
    files, every process its own `rank-R.pt`."""
    path = folder / MANIFEST
    if not path.exists():  # written before checkpoints recorded their hashes: nothing to compare
        return
    try:
        digests = json.loads(path.read_text())["sha256"]
        items = sorted(digests.items())
    except Exception as err:
        raise CorruptCheckpoint(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    for name, digest in items:
        if name != f"rank-{rank}.pt" and (rank != 0 or name.startswith("rank-")):
            continue  # checked by another process
        file = folder / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{file} is missing (the manifest lists it)")
        if file_sha256(file) != digest:
            raise CorruptCheckpoint(
                f"{file} does not match the sha256 recorded when it was saved: it changed or was damaged on disk"
            )


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to the disk (folders: where the system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return  # Windows cannot open a folder; its renames are durable without this
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what a run writes into its out_dir: the only names overwrite=True deletes
_RUN_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "wandb", "length_generalization.png")


def check_out_dir(config: TrainConfig) -> None:
    """Refuse a run folder that already holds a run, unless resume (continue it) or overwrite
    (replace it: only the names a run writes, so no other file is ever deleted)."""
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"out_dir {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not config.resume:
        if not config.overwrite:
            raise RunFolderError(
                f"out_dir {out} is not empty (it holds {', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}): "
                "pass resume=True (--resume) to continue that run, overwrite=True (--overwrite) to delete it "
                "and start again, or choose another out_dir"
            )
        foreign = [e for e in entries if e not in _RUN_FILES]
        if foreign:
            raise RunFolderError(
                f"overwrite=True refuses to clear out_dir {out}: it holds {foreign}, which a training run "
                f"does not write (a run writes only {list(_RUN_FILES)}); remove them or choose another out_dir"
            )
    barrier()  # every process has looked before process 0 deletes or writes anything


def clear_out_dir(config: TrainConfig, rank: int) -> None:
    """With overwrite (and no resume), process 0 deletes the earlier run's files in out_dir."""
    out = Path(config.out_dir)
    if config.overwrite and out.is_dir():
        if rank == 0:
            for name in _RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        barrier()


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder `out_dir/checkpoints/step-NNNNNNNN`, or None.

    Checkpoints appear under that name only once complete (see `save_checkpoint`).
    """
    folders = sorted((Path(out_dir) / "checkpoints").glob("step-*"))
    return folders[-1] if folders else None


# fields a resumed run may change; any other difference from the checkpoint's config is an error
_RESUME_MAY_CHANGE = {
    "max_steps",
    "out_dir",
    "resume",
    "overwrite",
    "progress",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_after",
    "eval_tokens_per_doc",
    "eval_lengths",
    "tensorboard",
    "wandb",
    "wandb_offline",
    "wandb_project",
    "device",
    "precision",
    "ttt_impl",
    "from_pretrained",
}


def save_checkpoint(trainer: Trainer) -> Path:
    """Write the trainer's `checkpoints/step-NNNNNNNN` atomically: into a temporary folder, then renamed.

    Process 0 writes the weights (`model/`, safetensors, loadable with AutoModelForCausalLM),
    the optimizer state and `trainer_state.json`; every process writes `rank-R.pt` with its
    data position, its carried TTT caches and its RNG states; process 0 then records the sha256
    of every file in `manifest.json` (reading the checkpoint back once). A failure leaves no folder.
    """
    rank, step = trainer.rank, trainer.step
    parent = trainer.out_dir / "checkpoints"
    final, tmp = parent / f"step-{step:08d}", parent / f".tmp-step-{step:08d}"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
            tmp.mkdir(parents=True)
        barrier()
        if rank == 0:
            _save_shared_files(trainer, tmp)
        _save_process_state(trainer, tmp / f"rank-{rank}.pt")
        barrier()
        if rank == 0:
            _publish(tmp, final, trainer.config.keep_checkpoints)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return final


def _save_shared_files(trainer: Trainer, folder: Path) -> None:
    """Process 0's part: the weights and tokenizer (`model/`), the optimizer state, `trainer_state.json`."""
    with no_progress_bars():
        trainer.model.save_pretrained(folder / "model")
    if trainer.tokenizer is not None:
        trainer.tokenizer.save_pretrained(folder / "model")
    torch.save(trainer.optimizer.state_dict(), folder / "optimizer.pt")
    state = {
        "step": trainer.step,
        "tokens": trainer.tokens,
        "world_size": trainer.world,
        "config": trainer.config.to_dict(),
    }
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))


def _save_process_state(trainer: Trainer, path: Path) -> None:
    """Every process's part, flushed to the disk: its data position, carried TTT caches and RNG states."""
    cache = None
    if trainer.cache is not None:
        cache = {
            "states": [list(t) for t in trainer.cache.states],
            "conv_states": trainer.cache.conv_states,
            "seen_tokens": trainer.cache.seen_tokens,
        }
    torch.save(
        {
            "stream": trainer.stream.state_dict(),
            "cache": cache,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
        },
        path,
    )
    _fsync(path)


def _publish(tmp: Path, final: Path, keep: int) -> None:
    """Record the manifest of the complete folder `tmp`, flush it to the disk and rename it `final`
    (replacing a checkpoint of the same step), then keep only the newest `keep` checkpoints. On the
    disk before the rename: a complete name never shows incomplete files."""
    parent = final.parent
    _write_manifest(tmp)  # every process's file is written now
    for path in [*sorted(tmp.rglob("*")), tmp]:
        _fsync(path)
    if final.exists():  # this step was saved before: swap the new folder in
        old = parent / f".old-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    for stale in sorted(parent.glob("step-*"))[:-keep]:
        shutil.rmtree(stale)
    _fsync(parent)


def _read_checkpoint(folder: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """Everything process `rank` needs from checkpoint `folder`, read into memory, then each file
    checked against the sha256 its manifest recorded.

    Raises a CorruptCheckpoint naming the file that cannot be read or has changed."""

    def read(path: Path, load: Callable[[Path], Any]) -> Any:
        try:
            return load(path)
        except Exception as err:  # a truncated or garbled file: safetensors, JSON and pickle errors differ
            raise CorruptCheckpoint(f"{path} cannot be read ({type(err).__name__}: {err})") from err

    def load_torch(path: Path) -> Any:
        return torch.load(path, map_location=device, weights_only=True)

    contents = {
        "trainer": read(folder / "trainer_state.json", lambda p: json.loads(p.read_text())),
        "model": read(folder / "model", load_model),
        "optimizer": read(folder / "optimizer.pt", load_torch),
        "rank": read(folder / f"rank-{rank}.pt", load_torch),
    }
    _check_manifest(folder, rank)  # a file that loads may still have changed since
    return contents


def newest_intact_checkpoint(out_dir: Path, rank: int, device: torch.device) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint in `out_dir` that every process can read, and its contents; unreadable
    newer ones are renamed to `corrupt-step-NNNNNNNN` (so rotation never counts them) with a warning."""
    folders = sorted((out_dir / "checkpoints").glob("step-*"), reverse=True)
    corrupt = sorted(p.name for p in (out_dir / "checkpoints").glob("corrupt-step-*"))
    if not folders and corrupt:
        raise RunFolderError(
            f"resume=True but every checkpoint in {out_dir / 'checkpoints'} was found unreadable by an earlier "
            f"resume and renamed ({', '.join(corrupt)}): nothing is left to resume; pass overwrite=True "
            "(--overwrite) to start the run again"
        )
    if not folders:
        raise RunFolderError(f"resume=True but {out_dir / 'checkpoints'} holds no checkpoint")
    problems = []
    for folder in folders:
        try:
            saved, problem = _read_checkpoint(folder, rank, device), None
        except CorruptCheckpoint as err:
            saved, problem = None, str(err)
        if all_processes(problem is None):
            return folder, saved
        problems.append(problem or f"{folder} cannot be read by another process")
        logger.warning("resume: %s; trying the checkpoint before it", problems[-1])
        barrier()
        if rank == 0:
            aside = folder.with_name("corrupt-" + folder.name)
            for k in range(1, 1000):
                if not aside.exists():
                    break
                aside = folder.with_name(f"corrupt-{folder.name}-{k}")
            folder.rename(aside)
        barrier()
    raise RunFolderError("resume=True but no checkpoint in out_dir can be read:\n" + "\n".join(problems))


def restore_checkpoint(trainer: Trainer, folder: Path, contents: dict[str, Any]) -> None:
    """Continue `trainer` from checkpoint `folder` (its `contents`): step, optimizer, data position,
    carried caches and RNG states. A config that differs where a resumed run may not is refused."""
    saved = contents["trainer"]
    changed = sorted(
        k for k, v in trainer.config.to_dict().items() if k not in _RESUME_MAY_CHANGE and saved["config"].get(k) != v
    )
    if changed:
        raise RunFolderError(f"resume=True with a config that differs from the checkpoint's in {changed}")
    if saved["world_size"] != trainer.world:
        raise RunFolderError(
            f"the checkpoint was written by {saved['world_size']} processes, this run has {trainer.world}"
        )
    trainer.step, trainer.tokens = saved["step"], saved["tokens"]
    trainer.optimizer.load_state_dict(contents["optimizer"])
    mine = contents["rank"]
    trainer.stream.load_state_dict(mine["stream"])
    if mine["cache"] is not None:
        c = mine["cache"]
        trainer.cache = TTTCache([tuple(s) for s in c["states"]], c["conv_states"], c["seen_tokens"])
    torch.set_rng_state(mine["torch_rng"].cpu())
    if mine["cuda_rng"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in mine["cuda_rng"]])
    random.setstate(mine["python_rng"])
    logger.info("resumed from %s at step %d", folder, trainer.step)
