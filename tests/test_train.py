import importlib.machinery
import importlib.util
import json
import logging
import math
import socket
import statistics
import sys
import types
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ttt_helpers import generate as G
from ttt_helpers import train as T
from ttt_helpers.compat import output_cache
from ttt_helpers.data import decode_bytes, encode_bytes
from ttt_helpers.model import TTTConfig, TTTForCausalLM

REPO = Path(__file__).resolve().parent.parent
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    mini_batch_size=4,
    window=8,
    batch_size=2,
    warmup_steps=2,
    eval_after=False,
    checkpoint_every=None,
    progress=False,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path: Path, **overrides) -> T.TrainConfig:
    return T.TrainConfig(**{**TINY, "out_dir": str(tmp_path / "run"), **overrides})


def random_docs(rng: torch.Generator, lengths=(41, 70, 25, 95, 33, 58)) -> list[torch.Tensor]:
    """Documents of different lengths, so rows switch documents at different steps."""
    return [torch.randint(0, 256, (n,), generator=rng) for n in lengths]


def tiny_ttt(kind: str = "linear", backbone: str = "transformer") -> TTTForCausalLM:
    config = TTTConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        ttt_layer_type=kind,
        mini_batch_size=4,
        backbone=backbone,
    )
    return TTTForCausalLM(config).eval()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- state passing


