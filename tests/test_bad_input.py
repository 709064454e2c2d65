"""Bad input to any public function is a ValueError or TypeError that names the argument, raised
before any work is done or any file is written."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers import adapt, data, generate, layers, metrics, ops, pretrained, transplant
from ttt_helpers import train as T
from ttt_helpers.model import TTTConfig, TTTForCausalLM

REPO = Path(__file__).resolve().parent.parent
NAN, INF = math.nan, math.inf
B, H, T_, D, BS = 1, 2, 8, 4, 4
TINY_TRAIN = dict(
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    mini_batch_size=4,
    window=8,
    batch_size=2,
    warmup_steps=1,
    eval_after=False,
    checkpoint_every=None,
    progress=False,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_ttt(vocab: int = 32) -> TTTForCausalLM:
    torch.manual_seed(0)
    config = TTTConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mini_batch_size=4,
        bos_token_id=None,
        eos_token_id=None,
    )
    return TTTForCausalLM(config).eval()


def tiny_llama(vocab: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def docs(n: int = 4, length: int = 40) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (length,), generator=gen) for _ in range(n)]


def op_inputs(kind: str = "linear") -> dict:
    """Good arguments of ops.ttt_continue."""
    gen = torch.Generator().manual_seed(0)
    x = lambda *shape: torch.randn(*shape, generator=gen) * 0.5
    params = (
        (x(B, H, D, D), x(B, H, 1, D))
        if kind == "linear"
        else (x(B, H, D, 4 * D), x(B, H, 1, 4 * D), x(B, H, 4 * D, D), x(B, H, 1, D))
    )
    return dict(
        kind=kind,
        XQ=x(B, H, T_, D),
        XK=x(B, H, T_, D),
        XV=x(B, H, T_, D),
        eta=torch.full((B, H, T_), 0.1),
        state=params + tuple(torch.zeros_like(p) for p in params),
        position=1,  # inside a mini-batch: the first tokens run step by step, not through ttt_linear's checks
        ln_weight=torch.ones(H, D),
        ln_bias=torch.zeros(H, D),
        mini_batch_size=BS,
    )


# ---------------------------------------------------------------- NaN, inf and wrong types in numbers

CONFIG_CASES = [
    ({"ttt_base_lr": NAN}, ValueError, "ttt_base_lr must be a finite number"),
    ({"ttt_base_lr": INF}, ValueError, "ttt_base_lr must be a finite number"),
    ({"ttt_base_lr": "1"}, TypeError, "ttt_base_lr must be a number"),
    ({"rms_norm_eps": NAN}, ValueError, "rms_norm_eps must be a finite number"),
    ({"rms_norm_eps": 0.0}, ValueError, "rms_norm_eps must be > 0"),
    ({"rms_norm_eps": -1e-6}, ValueError, "rms_norm_eps must be > 0"),
    ({"initializer_range": INF}, ValueError, "initializer_range must be a finite number"),
    ({"initializer_range": 0}, ValueError, "initializer_range must be > 0"),
    ({"use_cache": "yes"}, TypeError, "use_cache must be True or False"),
    (
        {"vocab_size": 97, "pad_token_id": 97},
        ValueError,
        r"pad_token_id must be None or a token id in \[0, 97\), got 97",
    ),
    ({"pad_token_id": -1}, ValueError, r"pad_token_id must be None or a token id in \[0, 32000\), got -1"),
    ({"pad_token_id": 1.0}, ValueError, r"pad_token_id must be None or a token id"),
]


@pytest.mark.parametrize("kwargs,error,match", CONFIG_CASES)
def test_ttt_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        TTTConfig(**kwargs)


LAYER_CASES = [
    ({"base_lr": NAN}, ValueError, "base_lr must be a finite number"),
    ({"base_lr": INF}, ValueError, "base_lr must be a finite number"),
    ({"eps": NAN}, ValueError, "eps must be a finite number"),
    ({"eps": 0}, ValueError, "eps must be > 0"),
    ({"eps": "1e-6"}, TypeError, "eps must be a number"),
    ({"mini_batch_size": 4.0}, TypeError, "mini_batch_size must be an int"),
    ({"num_heads": "2"}, TypeError, "num_heads must be an int"),
    ({"hidden_size": 16.0}, TypeError, "hidden_size must be an int"),
    ({"use_gate": 1}, TypeError, "use_gate must be True or False"),
]


@pytest.mark.parametrize("kwargs,error,match", LAYER_CASES)
@pytest.mark.parametrize("cls", [layers.TTTLinear, layers.TTTMLP])
def test_layer_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**{"hidden_size": 16, "num_heads": 2, "mini_batch_size": 4, **kwargs})


TRAIN_CONFIG_CASES = [
    ({"lr": NAN}, ValueError, "lr must be a finite number"),
    ({"lr": INF}, ValueError, "lr must be a finite number"),
    ({"grad_clip": NAN}, ValueError, "grad_clip must be a finite number"),
    ({"grad_clip": INF}, ValueError, "grad_clip must be a finite number"),
    ({"weight_decay": NAN}, ValueError, "weight_decay must be a finite number"),
    ({"weight_decay": INF}, ValueError, "weight_decay must be a finite number"),
    ({"min_lr_ratio": NAN}, ValueError, "min_lr_ratio must be a finite number"),
    ({"beta1": NAN}, ValueError, "beta1 must be a finite number"),
    ({"beta2": NAN}, ValueError, "beta2 must be a finite number"),
    ({"ttt_base_lr": NAN}, ValueError, "ttt_base_lr must be a finite number"),
    ({"ttt_base_lr": -1.0}, ValueError, "ttt_base_lr must be > 0"),
    ({"max_steps": "3"}, TypeError, "max_steps must be an int"),
    ({"window": 64.5}, TypeError, "window must be an int"),
    ({"batch_size": True}, TypeError, "batch_size must be an int"),
    ({"lr": "0.1"}, TypeError, "lr must be a number"),
    ({"resume": "yes"}, TypeError, "resume must be True or False"),
    ({"out_dir": 3}, TypeError, "out_dir must be a str"),
    ({"out_dir": ""}, ValueError, "out_dir must be a non-empty string"),
    ({"eval_lengths": 1}, ValueError, "eval_lengths must be >= 2"),
    ({"seed": -1}, ValueError, "seed must be >= 0"),
    ({"device": "gpu0"}, ValueError, "device must be 'auto' or a torch device"),
    ({"resume": True, "overwrite": True}, ValueError, "resume and overwrite exclude each other"),
]


@pytest.mark.parametrize("kwargs,error,match", TRAIN_CONFIG_CASES)
def test_train_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        T.TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--lr", "nan"], "lr must be a finite number"),
        (["--grad-clip", "inf"], "grad_clip must be a finite number"),
        (["--window", "64.5"], "window must be a int"),
        (["--max-steps", "three"], "max_steps must be a int"),
    ],
)
def test_command_line_values_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        T.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and re_search(match, err)


CLI_TINY = ["--hidden-size", "16", "--intermediate-size", "32", "--num-layers", "1", "--num-heads", "2"]
CLI_TINY += ["--window", "8", "--mini-batch-size", "4", "--batch-size", "2", "--warmup-steps", "1"]
CLI_TINY += ["--no-eval-after", "--no-progress", "--no-tensorboard", "--max-steps", "2"]


def _used_run(out: Path) -> list[str]:
    T.train(
        T.TrainConfig(**{**TINY_TRAIN, "out_dir": str(out), "max_steps": 2, "checkpoint_every": 2}), train_docs=docs()
    )
    return ["--out-dir", str(out)]


def _corrupt_run(out: Path) -> list[str]:
    argv = _used_run(out)
    (T.latest_checkpoint(out) / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match="no checkpoint in out_dir can be read"):
        T.train(T.TrainConfig(**{**TINY_TRAIN, "out_dir": str(out), "resume": True}), train_docs=docs())
    return argv + ["--resume"]


def _file(out: Path) -> list[str]:
    out.write_text("")
    return ["--out-dir", str(out)]


def _no_checkpoint(out: Path) -> list[str]:
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    return ["--out-dir", str(out), "--resume"]


def _bad_yaml(out: Path) -> list[str]:
    path = out.parent / "config.yaml"
    path.write_text("lr: [0.1\nwindow: 8\n")
    return ["--config", str(path), "--out-dir", str(out)]


@pytest.mark.parametrize(
    "setup,match",
    [
        (_used_run, r"out_dir .* is not empty .*--resume"),
        (_no_checkpoint, r"resume=True but .*checkpoints holds no checkpoint"),
        (_file, r"out_dir .* is a file, not a folder"),
        (_corrupt_run, r"every checkpoint .* was found unreadable .*corrupt-step-00000002"),
        (_bad_yaml, r"config file .*config.yaml is not valid YAML"),
    ],
    ids=["not_empty", "no_checkpoint", "a_file", "every_checkpoint_corrupt", "bad_yaml"],
)
def test_a_run_folder_or_config_file_that_cannot_serve_is_a_usage_error(setup, match, tmp_path, capsys, monkeypatch):
    """One `error: ...` line and exit status 2, as argparse reports a bad option: no traceback."""
    monkeypatch.setattr(T.loop, "play_documents", lambda config, tokenizer=None: (docs(), []))
    argv = setup(tmp_path / "run")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        T.main(CLI_TINY + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and re_search(match, lines[0]), err
    assert "Traceback" not in err


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


# ---------------------------------------------------------------- the streaming path checks its inputs


def _replace(kwargs: dict, **changes) -> dict:
    return {**kwargs, **changes}


def _state_with(kind: str, i: int, value) -> tuple:
    state = list(op_inputs(kind)["state"])
    state[i] = value
    return tuple(state)


STREAM_CASES = [
    ("XQ", lambda a: _replace(a, XQ=a["XQ"][:, :, :0]), ValueError, r"XQ must hold at least one token"),
    ("XQ", lambda a: _replace(a, XQ=a["XQ"][0]), ValueError, r"XQ must be a 4-D tensor"),
    ("XQ", lambda a: _replace(a, XQ=a["XQ"].long()), ValueError, "XQ must be a floating-point tensor"),
    ("XK", lambda a: _replace(a, XK=a["XK"][:, :, :3]), ValueError, r"XK must have shape \[1, 2, 8, 4\]"),
    ("XV", lambda a: _replace(a, XV=a["XV"].double()), ValueError, "XV must have dtype torch.float32"),
    ("eta", lambda a: _replace(a, eta=a["eta"][..., :2]), ValueError, r"eta must have shape \[1, 2, 8\]"),
    ("ln_weight", lambda a: _replace(a, ln_weight=torch.ones(D)), ValueError, r"ln_weight must have shape \[2, 4\]"),
    ("state", lambda a: _replace(a, state=a["state"][:2]), ValueError, "state of a TTT-linear layer must be 4 tensors"),
    ("state", lambda a: _replace(a, state=a["state"][0]), ValueError, "state of a TTT-linear layer must be 4 tensors"),
    (
        "state",
        lambda a: _replace(a, state=_state_with("linear", 0, torch.zeros(2, H, D, D))),
        ValueError,
        r"state\[0\] \(W0\) must have shape \[1, 2, 4, 4\]",
    ),
    (
        "state",
        lambda a: _replace(a, state=_state_with("linear", 3, torch.zeros(B, H, D))),
        ValueError,
        r"state\[3\] \(grad_b0\) must have the shape of b0",
    ),
    ("position", lambda a: _replace(a, position=1.5), TypeError, "position must be an int"),
    ("position", lambda a: _replace(a, position=4), ValueError, r"position must be in \[0, 3\]"),
    ("position", lambda a: _replace(a, position=-1), ValueError, r"position must be in \[0, 3\]"),
    ("mini_batch_size", lambda a: _replace(a, mini_batch_size=0), ValueError, "mini_batch_size must be an int >= 1"),
    ("eps", lambda a: _replace(a, eps=NAN), ValueError, "eps must be a finite number"),
]


@pytest.mark.parametrize(
    "name,change,error,match", STREAM_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(STREAM_CASES)]
)
def test_ttt_continue(name, change, error, match):
    with pytest.raises(error, match=match):
        ops.ttt_continue(**change(op_inputs("linear")))


def test_ttt_continue_checks_an_mlp_state_too():
    with pytest.raises(ValueError, match=r"state\[5\] \(grad_b1\) must have the shape of b1"):
        ops.ttt_continue(**_replace(op_inputs("mlp"), state=_state_with("mlp", 5, torch.zeros(B, H, 1, D))))


def test_a_step_checks_its_position():
    a = op_inputs("linear")
    tok = slice(0, 1)
    args = (a["XQ"][:, :, tok], a["XK"][:, :, tok], a["XV"][:, :, tok], a["eta"][:, :, 0], a["state"])
    with pytest.raises(TypeError, match="position must be an int"):
        ops.ttt_linear_step(*args, 0.5, a["ln_weight"], a["ln_bias"], ops.default_token_idx(BS))
    with pytest.raises(ValueError, match=r"position must be in \[0, 3\]"):
        ops.ttt_linear_step(*args, 4, a["ln_weight"], a["ln_bias"], ops.default_token_idx(BS))


@pytest.mark.parametrize("cls", [layers.TTTLinear, layers.TTTMLP])
def test_forward_stream(cls):
    layer = cls(16, 2, mini_batch_size=4, impl="reference")
    x = torch.randn(1, 5, 16)
    state = layer.initial_stream_state(1)
    with pytest.raises(ValueError, match=r"x must hold at least one row and one token"):
        layer.forward_stream(x[:, :0], state, 0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer.forward_stream(x.tolist(), state, 0)
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        layer.forward_stream(x.long(), state, 0)
    with pytest.raises(TypeError, match="position must be an int"):
        layer.forward_stream(x, state, 1.5)
    with pytest.raises(ValueError, match=r"position must be in \[0, 3\]"):
        layer.forward_stream(x, state, 4)
    with pytest.raises(ValueError, match=r"state of a TTT-\w+ layer must be"):
        layer.forward_stream(x, state[: len(state) // 2], 0)
    with pytest.raises(ValueError, match=r"state\[0\] \(W\d\) must have shape \[2, "):
        layer.forward_stream(torch.randn(2, 5, 16), state, 0)  # a state of batch 1 for 2 rows
    mask, ends = torch.ones(1, 5, dtype=torch.bool), torch.tensor([5])
    with pytest.raises(TypeError, match="padding must be a Padding"):
        layer.forward_stream(x, state, 0, padding=(mask, ends))
    with pytest.raises(ValueError, match=r"padding.mask must be a bool tensor \[1, 5\]"):
        layer.forward_stream(x, state, 0, padding=layers.Padding(mask.long(), ends))
    with pytest.raises(ValueError, match=r"padding.ends must be an int64 tensor \[1\]"):
        layer.forward_stream(x, state, 0, padding=layers.Padding(mask, ends.int()))
    with pytest.raises(ValueError, match="position must be 0 with padding"):
        layer.forward_stream(x, state, 1, padding=layers.Padding(mask, ends))
    with pytest.raises(ValueError, match=r"state of a TTT-\w+ layer must be .*forward takes the parameters only"):
        layer(x, state)  # the stream state passed to forward
    with pytest.raises(TypeError, match="batch_size must be an int"):
        layer.initial_stream_state(1.0)


# ---------------------------------------------------------------- ids outside the vocabulary


def test_ids_outside_the_vocabulary_name_the_argument():
    ttt, llama = tiny_ttt(vocab=32), tiny_llama(vocab=32)
    with pytest.raises(ValueError, match=r"input_ids holds token id 32, outside the vocabulary \[0, 32\)"):
        ttt(input_ids=torch.tensor([[1, 32]]))
    with pytest.raises(ValueError, match=r"input_ids holds token id -1"):
        ttt(input_ids=torch.tensor([[-1, 2]]))
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor"):
        ttt(input_ids=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D tensor"):
        ttt(input_ids=torch.tensor([1, 2]))
    bad = torch.tensor([1, 2, 40, 3, 4])
    with pytest.raises(ValueError, match=r"token_ids\[0\] holds token id 40"):
        metrics.perplexity(llama, bad, window=4, stride=4)
    with pytest.raises(ValueError, match=r"documents\[1\] holds token id 40"):
        metrics.per_position_loss(llama, [bad.clamp(max=5), bad], length=4)
    with pytest.raises(ValueError, match=r"documents\[0\] holds token id 40"):
        metrics.length_generalization(llama, [bad.repeat(4)], train_window=4)
    with pytest.raises(ValueError, match=r"input_ids holds token id 40"):
        transplant.record_attention(llama, [0], bad[None])
    with pytest.raises(ValueError, match=r"prompt \(encoded\) holds token id 104"):
        generate.stream_generate(ttt, None, "hi", 3)  # bytes 104 and 105 in a 32-token model
    with pytest.raises(ValueError, match=r"ids must be byte values"):
        data.decode_bytes([65, 300])
    with pytest.raises(ValueError, match=r"ids holds token id 300"):
        data.decode_bytes(torch.tensor([65, 300]))


# ---------------------------------------------------------------- wrong types name the argument

TYPE_CASES = [
    (
        "perplexity window",
        lambda m: metrics.perplexity(m, torch.arange(20), window=6.5, stride=2),
        TypeError,
        "window must be an int",
    ),
    (
        "perplexity stride",
        lambda m: metrics.perplexity(m, torch.arange(20), window=6, stride="2"),
        TypeError,
        "stride must be an int",
    ),
    (
        "perplexity docs",
        lambda m: metrics.perplexity(m, 5, window=6, stride=2),
        TypeError,
        "token_ids must be a 1-D LongTensor",
    ),
    (
        "perplexity model",
        lambda m: metrics.perplexity("gpt2", torch.arange(20), window=6, stride=2),
        TypeError,
        "model must be a torch.nn.Module",
    ),
    (
        "per_position length",
        lambda m: metrics.per_position_loss(m, [torch.arange(20)], length=4.0),
        TypeError,
        "length must be an int",
    ),
    (
        "length_generalization n",
        lambda m: metrics.length_generalization(m, [torch.arange(20)], train_window=4, n=3.0),
        TypeError,
        "n must be an int",
    ),
    (
        "length_generalization ratios",
        lambda m: metrics.length_generalization(m, [torch.arange(20)], train_window=4, ratios=[1, NAN]),
        ValueError,
        "ratios must be a non-empty list of positive numbers",
    ),
    (
        "latency batch",
        lambda m: metrics.latency(m, batch=1.0, prompt_len=4, new_tokens=2, repeats=1),
        TypeError,
        "batch must be an int",
    ),
    (
        "latency vocab",
        lambda m: metrics.latency(m, batch=1, prompt_len=4, new_tokens=2, repeats=1, vocab_size=1000),
        ValueError,
        "vocab_size .1000. must be at most",
    ),
    (
        "total_variation",
        lambda m: metrics.total_variation([0.1], torch.zeros(3)),
        TypeError,
        "p_logits must be a torch.Tensor",
    ),
    (
        "kl ints",
        lambda m: metrics.kl_divergence(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
        ValueError,
        "must be floating-point logits",
    ),
    ("encode_bytes", lambda m: data.encode_bytes(b"abc"), TypeError, "text must be a str"),
    ("encode_tokens", lambda m: data.encode_tokens(None, lambda t: t), TypeError, "text must be a str"),
    (
        "train_val_split titles",
        lambda m: data.train_val_split([], "Hamlet"),
        TypeError,
        "val_titles must be a tuple of play titles",
    ),
    (
        "train_val_split docs",
        lambda m: data.train_val_split(["Hamlet"]),
        TypeError,
        "documents must be a list of Documents",
    ),
    (
        "ttt_from_attention",
        lambda m: transplant.ttt_from_attention(m.model.layers[0].self_attn, mini_batch_size=4.0),
        TypeError,
        "mini_batch_size must be an int",
    ),
    (
        "transplant indices",
        lambda m: transplant.record_attention(m, [0.0], torch.zeros(1, 4, dtype=torch.long)),
        ValueError,
        "layer_indices must be non-empty indices",
    ),
    ("transplant layers", lambda m: transplant.transplant(m, [0]), TypeError, "layers must be a dict"),
    (
        "imitate steps",
        lambda m: transplant.imitate(
            layers.TTTLinear(16, 2, 4), torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), steps="3"
        ),
        TypeError,
        "steps must be an int",
    ),
    (
        "imitate lr",
        lambda m: transplant.imitate(
            layers.TTTLinear(16, 2, 4), torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), steps=1, lr=NAN
        ),
        ValueError,
        "lr must be a finite number",
    ),
    (
        "imitate shapes",
        lambda m: transplant.imitate(layers.TTTLinear(16, 2, 4), torch.zeros(2, 4, 16), torch.zeros(2, 3, 16), steps=1),
        ValueError,
        "targets must have the shape of inputs",
    ),
    (
        "stream_generate steps",
        lambda m: generate.stream_generate(m, None, "x", "3"),
        TypeError,
        "max_new_tokens must be an int",
    ),
    (
        "stream_generate temperature",
        lambda m: generate.stream_generate(m, None, "x", 3, temperature=NAN),
        ValueError,
        "temperature must be a finite number",
    ),
    (
        "stream_generate top_k",
        lambda m: generate.stream_generate(m, None, "x", 3, top_k=2.5),
        TypeError,
        "top_k must be an int",
    ),
    (
        "Chat temperature",
        lambda m: generate.Chat(m, temperature=INF),
        ValueError,
        "temperature must be a finite number",
    ),
    ("new_cache", lambda m: generate.new_cache(m, batch_size=0), ValueError, "batch_size must be >= 1"),
    ("SegmentStream window", lambda m: T.SegmentStream(docs(), 8.0, rows=1), TypeError, "window must be an int"),
    (
        "SegmentStream docs",
        lambda m: T.SegmentStream(torch.arange(40), 8, rows=1),
        TypeError,
        "documents must be a list",
    ),
    ("learning_rate", lambda m: T.learning_rate(1.5, T.TrainConfig()), TypeError, "step must be an int"),
    (
        "load_pretrained dtype",
        lambda m: pretrained.load_pretrained("x", dtype="float16"),
        TypeError,
        "dtype must be a floating-point torch.dtype",
    ),
    ("ops mini_batch_size", lambda m: ops.default_token_idx(2.0), TypeError, "mini_batch_size must be an int"),
]


@pytest.mark.parametrize("name,call,error,match", TYPE_CASES, ids=[c[0] for c in TYPE_CASES])
def test_wrong_types_and_values(name, call, error, match):
    model = tiny_llama(vocab=256)
    with pytest.raises(error, match=match):
        call(model)


# ---------------------------------------------------------------- adapt_lora

ADAPT_CASES = [
    ({"lr": NAN}, ValueError, "lr must be a finite number"),
    ({"lr": INF}, ValueError, "lr must be a finite number"),
    ({"steps": "3"}, TypeError, "steps must be an int"),
    ({"rank": 2.0}, TypeError, "rank must be an int"),
    ({"chunk_tokens": 8.5}, TypeError, "chunk_tokens must be an int"),
    ({"seed": None}, TypeError, "seed must be an int"),
    ({"callback": "print"}, TypeError, "callback must be a function"),
    ({"target_modules": 3}, TypeError, "target_modules must be a list of names"),
]


class ByteTokenizer:
    pad_token_id, eos_token_id = None, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": data.encode_bytes(text).tolist()}


@pytest.mark.parametrize("kwargs,error,match", ADAPT_CASES)
def test_adapt_lora(kwargs, error, match):
    model = tiny_llama(vocab=256)
    with pytest.raises(error, match=match):
        adapt.adapt_lora(model, ByteTokenizer(), "some text", **kwargs)


def test_adapt_lora_names_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"text encodes to token id 115, outside the model's vocabulary \[0, 32\)"):
        adapt.adapt_lora(tiny_llama(vocab=32), ByteTokenizer(), "some text")


def test_adapt_lora_says_an_adapter_is_still_attached():
    model = tiny_llama(vocab=256)
    adapt.adapt_lora(model, ByteTokenizer(), "some text", steps=1)  # a cell run once, its result never unloaded
    with pytest.raises(ValueError, match=r"still has a LoRA adapter attached .*result.unload\(\)"):
        adapt.adapt_lora(model, ByteTokenizer(), "some text", steps=1)  # the same cell run again


# ---------------------------------------------------------------- training: NaN, run folders, checkpoints


def train_config(tmp_path: Path, **overrides) -> T.TrainConfig:
    return T.TrainConfig(**{**TINY_TRAIN, "out_dir": str(tmp_path / "run"), **overrides})


def test_a_diverging_run_stops_before_its_nan_checkpoint(tmp_path, monkeypatch):
    real = T.segment_loss

    def nan_at_step_3(model, batch, cache):
        loss, cache = real(model, batch, cache)
        return (loss * math.nan if nan_at_step_3.calls == 2 else loss), cache

    def counting(model, batch, cache):
        try:
            return nan_at_step_3(model, batch, cache)
        finally:
            nan_at_step_3.calls += 1

    nan_at_step_3.calls = 0
    monkeypatch.setattr(T.loop, "segment_loss", counting)
    config = train_config(tmp_path, max_steps=6, checkpoint_every=1)
    with pytest.raises(T.TrainingDiverged, match=r"step 3: the loss is nan .* no checkpoint of it was written"):
        T.train(config, train_docs=docs())
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_a_diverging_run_exits_non_zero_from_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = (
        "import sys, torch; from ttt_helpers import train as T; "
        "T.loop.play_documents = lambda config, tokenizer=None: ([torch.randint(0, 256, (60,)) for _ in range(4)], []); "
        "T.main(sys.argv[1:])"
    )
    out = tmp_path / "run"
    args = ["--max-steps", "3", "--lr", "1e30", "--grad-clip", "none", "--warmup-steps", "0", "--no-eval-after"]
    args += ["--hidden-size", "16", "--intermediate-size", "32", "--num-layers", "1", "--num-heads", "2"]
    args += ["--window", "8", "--mini-batch-size", "4", "--batch-size", "2", "--checkpoint-every", "1"]
    run = subprocess.run(
        [sys.executable, "-c", code, *args, "--out-dir", str(out), "--no-progress", "--no-tensorboard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "error: step " in run.stderr and "the loss is" in run.stderr and "Traceback" not in run.stderr
    for ckpt in (out / "checkpoints").glob("step-*"):  # only the steps before the divergence
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] < 3


def test_a_rerun_into_a_used_run_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    T.train(train_config(tmp_path, max_steps=4, checkpoint_every=2), train_docs=docs())
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    metrics_before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"out_dir .* is not empty .*--resume.*--overwrite"):
        T.train(train_config(tmp_path, max_steps=2, checkpoint_every=1), train_docs=docs())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # nothing touched
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics_before
    T.train(train_config(tmp_path, max_steps=2, checkpoint_every=1, overwrite=True), train_docs=docs())
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in records].count("start") == 1  # one run in the log
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"overwrite=True refuses to clear .*notes.txt"):
        T.train(train_config(tmp_path, max_steps=2, overwrite=True), train_docs=docs())
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        T.train(T.TrainConfig(**{**TINY_TRAIN, "out_dir": str(file)}), train_docs=docs())


def flip_a_bit(path: Path) -> None:
    """Flip one bit near the end of a file (in the tensors' data: the file still loads)."""
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda c: (c / "model" / "model.safetensors").write_bytes(b"\x00" * 4), r"model cannot be read"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": 4, '), r"trainer_state.json cannot be read"),
        (
            lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
            r"optimizer.pt cannot be read",
        ),
        (lambda c: (c / "rank-0.pt").write_bytes(b"garbage"), r"rank-0.pt cannot be read"),
        (lambda c: flip_a_bit(c / "model" / "model.safetensors"), r"model.safetensors does not match the sha256"),
        (lambda c: flip_a_bit(c / "optimizer.pt"), r"optimizer.pt does not match the sha256"),
    ],
    ids=["safetensors", "json", "optimizer", "rank", "safetensors_bit", "optimizer_bit"],
)
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, caplog, damage, match):
    T.train(train_config(tmp_path, max_steps=4, checkpoint_every=2), train_docs=docs())
    newest = T.latest_checkpoint(tmp_path / "run")
    damage(newest)
    with caplog.at_level("WARNING", logger="ttt_helpers.train"):
        resumed = T.train(train_config(tmp_path, max_steps=5, checkpoint_every=2, resume=True), train_docs=docs())
    assert re_search(match, caplog.text) and "step-00000004" in caplog.text
    assert resumed.start_step == 2 and resumed.step == 5
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["corrupt-step-00000004", "step-00000004", "step-00000005"]


