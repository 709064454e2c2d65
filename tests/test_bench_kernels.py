"""benchmarks.bench_kernels on the CPU: a dry run (tiny shapes, Triton's interpreter) runs every
section and writes a JSON with each section's provenance and seed; --only keeps the other
sections. benchmarks/reproduce_inference.sh refuses bad arguments before it runs anything."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import bench_kernels

REPRODUCE = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_inference.sh"


def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "kernels.json"
    results = bench_kernels.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert set(bench_kernels.SECTIONS) <= set(results) and set(results["section_provenance"]) == set(
        bench_kernels.SECTIONS
    )
    for name in bench_kernels.SECTIONS:
        assert "errors" not in (results[name] if isinstance(results[name], dict) else {}), name
    assert not [k for k in results.get("errors", {})], results.get("errors")
    assert all(row["ok"] for row in results["correctness"] + results["mlp_correctness"])
    prefill = results["model_prefill"]["prefill"]
    assert all(isinstance(row["ttt_kernel_ms"], float) and "errors" not in row for row in prefill)
    decode = results["model_decode"]["decode"][0]
    assert decode["floor"]["ttt_bytes"] > decode["floor"]["weights_bytes_ttt"] > 0
    assert decode["ttt_kernel_padded_tokens_per_s"] > 0  # a left-padded batch, each row at its own position
    assert all(row["ok"] for row in results["mlp_state"]["rows"])
    steps = results["step"]["kernel"]  # every schedule and warp count, against float64
    assert {r["schedule"] for r in steps} == {"fused", "split"}
    assert all(r["rel_err_Z_float32_B1_H4_T1000"] < 1e-5 for r in steps)
    seeds = {prov["seed"] for prov in results["section_provenance"].values()}
    assert len(seeds) == 1 and results["provenance"]["seed"] in seeds
    assert results["provenance"]["packages"]["transformers"]  # the peers' versions are recorded
    for row in results["op"]:  # a spread over repeats, the bf16 products beside ours, the SDPA backend named
        spread = row["ours_ms_spread"]
        assert spread["min"] <= row["ours_ms"] == spread["median"] <= spread["max"]
        assert isinstance(row["ours_bf16_products_ms"], float) and row["sdpa_backend"] == "cpu"
    assert all(row["llama_eager_sdpa_backend"] == "cpu" for row in prefill)
    kept = results["op"]
    again = bench_kernels.main(["--dry-run", "--only", "decode", "--out", str(out), "--seed", "7"])
    assert again["op"] == kept and "decode" in again and again["section_provenance"]["decode"]["seed"] == 7


def test_only_names_the_sections():
    with pytest.raises(SystemExit, match="unknown section"):
        bench_kernels.main(["--dry-run", "--only", "model"])
    with pytest.raises(SystemExit, match="--decode-contexts"):
        bench_kernels.main(["--dry-run", "--only", "model_decode", "--decode-contexts", "2k"])
    assert bench_kernels.parse_lengths("16,2048") == (16, 2048)


def test_staggered_padding_puts_the_rows_at_every_position():
    from benchmarks.kernel_bench.model import staggered_padding

    mask = staggered_padding(torch.zeros(20, 18, dtype=torch.long), 16)
    assert (mask == 0).sum(1).tolist() == [i % 16 for i in range(20)] and mask[:, -1].all()
    with pytest.raises(ValueError, match="at least 16 tokens"):
        staggered_padding(torch.zeros(2, 8, dtype=torch.long), 16)


def test_reproduce_refuses_bad_arguments_before_any_work(tmp_path):
    def run(*args):
        return subprocess.run(["bash", str(REPRODUCE), *map(str, args)], capture_output=True, text=True)

    assert run().returncode == 2 and "usage" in run().stderr
    no_corpus = run(tmp_path, tmp_path / "model")
    assert no_corpus.returncode == 2 and "CORPUS must be a corpus folder" in no_corpus.stderr
    (tmp_path / "manifest.json").write_text("{}")
    existing = run(tmp_path, tmp_path)
    assert existing.returncode == 2 and "exists" in existing.stderr
    assert not (tmp_path / "model").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_benchmark_formulas():
    """The benchmark imports without a GPU; its FLOP and byte counts follow their formulas."""
    from benchmarks.kernel_bench import counts as bench

    B, H, T, D, b = 2, 3, 64, 16, 16
    per_minibatch = 3 * 2 * b * D * D + 2 * 2 * b * b * D  # three [b,D]x[D,D] and two b x b products
    assert bench.ttt_linear_flops(B, H, T, D, b) == B * H * (T // b) * per_minibatch
    assert bench.ttt_linear_bytes(B, H, T, D, 2, 4) == B * H * (T * (4 * D + 1) * 2 + 2 * (D * D + D) * 4)
    assert bench.sdpa_flops(B, H, T, D) == 2 * B * H * T * T * D
    F = 4 * D  # TTT-MLP: eight [b, D] x [D, F] products and four b x b blocks per mini-batch
    assert bench.ttt_mlp_flops(B, H, T, D, b, F) == B * H * (T // b) * (8 * 2 * b * D * F + 2 * b * b * (2 * D + 2 * F))
    assert bench.ttt_mlp_bytes(B, H, T, D, F, 2, 4) == B * H * (T * (4 * D + 1) * 2 + 2 * (2 * D * F + F + D) * 4)
    line = bench.roofline(flops=2e12, nbytes=1e9, peak_flops=1e15, peak_bytes=2e12, ms=4.0)
    assert line["bound"] == "compute"
    assert line["floor_ms"] == pytest.approx(2.0) and line["fraction_of_floor"] == pytest.approx(0.5)
    assert bench.roofline(flops=1e9, nbytes=4e9, peak_flops=1e15, peak_bytes=2e12, ms=4.0)["bound"] == "memory"
    few = bench.roofline(flops=2e12, nbytes=1e9, peak_flops=1e15, peak_bytes=2e12, ms=4.0, programs=12, sms=132)
    assert few["active_sms"] == 12 and few["per_sm_floor_ms"] == pytest.approx(2.0 * 132 / 12)  # 12 SMs at work
    many = bench.roofline(flops=2e12, nbytes=1e9, peak_flops=1e15, peak_bytes=2e12, ms=4.0, programs=512, sms=132)
    assert many["per_sm_floor_ms"] == pytest.approx(2.0)  # every SM at work: the whole GPU's floor
    assert bench.kv_cache_bytes(2, 10, 8, 2) == 2 * 2 * 10 * 8 * 2
    assert bench.model_decode_bytes(100, 7.0, 3) == 121
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench_kernels.main([])
    with pytest.raises(SystemExit, match="unknown section"):
        bench_kernels.main(["--only", "op,nonsense", "--dry-run"])
