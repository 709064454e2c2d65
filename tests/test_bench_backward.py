"""benchmarks.bench_backward on the CPU (Triton's interpreter): a dry run writes every section
without an error, its gradient checks pass, and a later call with --only runs those sections
again and keeps the others."""

import json

import pytest

from benchmarks import bench_backward


# torch's own modules warn when the compiled Llama first imports inductor (torch.utils.mkldnn)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_dry_run_writes_every_section_and_resumes_by_section(tmp_path):
    out = tmp_path / "backward.json"
    bench_backward.main(["--dry-run", "--out", str(out)])
    results = json.loads(out.read_text())
    assert "errors" not in results, results.get("errors")
    assert set(results["section_provenance"]) == set(bench_backward.SECTIONS) <= set(results)
    assert results["gradients"] and all(row["ok"] for row in results["gradients"])
    bench_backward.main(["--dry-run", "--only", "gradients", "--out", str(out)])
    again = json.loads(out.read_text())
    for name in bench_backward.SECTIONS[1:]:  # kept as they were
        assert again[name] == results[name] and again["section_provenance"][name] == results["section_provenance"][name]
    assert all(row["ok"] for row in again["gradients"])


def test_bad_arguments_stop_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        bench_backward.main(["--dry-run", "--only", "gradients,nonsense"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"provenance": {"gpu": "NVIDIA H100 80GB HBM3"}}))
    with pytest.raises(SystemExit, match="holds a run on NVIDIA H100"):
        bench_backward.main(["--dry-run", "--only", "gradients", "--out", str(other)])
    assert json.loads(other.read_text()) == {"provenance": {"gpu": "NVIDIA H100 80GB HBM3"}}