def test_resume_with_every_checkpoint_corrupt_names_the_files(tmp_path):
    T.train(train_config(tmp_path, max_steps=2, checkpoint_every=2), train_docs=docs())
    (T.latest_checkpoint(tmp_path / "run") / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match=r"no checkpoint in out_dir can be read:\n.*step-00000002.trainer_state.json"):
        T.train(train_config(tmp_path, max_steps=4, resume=True), train_docs=docs())
    with pytest.raises(
        ValueError, match=r"every checkpoint .* was found unreadable .*corrupt-step-00000002.*--overwrite"
    ):
        T.train(train_config(tmp_path, max_steps=4, resume=True), train_docs=docs())


def test_evaluation_settings_are_checked_before_the_first_step(tmp_path):
    steps = []
    short = [torch.randint(0, 256, (4,))]  # the shortest evaluation length, 4 tokens, needs 5
    with pytest.raises(ValueError, match=r"val_docs are too short for every length"):
        T.train(
            train_config(tmp_path, eval_after=True),
            train_docs=docs(),
            val_docs=short,
            callback=lambda *a: steps.append(a),
        )
    with pytest.raises(ValueError, match=r"val_docs\[0\] holds token id 300"):
        T.train(train_config(tmp_path, eval_after=True), train_docs=docs(), val_docs=[torch.full((50,), 300)])
    with pytest.raises(ValueError, match=r"val_docs\[0\] must be a 1-D LongTensor"):
        T.train(train_config(tmp_path, eval_after=True), train_docs=docs(), val_docs=[torch.rand(50)])
    with pytest.raises(ValueError, match=r"train_docs\[1\] holds token id 256"):
        T.train(train_config(tmp_path), train_docs=[docs()[0], torch.full((50,), 256)])
    assert steps == [] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the model cache


