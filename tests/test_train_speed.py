"""benchmarks.train_speed on the CPU: a dry run times every cell it can and records why another
failed, a second call skips the cells already timed, and bad arguments stop it before any work."""

import json

import pytest

from benchmarks import train_speed


def test_dry_run_times_each_cell_once_and_resumes(tmp_path):
    out = tmp_path / "speed.json"
    models = "llama,ttt-linear,ttt-mlp-m,deltanet"
    results = train_speed.main(["--dry-run", "--models", models, "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    cells = results["cells"]
    assert set(cells) == {f"{m} eager 2x32" for m in models.split(",")}
    for name in ("llama", "ttt-linear", "ttt-mlp-m"):
        cell = cells[f"{name} eager 2x32"]
        assert "error" not in cell and cell["tokens_per_s"] > 0 and len(cell["losses"]) == 2
    deltanet = cells["deltanet eager 2x32"]
    assert "error" in deltanet or deltanet["tokens_per_s"] > 0  # without fla installed: why, recorded
    again = train_speed.main(["--dry-run", "--models", models, "--out", str(out)])
    assert again["cells"] == cells and len(again["visits"]) == 2  # nothing timed twice


def test_bad_arguments_stop_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        train_speed.main(["--dry-run", "--models", "gpt5"])
    with pytest.raises(SystemExit):
        train_speed.main(["--dry-run", "--steps", "0"])
    with pytest.raises(SystemExit):
        train_speed.main(["--dry-run", "--shapes", "8by2048"])
    assert train_speed.shape_list("8x2048,2x8192") == ((8, 2048), (2, 8192))
    assert not list(tmp_path.iterdir())
