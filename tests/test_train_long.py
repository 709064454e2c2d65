"""benchmarks.train_long on the CPU: its control really turns the inner loop off, its held-out curve
is the mean loss at each position over the first windows, and a dry run writes a complete result."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks import train_long


def test_zero_learning_rate_control_keeps_the_initial_state(rng):
    torch.manual_seed(rng.initial_seed() % 2**31)
    model = train_long.build("ttt-linear-m-lr0", train_long.DRY_SHAPE, 256, 64).eval()
    ids = torch.randint(0, 256, (2, 40), generator=rng)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    for block, state in zip(model.model.layers, cache.states):
        assert block.ttt.base_lr == 0.0
        assert torch.equal(state[0], block.ttt.W0.expand_as(state[0])), f"seed {rng.initial_seed()}"


def test_heldout_curve_is_the_mean_loss_at_each_position_of_the_first_windows(rng):
    seed = rng.initial_seed()
    torch.manual_seed(seed % 2**31)
    model = train_long.build("llama", train_long.DRY_SHAPE, 256, 64).train()
    tokens = np.random.default_rng(seed).integers(1, 256, 3 * 128 + 50)
    result = train_long.evaluate(model, {"english": tokens}, 128, 5, "cpu", bins=127)["english"]
    with torch.no_grad():  # each window through one forward, the last logit dropped
        ids = torch.from_numpy(tokens[: 3 * 128].reshape(3, 128))
        logits = model(input_ids=ids, use_cache=False).logits.float()
        curve = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").double().mean(0)
    assert result["windows"] == 3 and model.training
    assert np.allclose(result["binned"], curve.numpy(), rtol=1e-5, atol=1e-6), f"seed {seed}"


def test_dry_run_writes_training_and_heldout_curves(tmp_path):
    out = tmp_path / "long.json"
    train_long.main(["--dry-run", "--model", "llama", "--out", str(out)])
    run = json.loads(out.read_text())["64"]["llama"]
    assert run["training"]["tokens"] == 256 and len(run["training"]["losses"]) == run["training"]["steps"]
    for kind in ("english", "code"):
        curve = run["heldout"][kind]
        assert len(curve["binned"]) == len(curve["bin_edges"]) - 1 == 255  # 4 x 64 tokens: 255 predictions
        assert all(0 < v < 10 for v in curve["binned"]) and curve["windows"] == 2
    assert set(run["decode"]) == {"B1_T64", "B1_T128", "B16_T64", "B16_T128"}
    assert all(d["ms_per_step"] > 0 for d in run["decode"].values() if isinstance(d, dict))
    assert not out.with_suffix(".json.partial").exists()


def test_bad_arguments_are_usage_errors():
    with pytest.raises(SystemExit):
        train_long.main(["--dry-run", "--model", "llama", "--context", "8"])
    with pytest.raises(SystemExit):
        train_long.main(["--model", "no-such-model"])
    with pytest.raises(SystemExit):
        train_long.main(["--dry-run", "--model", "llama", "--decode-lengths", "2k"])


def test_save_model_writes_a_loadable_model_and_never_overwrites(tmp_path):
    from ttt_helpers.model import TTTForCausalLM

    saved = tmp_path / "model"
    train_long.main(
        ["--dry-run", "--model", "ttt-linear-m", "--out", str(tmp_path / "r.json"), "--save-model", str(saved)]
    )
    model = TTTForCausalLM.from_pretrained(saved)
    assert (saved / "model.safetensors").is_file() and model.config.num_hidden_layers == train_long.DRY_SHAPE[
        "num_hidden_layers"
    ]
    before = (saved / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit):
        train_long.main(["--dry-run", "--model", "ttt-linear-m", "--save-model", str(saved)])
    assert (saved / "model.safetensors").stat().st_mtime_ns == before


def test_model_distances_checkpoint_needs_a_model_folder_and_a_corpus(tmp_path):
    from benchmarks import model_distances

    for argv in (["--checkpoint", str(tmp_path)], ["--checkpoint", str(tmp_path), "--corpus", str(tmp_path)]):
        with pytest.raises(SystemExit):
            model_distances.main(["--device", "cpu", *argv])
