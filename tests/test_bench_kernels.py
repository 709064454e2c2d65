"""benchmarks/bench_kernels.py on the CPU: a dry run (tiny shapes, Triton's interpreter) runs every
section and writes a JSON with each section's provenance; --only keeps the other sections."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernels.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_section(tmp_path):
    bench = load()
    out = tmp_path / "kernels.json"
    results = bench.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert set(bench.SECTIONS) <= set(results) and set(results["section_provenance"]) == set(bench.SECTIONS)
    for name in bench.SECTIONS:
        assert "errors" not in (results[name] if isinstance(results[name], dict) else {}), name
    assert not [k for k in results.get("errors", {})], results.get("errors")
    assert all(row["ok"] for row in results["correctness"] + results["mlp_correctness"])
    prefill = results["model_prefill"]["prefill"]
    assert all(isinstance(row["ttt_kernel_ms"], float) and "errors" not in row for row in prefill)
    decode = results["model_decode"]["decode"][0]
    assert decode["floor"]["ttt_bytes"] > decode["floor"]["weights_bytes_ttt"] > 0
    kept = results["op"]
    again = bench.main(["--dry-run", "--only", "decode", "--out", str(out)])
    assert again["op"] == kept and "decode" in again


def test_only_names_the_sections():
    with pytest.raises(SystemExit, match="unknown section"):
        load().main(["--dry-run", "--only", "model"])