@pytest.mark.parametrize("kind,backbone", [("linear", "transformer"), ("mlp", "transformer"), ("linear", "mamba")])
def test_state_passing_equals_one_long_forward(rng, kind, backbone):
    """Each row's segments, read with the state passed on and reset at document switches, give
    the logits of one forward over each document."""
    model, window = tiny_ttt(kind, backbone), 8
    stream = T.SegmentStream(random_docs(rng), window, rows=3, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    rows = [[] for _ in range(3)]  # per row: list of (inputs, logits, reset)
    cache = None
    with torch.no_grad():
        for _ in range(12):
            batch = stream.next_batch()
            cache = T.carry_state(model, cache, batch.reset)
            out = model(input_ids=batch.inputs, cache=cache, use_cache=True)
            cache = output_cache(out).detach()
            for r in range(3):
                rows[r].append((batch.inputs[r], out.logits[r], bool(batch.reset[r])))
        switches = 0
        for segments in rows:
            starts = [i for i, (_, _, reset) in enumerate(segments) if reset] + [len(segments)]
            assert starts[0] == 0
            switches += len(starts) - 2
            for a, b in zip(starts, starts[1:]):
                ids = torch.cat([s[0] for s in segments[a:b]])
                expected = model(input_ids=ids[None]).logits[0]
                got = torch.cat([s[1] for s in segments[a:b]])
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert switches >= 3  # the check covered per-row resets


def test_segment_stream_reads_documents_in_order_and_splits_rows_by_rank(rng):
    docs, window = random_docs(rng), 8
    single = T.SegmentStream(docs, window, rows=4, seed=3)
    ranks = [T.SegmentStream(docs, window, rows=2, seed=3, rank=r, world_size=2) for r in range(2)]
    text = [[] for _ in range(4)]
    for _ in range(15):
        full = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        for r in range(2):  # rank r reads global rows r, r + 2
            assert torch.equal(parts[r].inputs, full.inputs[r::2])
            assert torch.equal(parts[r].reset, full.reset[r::2])
        torch.testing.assert_close(full.targets[:, :-1], full.inputs[:, 1:])
        for row in range(4):
            if full.reset[row]:
                text[row].append([])
            text[row][-1].append(full.inputs[row])
    # every row reads each of its documents from the start, segment after segment
    for row in text:
        for read in row:
            ids = torch.cat(read)
            assert any(torch.equal(d[: ids.numel()], ids) for d in docs)


def test_segment_stream_takes_the_process_rank_by_default(rng, monkeypatch):
    import ttt_helpers.train.stream as stream

    docs = random_docs(rng)
    monkeypatch.setattr(stream, "rank_and_world_size", lambda: (1, 2))  # as in a process group of two
    default, explicit = (
        T.SegmentStream(docs, 8, rows=2, seed=3),
        T.SegmentStream(docs, 8, rows=2, seed=3, rank=1, world_size=2),
    )
    for _ in range(5):
        assert torch.equal(default.next_batch().inputs, explicit.next_batch().inputs)


def test_cache_reset_interval_resets_every_k_segments(rng):
    doc = torch.randint(0, 256, (8 * 10 + 1,), generator=rng)  # 10 segments
    stream = T.SegmentStream([doc], 8, rows=1, reset_interval=3)
    resets = [bool(stream.next_batch().reset[0]) for _ in range(12)]
    # new document at 0 and 10, interval resets at 3, 6, 9
    assert [i for i, r in enumerate(resets) if r] == [0, 3, 6, 9, 10]


# ---------------------------------------------------------------- the loop, resume, checkpoints


def test_training_lowers_the_loss_and_transformer_ignores_state_passing(tmp_path, rng, caplog):
    pattern = torch.randint(0, 256, (12,), generator=rng)
    docs = [pattern.repeat(20) for _ in range(4)]  # learnable: a repeated 12-byte pattern
    ttt = T.train(tiny_config(tmp_path / "ttt", max_steps=30, lr=1e-2), train_docs=docs)
    with caplog.at_level(logging.WARNING, logger="ttt_helpers.train"):
        llama = T.train(tiny_config(tmp_path / "llama", model="transformer", max_steps=30, lr=1e-2), train_docs=docs)
    assert "state_passing applies to TTT models only" in caplog.text
    for result in (ttt, llama):
        assert len(result.losses) == 30 and all(math.isfinite(x) for x in result.losses)
        # the median of the last 5 steps: at lr 1e-2 a single step can spike
        assert statistics.median(result.losses[-5:]) < 0.5 * sum(result.losses[:5]) / 5
    n_ttt = sum(p.numel() for p in ttt.model.parameters())
    n_llama = sum(p.numel() for p in llama.model.parameters())
    assert abs(n_ttt - n_llama) / n_llama < 0.1  # the baseline has the same size


@pytest.mark.parametrize("model", ["ttt-linear", "transformer"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, rng, model):
    docs = random_docs(rng)
    full = T.train(tiny_config(tmp_path / "full", model=model, max_steps=9), train_docs=docs)

    def crash(step, record):
        if step == 5:
            raise KeyboardInterrupt  # killed after the checkpoint of step 4, losing step 5

    cut = tiny_config(tmp_path / "cut", model=model, max_steps=9, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        T.train(cut, train_docs=docs, callback=crash)
    assert T.latest_checkpoint(cut.out_dir).name == "step-00000004"
    resumed = T.train(
        tiny_config(tmp_path / "cut", model=model, max_steps=9, checkpoint_every=4, resume=True), train_docs=docs
    )
    assert resumed.start_step == 4 and resumed.step == 9
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[4:]), atol=1e-6, rtol=0)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_checkpoint_contents_and_fine_tuning(tmp_path, rng):
    docs = random_docs(rng)
    config = tiny_config(tmp_path, max_steps=4, checkpoint_every=2, keep_checkpoints=1)
    first = T.train(config, train_docs=docs)
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-00000004"]  # keep_checkpoints=1 removed step 2
    ckpt = folders[0]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["tokens"] == 4 * 2 * 8 and state["world_size"] == 1
    saved = torch.load(ckpt / "rank-0.pt", weights_only=True)
    assert {"stream", "cache", "torch_rng", "python_rng"} <= set(saved)
    assert len(saved["cache"]["states"]) == 1  # one layer's carried TTT state
    assert (ckpt / "model" / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    tuned = T.train(
        tiny_config(tmp_path / "tuned", max_steps=1, from_pretrained=str(ckpt / "model"), lr=1e-9), train_docs=docs
    )
    for a, b in zip(tuned.model.state_dict().values(), first.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # it started from the saved weights


def test_a_failing_save_leaves_no_partial_checkpoint(tmp_path, rng, monkeypatch):
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(Path(path).name)
        if len([c for c in calls if c == "optimizer.pt"]) == 2:  # the second checkpoint fails half-way
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    config = tiny_config(tmp_path, max_steps=6, checkpoint_every=2)
    with pytest.raises(OSError, match="disk full"):
        T.train(config, train_docs=random_docs(rng))
    parent = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in parent.iterdir()) == ["step-00000002"]  # no step-4, no temporary folder
    assert sorted(p.name for p in (parent / "step-00000002").iterdir()) == [
        "manifest.json",
        "model",
        "optimizer.pt",
        "rank-0.pt",
        "trainer_state.json",
    ]


# ---------------------------------------------------------------- logging and evaluation


def test_jsonl_log_and_evaluation_plot(tmp_path, rng, caplog):
    docs = random_docs(rng)
    val = [torch.randint(0, 256, (200,), generator=rng)]
    config = tiny_config(tmp_path, max_steps=4, eval_after=True, eval_lengths=20)
    with caplog.at_level(logging.INFO, logger="ttt_helpers.train"):
        result = T.train(config, train_docs=docs, val_docs=val)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["event"] == "start" and records[0]["config"]["window"] == 8
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss"] for r in steps] == result.losses
    assert [r["tokens"] for r in steps] == [16, 32, 48, 64]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    evaluation = records[-1]
    assert evaluation["event"] == "eval" and evaluation["train_window"] == 8
    lg = result.length_generalization
    assert evaluation["lengths"] == [r.length for r in lg.rows] and lg.rows[0].length == 4
    assert lg.rows[-1].length == 80 and evaluation["perplexities"][-1] is not None
    assert (tmp_path / "run" / "length_generalization.png").stat().st_size > 1000
    if importlib.util.find_spec("tensorboard") is None:
        assert "TensorBoard is not installed" in caplog.text
    else:
        assert (tmp_path / "run" / "tensorboard").is_dir()


def fake_wandb(online_fails: bool) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.calls = []

    class Run:
        def log(self, values, step):
            module.calls.append(("log", step, values))

        def finish(self):
            module.calls.append(("finish",))

    def init(mode, **kwargs):
        module.calls.append(("init", mode))
        if mode == "online" and online_fails:
            raise ConnectionError("no network")
        return Run()

    module.init = init
    return module


@pytest.mark.parametrize("offline,online_fails", [(True, False), (False, True)])
def test_wandb_is_optional_and_never_fails_offline(tmp_path, rng, monkeypatch, offline, online_fails):
    wandb = fake_wandb(online_fails)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    result = T.train(
        tiny_config(tmp_path, max_steps=2, wandb=not offline, wandb_offline=offline), train_docs=random_docs(rng)
    )
    inits = [c[1] for c in wandb.calls if c[0] == "init"]
    assert inits == (["offline"] if offline else ["online", "offline"])
    logged = [c[2]["loss"] for c in wandb.calls if c[0] == "log" and "loss" in c[2]]
    assert logged == result.losses and wandb.calls[-1] == ("finish",)


def test_wandb_missing_is_a_clear_error_only_when_asked(tmp_path, rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install wandb"):
        T.train(tiny_config(tmp_path, max_steps=1, wandb=True), train_docs=random_docs(rng))
    T.train(tiny_config(tmp_path, max_steps=1), train_docs=random_docs(rng))


# ---------------------------------------------------------------- precision


def test_bf16_autocast_trains_the_transformer_close_to_float32(tmp_path, rng):
    """precision="bf16" on the CPU runs the forward pass and the loss under CPU autocast: finite
    losses near those of float32, yet not equal to them; "auto" is float32 on the CPU, bit for bit."""
    docs, runs = random_docs(rng), {}
    for precision in ("auto", "fp32", "bf16"):
        config = tiny_config(
            tmp_path / precision, model="transformer", state_passing=False, max_steps=4, precision=precision
        )
        runs[precision] = T.train(config, train_docs=docs)
        start = read_jsonl(tmp_path / precision / "run" / "metrics.jsonl")[0]
        assert start["precision"] == ("bf16" if precision == "bf16" else "fp32")
    assert runs["auto"].losses == runs["fp32"].losses
    bf16, fp32 = runs["bf16"].losses, runs["fp32"].losses
    assert all(math.isfinite(x) for x in bf16) and bf16 != fp32
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.05
    assert all(p.dtype == torch.float32 for p in runs["bf16"].model.parameters())  # weights stay float32


@pytest.mark.parametrize("model", ["ttt-linear", "ttt-mlp"])
def test_bf16_autocast_trains_ttt_models_with_a_float32_state(model, tmp_path, rng):
    """Under autocast the TTT layers get bf16 inputs and keep a float32 state, with state passing too."""
    docs, losses = random_docs(rng), {}
    for precision in ("fp32", "bf16"):
        config = tiny_config(tmp_path / precision, model=model, max_steps=3, precision=precision)
        result = T.train(config, train_docs=docs)
        losses[precision] = result.losses
    assert all(math.isfinite(x) for x in losses["bf16"]) and losses["bf16"] != losses["fp32"]
    assert max(abs(a - b) for a, b in zip(losses["bf16"], losses["fp32"])) < 0.05
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_precision_choices(capsys):
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'"):
        T.TrainConfig(**TINY, precision="fp16")
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--precision", "fp16"])
    assert exit_info.value.code == 2 and "precision" in capsys.readouterr().err
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto, fp32, bf16 = (T.TrainConfig(**TINY, precision=p) for p in ("auto", "fp32", "bf16"))
    assert T.bf16_autocast(auto, cuda) and not T.bf16_autocast(auto, cpu)
    assert not T.bf16_autocast(fp32, cuda) and T.bf16_autocast(bf16, cpu)


# ---------------------------------------------------------------- several processes


def _ddp_worker(rank: int, port: int, out: str, docs: list[torch.Tensor]) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    # gloo on the CPU, also where a GPU is present (two processes, which need not have a GPU each)
    config = T.TrainConfig(**{**TINY, "out_dir": out, "max_steps": 4, "checkpoint_every": 4, "device": "cpu"})
    result = T.train(config, train_docs=docs)
    torch.save({"params": result.model.state_dict(), "losses": result.losses}, Path(out) / f"worker-{rank}.pt")


def test_a_process_without_its_gpu_is_a_clear_error(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))  # one past the last GPU
    with pytest.raises(ValueError, match=r"device: cuda:\d+ \(LOCAL_RANK=\d+\) does not exist"):
        T.train(tiny_config(tmp_path, max_steps=1, device="cuda"), train_docs=random_docs(rng))
    assert not (tmp_path / "run").exists()  # nothing written before the check


def test_two_processes_over_gloo_keep_identical_parameters(tmp_path, rng):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    # fork: the workers inherit the imported modules instead of importing torch and transformers again
    mp.start_processes(_ddp_worker, args=(port, str(out), random_docs(rng)), nprocs=2, join=True, start_method="fork")
    workers = [torch.load(out / f"worker-{r}.pt", weights_only=True) for r in range(2)]
    assert len(workers[0]["losses"]) == 4 and all(math.isfinite(x) for x in workers[0]["losses"])
    assert workers[0]["losses"] == workers[1]["losses"]  # the logged loss is the mean over processes
    for name, value in workers[0]["params"].items():
        assert torch.equal(value, workers[1]["params"][name]), name
    ckpt = T.latest_checkpoint(out)
    caches = [torch.load(ckpt / f"rank-{r}.pt", weights_only=True)["cache"]["states"][0][0] for r in range(2)]
    assert caches[0].shape[0] == 2 and not torch.equal(caches[0], caches[1])  # each process its own documents
    assert json.loads((ckpt / "trainer_state.json").read_text())["tokens"] == 4 * 2 * 2 * 8


# ---------------------------------------------------------------- streaming


def test_chat_keeps_the_state_between_turns(capsys):
    torch.manual_seed(0)
    model = tiny_ttt()
    fed = []
    forward = model.forward

    def recording_forward(input_ids=None, **kwargs):
        fed.append(input_ids[0])
        return forward(input_ids=input_ids, **kwargs)

    model.forward = recording_forward
    chat = G.Chat(model, temperature=0.0)
    first = chat.turn("ROMEO: hello\n", max_new_tokens=7)
    second = chat.turn("JULIET: hi\n", max_new_tokens=5)
    assert capsys.readouterr().out == first + "\n" + second + "\n"
    ids = torch.cat(fed)
    p1, p2 = encode_bytes("ROMEO: hello\n"), encode_bytes("JULIET: hi\n")
    assert ids.numel() == p1.numel() + 7 + p2.numel() + 5 == chat.cache.seen_tokens
    assert torch.equal(ids[: p1.numel()], p1) and torch.equal(ids[p1.numel() + 7 : -5], p2)
    assert decode_bytes(ids[p1.numel() : p1.numel() + 7]) == first
    # the persisted state is the state after reading the whole conversation at once
    with torch.no_grad():
        once = output_cache(forward(input_ids=ids[None], use_cache=True))
    for a, b in zip(chat.cache.states, once.states):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_chat_loop_takes_turns_until_an_empty_line(capsys):
    chat = G.Chat(tiny_ttt(), temperature=0.0)
    lines = iter(["hello", "again", ""])
    chat.loop(max_new_tokens=3, read=lambda prompt: next(lines))
    assert chat.cache.seen_tokens == len("hello\n") + 3 + len("again\n") + 3
    assert capsys.readouterr().out.count("\n") >= 2  # each reply ends its line


def test_stream_generate_works_for_the_transformer_baseline_and_rejects_bad_input(tmp_path):
    llama = T.build_model(T.TrainConfig(**{**TINY, "model": "transformer"}), 256).eval()
    cache = G.new_cache(llama)
    text = "".join(G.stream_generate(llama, None, "To be", 6, cache, generator=torch.Generator().manual_seed(0)))
    assert cache.get_seq_length() == 5 + 6 and len(text) >= 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(G.stream_generate(llama, None, "x", 0))
    with pytest.raises(ValueError, match="prompt"):
        next(G.stream_generate(llama, None, "", 3))
    with pytest.raises(ValueError, match="temperature"):
        next(G.stream_generate(llama, None, "x", 3, temperature=-1))


# ---------------------------------------------------------------- configuration and bad input


def test_help_documents_every_config_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in fields(T.TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "--config" in out and "--no-state-passing" in out


def test_config_files_and_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: ttt-mlp\nwindow: 32\nlr: 1e-3\ncache_reset_interval: 4\n")
    config = T.parse_config(["--config", str(path), "--window", "64", "--no-state-passing", "--grad-clip", "none"])
    assert (config.model, config.window, config.lr, config.cache_reset_interval) == ("ttt-mlp", 64, 1e-3, 4)
    assert config.state_passing is False and config.grad_clip is None
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps(config.to_dict()))
    assert T.TrainConfig.from_file(as_json) == config
    assert T.TrainConfig(preset="125m").hidden_size == 768
    for shipped in sorted((REPO / "configs").glob("*")):
        T.TrainConfig.from_file(shipped)  # every config in the repository is valid


@pytest.mark.parametrize(
    "values,message",
    [
        ({"window": 8, "mini_batch_size": 16}, "window .8. must be a multiple of mini_batch_size .16."),
        ({"window": 24, "mini_batch_size": 16}, "multiple of mini_batch_size"),
        ({"window": 1, "model": "transformer"}, "window must be >= 2"),
        ({"model": "rnn"}, "model must be one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"cache_reset_interval": 0}, "cache_reset_interval must be >= 1 or None"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"preset": "7b"}, "preset must be one of"),
        ({"hidden_size": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"window": "long"}, "window must be a int"),
        ({"state_passing": "maybe"}, "state_passing must be true or false"),
        ({"window_size": 64, "stepz": 3}, r"unknown config keys \['stepz', 'window_size'\]"),
    ],
)
def test_bad_config_values_raise(values, message):
    with pytest.raises(ValueError, match=message):
        T.TrainConfig.from_dict(values)


def test_bad_files_and_data_raise(tmp_path, rng):
    bad = tmp_path / "bad.yaml"
    bad.write_text("window: 64\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['learning_rate'\]"):
        T.TrainConfig.from_file(bad)
    (tmp_path / "run.toml").write_text("window = 64\n")
    with pytest.raises(ValueError, match="must end in .yaml, .yml or .json"):
        T.TrainConfig.from_file(tmp_path / "run.toml")
    with pytest.raises(ValueError, match="at least one document"):
        T.train(tiny_config(tmp_path), train_docs=[])
    with pytest.raises(ValueError, match="no document has the window . 1 = 9 tokens"):
        T.train(tiny_config(tmp_path), train_docs=[torch.arange(8), torch.arange(5)])
    with pytest.raises(ValueError, match="1-D LongTensor"):
        T.SegmentStream([torch.rand(20)], 8, rows=1)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        T.train(tiny_config(tmp_path, resume=True), train_docs=random_docs(rng))
    T.train(tiny_config(tmp_path, max_steps=2, checkpoint_every=2), train_docs=random_docs(rng))
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \['lr'\]"):
        T.train(tiny_config(tmp_path, max_steps=4, resume=True, lr=1.0), train_docs=random_docs(rng))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = T.TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    rates = [T.learning_rate(s, config) for s in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert T.learning_rate(110, config) == pytest.approx(1e-4)
