"""Distilling a Llama into the TTT model converted from it (`convert.from_llama`), in two stages.

Stage 1 (layer by layer): one teacher forward records every attention's input and output; each TTT
layer, fed the attention's input, learns to give its output (squared error relative to the
output's mean square, averaged over layers). Stage 2 (end to end): the whole student learns the
teacher's next-token distribution (KL(teacher || student) per token). Only a small delta trains:
each TTT layer's own parameters (`TTT_PARAMETERS`: W0, b0, the inner LayerNorm, the learning-rate
gate, the token weights, the output norm) and low-rank adapters (`lora`) on its q, k, v and o
projections; the embeddings, the feed-forward blocks and the norms of the blocks stay the teacher's.

`Distiller` runs the stages step by step, writes `distill.json` (configuration, provenance, every
step's losses, tokens and seconds) after every step, and keeps `checkpoint.pt` (the trained
tensors, the optimizer, the sampler's and torch's random states), written atomically every
`checkpoint_every` steps, at the end of a stage and when stopped by `max_minutes`, from which a
run resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks, lora
from ..local_attention import check_hybrid
from ..model import TTTForCausalLM
from ..model.convert import from_llama
from .bank import Bank

TTT_PARAMETERS = (
    "W0",
    "b0",
    "ln_weight",
    "ln_bias",
    "lr_gate.weight",
    "lr_gate.bias",
    "token_idx_offset",
    "post_norm.weight",
    "post_norm.bias",
)
LORA_TARGETS = ("ttt.q_proj", "ttt.k_proj", "ttt.v_proj", "ttt.o_proj")
ADAPTER = ".parametrizations.weight.0."  # where an adapter factor sits among a student's parameters


def delta_name(param: str) -> str:
    """A trained parameter's name in the delta: an adapter factor `<module>.parametrizations.weight.0.A`
    becomes `<module>.lora_A`; the TTT layers' own parameters keep theirs."""
    if ADAPTER in param:
        module, factor = param.split(ADAPTER)
        return f"{module}.lora_{factor}"
    return param


STAGES = ("layers", "logits")


@dataclass
class DistillConfig:
    """What a distillation run does. Steps, batch rows and sequence length are per stage (layers,
    logits); lr is AdamW's peak rate, reached after `warmup` steps and decayed by a cosine to a tenth."""

    out_dir: str
    layer_steps: int = 200
    logit_steps: int = 1000
    layer_batch: tuple[int, int] = (8, 2048)  # (rows, tokens) per step of stage 1
    logit_batch: tuple[int, int] = (4, 4096)  # (rows, tokens) per step of stage 2
    layer_lr: float = 1e-3
    logit_lr: float = 3e-4
    warmup: int = 20
    lora_rank: int = 16
    lora_alpha: float = 16.0
    weights: dict[str, float] = field(default_factory=lambda: {"code": 0.45, "kjv": 0.15, "pydocs": 0.25, "chat": 0.15})
    seed: int = 0
    checkpoint_every: int = 50
    max_minutes: float | None = None  # stop (with a checkpoint) once this much time has passed in this call
    bf16: bool = True  # autocast the products to bfloat16 on CUDA (the master weights stay float32)
    ttt_impl: str = "auto"  # the student's TTT path: "auto" (the Triton training kernels on CUDA) or "reference"
    init: str | None = None  # a delta (`pretrained.save_delta`) the trained tensors start from; needs layer_steps 0
    attention_window: int = 0  # >= 1: hybrid layers keep softmax attention over the last tokens (`from_llama`)
    attention_sinks: int = 0  # and over the first tokens

    def __post_init__(self) -> None:
        checks.integer("layer_steps", self.layer_steps, 0)
        checks.integer("logit_steps", self.logit_steps, 0)
        for name in ("layer_batch", "logit_batch"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"{name} must be (rows, tokens), got {value!r}")
            checks.integer(f"{name}[0]", value[0], 1)
            checks.integer(f"{name}[1]", value[1], 1)
            setattr(self, name, tuple(value))
        checks.positive("layer_lr", self.layer_lr)
        checks.positive("logit_lr", self.logit_lr)
        checks.integer("warmup", self.warmup, 0)
        checks.integer("lora_rank", self.lora_rank, 1)
        checks.positive("lora_alpha", self.lora_alpha)
        if (
            not isinstance(self.weights, dict)
            or not self.weights
            or any(not isinstance(v, (int, float)) or v < 0 for v in self.weights.values())
            or sum(self.weights.values()) <= 0
        ):
            raise ValueError(
                f"weights must map sources to non-negative numbers with a positive sum, got {self.weights!r}"
            )
        checks.integer("seed", self.seed, 0)
        checks.integer("checkpoint_every", self.checkpoint_every, 1)
        if self.max_minutes is not None:
            checks.positive("max_minutes", self.max_minutes)
        checks.one_of("ttt_impl", self.ttt_impl, ("auto", "kernel", "reference"))
        check_hybrid(self.attention_window, self.attention_sinks, prefix="attention_")
        if self.init is not None and self.layer_steps != 0:
            raise ValueError(
                f"init continues a distilled delta with stage 2 only: layer_steps must be 0, got {self.layer_steps}"
            )


