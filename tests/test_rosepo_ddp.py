"""#11.4: RosePO under DDP, two CPU processes (gloo), launched with `accelerate launch`.

RosePO reads the policy's and the reference's log-probs from forward hooks. With a LoRA policy (train_dpo's adapter
path) the reference forward is the policy model itself with trl's "ref" adapter active. Under DDP, compute_loss gets
the DistributedDataParallel wrapper: hooking the wrapper and the module inside it made the policy forward fire twice,
so the "reference" was the policy again, the margin z was 0 and RosePO at ε > 0 trained exactly like DPO. Here the
same tiny policy trains 3 steps with trl's DPOTrainer, RosePO at ε = 0 and RosePO at ε > 0 (tests/ddp_rosepo_script.py).

Launcher: `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher runs several
CPU processes only through mpirun), so the test uses the torchrun launcher (`--multi_gpu`) with CUDA hidden and
`use_cpu=True` in the trainer arguments: accelerate then runs MULTI_CPU over gloo. The script records the world size
and the type compute_loss received, and the test checks both.
"""
import math, os, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    "rank -> the script's record ({run: {log, weights}}, world_size, wrapped, module); ~50 s on 2 busy cores."
    out = tmp_path_factory.mktemp("ddp")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(HERE / "ddp_rosepo_script.py"), str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, f"accelerate launch failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    print(f"accelerate launch: {time.time() - t0:.0f} s")
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)}


def _losses(rec, run): return [h["loss"] for h in rec[run]["log"] if "loss" in h]
def _margins(rec, run): return [h["rewards/margins"] for h in rec[run]["log"] if "rewards/margins" in h]
def _max_diff(a, b): return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_under_ddp(ddp_runs):
    r0, r1 = ddp_runs[0], ddp_runs[1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert all(v == ["DistributedDataParallel"] for v in r0["wrapped"].values()), r0["wrapped"]
    assert Path(r0["module"]).parent.name == "usermirror_nb"
    for run in ("dpo", "rosepo_eps0", "rosepo"):
        assert len(_losses(r0, run)) == 3 and all(math.isfinite(x) for x in _losses(r0, run))
        assert r0[run]["weights"].keys() == r1[run]["weights"].keys() and len(r0[run]["weights"]) == 12   # 2 layers x 3 modules x A, B
        assert _max_diff(r0[run]["weights"], r1[run]["weights"]) == 0       # gradients were all-reduced: the ranks agree


def test_rosepo_at_eps_0_is_trls_dpo_under_ddp(ddp_runs):
    r = ddp_runs[0]
    assert _losses(r, "rosepo_eps0") == pytest.approx(_losses(r, "dpo"), abs=1e-6)
    assert _margins(r, "rosepo_eps0") == pytest.approx(_margins(r, "dpo"), abs=1e-6)
    assert _max_diff(r["dpo"]["weights"], r["rosepo_eps0"]["weights"]) < 1e-6
    assert _margins(r, "dpo")[1] > 1e-3                      # the policy did leave the reference: a real margin after step 1


def test_rosepo_at_eps_above_0_differs_from_dpo_under_ddp(ddp_runs):
    "Step 1: policy = reference, z = 0, loss log 2 for any ε; its gradient already differs (1 - 2ε per pair), so later steps differ."
    r = ddp_runs[0]
    dpo, rose = _losses(r, "dpo"), _losses(r, "rosepo")
    assert dpo[0] == pytest.approx(math.log(2), abs=1e-6) and rose[0] == pytest.approx(math.log(2), abs=1e-6)
    assert _margins(r, "rosepo")[0] == pytest.approx(0.0, abs=1e-6)
    assert min(abs(a - b) for a, b in zip(dpo[1:], rose[1:])) > 1e-3, (dpo, rose)   # the old hooking: exactly equal
    assert _max_diff(r["dpo"]["weights"], r["rosepo"]["weights"]) > 1e-3           # the old hooking: 1.3e-7
    assert all(0.2 <= h["rosepo/epsilon"] <= 0.45 for h in r["rosepo"]["log"] if "rosepo/epsilon" in h)
