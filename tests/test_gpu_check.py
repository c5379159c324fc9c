"""`make gpu-check` (benchmarks/gpu_check.py): its CPU smoke runs the same checks and the 3B part's code path at a tiny
shape (slow tier: ~1-2 min on 2 cores); on a CUDA machine the full check runs (gpu marker, skipped without CUDA)."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, *args, timeout=900):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert p.returncode == 0, f"gpu_check failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return json.loads((tmp_path / "gpu_check.json").read_text()), p.stdout


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    res, out = _run(tmp_path, "--device", "cpu", "--small-3b")
    names = [c["check"] for c in res["checks"]]
    assert res["passed"] and all(c["ok"] for c in res["checks"]) and "14/14 checks passed" in out
    assert any("RosePO (per-pair epsilon) differs from DPO" in n for n in names)
    chain = res["qlora_chain"]
    assert chain["dpo"]["margins"][0] == 0 and chain["dpo"]["moved"]["lora_A"] > 0.99 and chain["rosepo_vs_dpo_max_abs_diff"] > 0
    b = res["llama_3b"]
    assert b["shape"]["vocab_size"] == 128256 and b["sft"]["steps"] == 2 and b["dpo"]["steps"] == 2
    assert b["sft"]["estimate_gb"] > 0 and b["sft"]["peak_allocated_gb"] is None        # no CUDA: no memory reading
    assert b["sft_tokens_per_example"] <= 256


@pytest.mark.gpu
def test_gpu_check_on_cuda(tmp_path):
    res, out = _run(tmp_path, timeout=1200)
    assert res["passed"], [c for c in res["checks"] if not c["ok"]]
    assert res["llama_3b"]["sft"]["peak_allocated_gb"] > 1 and res["llama_3b"]["sft"]["seconds_per_step_median"] > 0
    print(out[-2000:])