def make_student(teacher: nn.Module, config: DistillConfig) -> TTTForCausalLM:
    """The converted model with adapters on its TTT projections; every weight frozen but the delta."""
    student = from_llama(teacher, attention_window=config.attention_window, attention_sinks=config.attention_sinks)
    student.set_ttt_impl(config.ttt_impl)
    for p in student.parameters():
        p.requires_grad_(False)
    lora.add_lora(student, LORA_TARGETS, config.lora_rank, config.lora_alpha, seed=config.seed)
    for p in trainable(student).values():
        p.requires_grad_(True)
    return student


def trainable(student: nn.Module) -> dict[str, nn.Parameter]:
    """The delta's parameters by name, in a fixed order: every TTT layer's own and every adapter factor."""
    out = {}
    for name, p in student.named_parameters():
        if ".ttt." in name and (name.split(".ttt.", 1)[1] in TTT_PARAMETERS or ADAPTER in name):
            out[name] = p
    return out


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then a cosine to peak / 10 at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def record_attention(teacher: nn.Module, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(input, output) [B, T, C] of every self-attention of `teacher` on ids [B, T], from one forward."""
    records: list = [None] * len(teacher.model.layers)
    hooks = []
    for i, layer in enumerate(teacher.model.layers):

        def hook(module, args, kwargs, output, i=i):
            records[i] = (kwargs.get("hidden_states", args[0] if args else None), output[0])

        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        teacher(ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return records


def kl_per_token(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(teacher || student) of each position's next-token distribution, in float32: [B, T]."""
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class Distiller:
    """A distillation run in `config.out_dir`: `run()` trains until both stages are done or
    `max_minutes` have passed; a new Distiller on the same folder with resume=True continues it."""

    def __init__(
        self,
        config: DistillConfig,
        teacher: nn.Module,
        bank: Bank,
        *,
        device: str | torch.device = "cpu",
        resume: bool = False,
        provenance: dict | None = None,
    ) -> None:
        """teacher: the Llama on the CPU in float32 (the student is converted from it there, then both
        move to `device`); bank: the data (`load_bank`); provenance: recorded in distill.json."""
        self.config, self.bank = config, bank
        self.out = Path(config.out_dir)
        self.checkpoint_path, self.log_path = self.out / "checkpoint.pt", self.out / "distill.json"
        missing = sorted(set(config.weights) - set(bank.streams))
        if missing:
            raise ValueError(f"weights name sources the bank lacks: {missing} (it has {sorted(bank.streams)})")
        longest = max(config.layer_batch[1], config.logit_batch[1])
        short = sorted(n for n, w in config.weights.items() if w > 0 and bank.streams[n].size < longest)
        if short:
            raise ValueError(f"weights give a weight to sources shorter than a window of {longest} tokens: {short}")
        if resume and not self.checkpoint_path.is_file():
            raise FileNotFoundError(f"resume: {self.checkpoint_path} does not exist")
        if not resume and self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"out_dir {self.out} is not empty: resume the run there or choose a new folder")
        self.device = torch.device(device)
        self.autocast = config.bf16 and self.device.type == "cuda"
        self.student = make_student(teacher, config).to(self.device)
        self.teacher = teacher.to(self.device, torch.bfloat16 if self.autocast else torch.float32).eval()
        self.params = trainable(self.student)
        self.rng = np.random.default_rng(config.seed)
        self.stage, self.step = 0, 0
        self.optimizer = self._optimizer()
        self.log = {"config": asdict(config), "provenance": provenance or {}, "steps": [], "stages": {}}
        self.seconds = 0.0
        if resume:
            self._restore()
        else:
            if config.init is not None:
                self.log["provenance"]["init"] = self._start_from(config.init)
            self.out.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def _start_from(self, delta: str) -> dict:
        """Copy a delta's tensors into the trained parameters (its hash checked, every tensor placed);
        returns what the run records of it."""
        from ..pretrained import read_delta

        tensors, info = read_delta(delta)
        lora_info = info["lora"]
        if (lora_info["rank"], lora_info["alpha"]) != (self.config.lora_rank, self.config.lora_alpha):
            raise ValueError(
                f"init {delta} has adapters of rank {lora_info['rank']} and alpha {lora_info['alpha']}, this run "
                f"{self.config.lora_rank} and {self.config.lora_alpha}"
            )
        if sorted(tensors) != sorted(map(delta_name, self.params)):
            raise ValueError(f"init {delta} holds other tensors than this run trains")
        for name, p in self.params.items():
            p.copy_(tensors[delta_name(name)])
        return {"delta": str(delta), "sha256": info["sha256"], "stages": info["trained"]["stages"]}

    def _optimizer(self) -> torch.optim.AdamW:
        lr = self.config.layer_lr if self.stage == 0 else self.config.logit_lr
        return torch.optim.AdamW(self.params.values(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def _steps(self) -> int:
        return self.config.layer_steps if self.stage == 0 else self.config.logit_steps

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def layer_step(self, ids: Tensor) -> dict[str, float]:
        """One step of stage 1 on ids [B, T]: each TTT layer imitates its attention (backward per layer)."""
        with self._autocast():
            records = record_attention(self.teacher, ids)
        if self.step == 0 and not self.config.attention_window:  # a hybrid's TTT branch starts at zero
            self._calibrate(records)
        errors = []
        for block, (inputs, outputs) in zip(self.student.model.layers, records):
            with self._autocast():
                y, _ = block.ttt(inputs)
            target = outputs.float()
            error = (y.float() - target).pow(2).mean() / target.pow(2).mean()
            (error / len(records)).backward()
            errors.append(error.item())
        return {"loss": float(np.mean(errors)), "first_layer": errors[0], "last_layer": errors[-1]}

    @torch.no_grad()
    def _calibrate(self, records: list[tuple[Tensor, Tensor]]) -> None:
        """Before the first step: scale each TTT layer's output norm so that its output has the root mean
        square of the attention's on this batch (the converted layer starts far off in scale, and
        AdamW moves a weight by about lr per step)."""
        for block, (inputs, outputs) in zip(self.student.model.layers, records):
            with self._autocast():
                y, _ = block.ttt(inputs)
            factor = (outputs.float().pow(2).mean() / y.float().pow(2).mean()).sqrt()
            block.ttt.post_norm.weight.mul_(factor)
            block.ttt.post_norm.bias.mul_(factor)

    def logit_step(self, ids: Tensor) -> dict[str, float]:
        """One step of stage 2 on ids [B, T]: the student's next-token distribution against the teacher's."""
        with torch.no_grad(), self._autocast():
            teacher_logits = self.teacher(ids, use_cache=False).logits
        with self._autocast():
            student_logits = self.student(ids, use_cache=False).logits
        kl = kl_per_token(teacher_logits, student_logits).mean()
        kl.backward()
        with torch.no_grad():
            target = ids[:, 1:]
            ce = {
                name: F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten()).item()
                for name, logits in (("student_ce", student_logits), ("teacher_ce", teacher_logits))
            }
        return {"loss": kl.item(), **ce}

    def run(self) -> str:
        """Train until both stages end ("done") or `max_minutes` pass ("paused"), with a checkpoint."""
        start = time.perf_counter()
        limit = None if self.config.max_minutes is None else 60 * self.config.max_minutes
        while self.stage < len(STAGES):
            if self.step >= self._steps():
                self._end_stage()
                continue
            self._train_step()
            if limit is not None and time.perf_counter() - start > limit:  # after a step: every call progresses
                self._save()
                return "paused"
            if self.step % self.config.checkpoint_every == 0:
                self._save()
        self._save()
        return "done"

    def _train_step(self) -> None:
        rows, length = self.config.layer_batch if self.stage == 0 else self.config.logit_batch
        lr = learning_rate(self.step, self._steps(), self.optimizer.defaults["lr"], self.config.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        ids = self.bank.sample(self.rng, rows, length, self.config.weights).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        record = (self.layer_step if self.stage == 0 else self.logit_step)(ids)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"stage {STAGES[self.stage]}, step {self.step}: the loss is {record['loss']}")
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.step += 1
        record = {"stage": STAGES[self.stage], "step": self.step, "lr": lr, "grad_norm": norm.item(), **record}
        self.log["steps"].append({**record, "tokens": rows * length, "seconds": round(seconds, 4)})
        _write_json(self.log_path, self.log)

    def _end_stage(self) -> None:
        name = STAGES[self.stage]
        steps = [s for s in self.log["steps"] if s["stage"] == name]
        self.log["stages"][name] = {
            "steps": len(steps),
            "tokens": sum(s["tokens"] for s in steps),
            "seconds": round(sum(s["seconds"] for s in steps), 2),
        }
        self.stage, self.step = self.stage + 1, 0
        if self.stage < len(STAGES):
            self.optimizer = self._optimizer()
        self._save()

    def _save(self) -> None:
        """The checkpoint, written to a temporary file and renamed: a reader sees the old one or the new one."""
        state = {
            "stage": self.stage,
            "step": self.step,
            "seconds": self.seconds,
            "params": {name: p.detach().cpu() for name, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }
        tmp = self.checkpoint_path.with_name(".checkpoint.pt.tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)
        _write_json(self.log_path, self.log)

    def _restore(self) -> None:
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if sorted(state["params"]) != sorted(self.params):
            raise ValueError(f"{self.checkpoint_path} holds other parameters than this configuration trains")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["params"][name])
        self.stage, self.step, self.seconds = state["stage"], state["step"], state["seconds"]
        if self.stage < len(STAGES):
            self.optimizer = self._optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log = json.loads(self.log_path.read_text(encoding="utf-8"))
        # steps recorded after the checkpoint are trained again, exactly as before: drop their records

        def kept(stage: str) -> bool:
            return STAGES.index(stage) < self.stage

        log["steps"] = (
            [
                s
                for s in log["steps"]
                if kept(s["stage"]) or (s["stage"] == STAGES[self.stage] and s["step"] <= self.step)
            ]
            if self.stage < len(STAGES)
            else log["steps"]
        )
        log["stages"] = {name: v for name, v in log["stages"].items() if kept(name)}
        self.log = {**log, "config": asdict(self.config)}


def environment() -> dict:
    """Where a run ran: the commit (the variable GIT_COMMIT, where a copy of the tree has no .git),
    versions, the GPU, the host."""
    import subprocess

    import transformers

    commit = os.environ.get("GIT_COMMIT")
    if not commit:
        try:
            found = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            )
            commit = found.stdout.strip() if found.returncode == 0 else None
        except OSError:  # no git on this machine
            commit = None
    info = {
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info