def fake_conversion(monkeypatch, tmp_path):
    """pretrained._convert_smollm2 on a tiny Llama and a fake tokenizer, counting conversions."""
    tiny = tiny_llama(vocab=16)
    calls = []

    class Tokenizer:
        def save_pretrained(self, folder):
            Path(folder, "tokenizer_config.json").write_text("{}")

    def from_pretrained(*args, **kwargs):
        calls.append(args)
        return tiny

    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(pretrained.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(pretrained.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    return calls


def test_a_partial_model_cache_is_repaired(monkeypatch, tmp_path):
    calls = fake_conversion(monkeypatch, tmp_path)
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a conversion cut short: no weights, no tokenizer
    pretrained._convert_smollm2(target)
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in target.iterdir()}
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary folders left
    assert pretrained._is_converted(target) and len(calls) == 1


# ---------------------------------------------------------------- import ttt_helpers registers the model


def test_import_ttt_helpers_is_enough_to_load_a_saved_model(tmp_path):
    tiny_ttt().save_pretrained(tmp_path / "ttt")
    code = (
        "import ttt_helpers; from transformers import AutoModelForCausalLM; "
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ttt')!r}); print(type(model).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "TTTForCausalLM"


# ---------------------------------------------------------------- Triton's interpreter


def test_triton_interpret_set_after_triton_was_imported_is_named():
    """Triton reads TRITON_INTERPRET at its first import: set later, the interpreter cannot run
    the kernels, and the launch says so instead of failing inside triton."""
    pytest.importorskip("triton")
    code = (
        "import os, torch, triton; os.environ['TRITON_INTERPRET'] = '1'\n"
        "from ttt_helpers import kernels\n"
        "x = torch.randn(1, 2, 16, 16)\n"
        "try:\n"
        "    kernels.ttt_linear_prefill(x, x, x, torch.rand(1, 2, 16) * 0.01, torch.zeros(1, 2, 16, 16),\n"
        "        torch.zeros(1, 2, 1, 16), torch.ones(2, 16), torch.zeros(2, 16), mini_batch_size=16)\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "TRITON_INTERPRET=1 was set after triton was imported" in run.stdout
    assert "set the variable before triton is first imported" in run.stdout
