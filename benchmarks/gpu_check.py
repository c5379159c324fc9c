"""`make gpu-check`: the GPU training path on CUDA in one script (a few minutes on one H200) that downloads nothing.

    python3 benchmarks/gpu_check.py [--out DIR] [--skip-3b]     # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny  # the same checks on the CPU, without the 3B part

1. What the GPU machine lacks (trl, bitsandbytes, datasets and their dill/multiprocess, fastcore, and transformers /
   peft at the versions this project is tested with) is installed from `.gpu_wheels/` (`make gpu-wheels`, run where
   pip reaches PyPI; about 60 MB, carried to the GPU machine) into a private folder, only if something is missing.
2. nf4 QLoRA SFT -> DPO -> RosePO with the project's own `train_sft` / `train_dpo` on a randomly initialised 4-layer
   Llama with SmolLM2's tokenizer (no weights travel): finite losses, adapter weights that moved at the configured
   learning rates (DPO at dpo_lr 1e-5), adapters kept in fp32, DPO's first step at margin 0 (policy = its reference),
   and RosePO (per-pair epsilon) ending elsewhere than DPO.
3. A randomly initialised Llama-3.2-3B-shaped model (28 layers, hidden 3072, vocab 128,256, tied embeddings) saved
   as safetensors, loaded by `load_student(..., "qlora")` in nf4 and trained by `train_sft` / `train_dpo` at the paper
   profile's batch and length (finetune.batch_size x max_length, 8 x 1,024 by default): peak CUDA memory and seconds
   per optimizer step, beside `qlora_memory_gb`'s estimate for the same shape.

Writes `gpu_check.json` to --out (default: $OUT if set, else results/gpu_check/) and prints a summary; exits 1 if a
check failed. Nothing here asserts a time: speeds are printed and recorded.
"""
import argparse, dataclasses, importlib.util, json, math, os, platform, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                      # usermirror_nb from this checkout (the GPU machine has no install of it)
WHEELS = ROOT / ".gpu_wheels"
TOKENIZER_TAR = "smollm2-tokenizer.tar.gz"
NEEDED = ("trl", "bitsandbytes", "datasets", "fastcore")


def ensure_packages() -> list:
    "Install the carried wheels into a private folder when a needed package is missing (before transformers is imported)."
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing: return []
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu-check: {missing} not installed and no wheels in {WHEELS}: run `make gpu-wheels` where pip reaches "
                         "PyPI and carry .gpu_wheels/ to this machine")
    site = Path(tempfile.gettempdir()) / "usermirror_gpu_site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                    "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])   # for trl's subprocesses
    return missing


def tokenizer_dir(tmp: Path) -> Path:
    "SmolLM2-135M-Instruct's tokenizer: from the assets cache when it is there, else from the tarball `make gpu-wheels` packed."
    try:
        from usermirror_nb.assets import model_path
        p = model_path("smollm2-135m-instruct")
        if isinstance(p, Path) and (p / "tokenizer.json").exists(): return p
    except Exception:
        pass
    tar = WHEELS / TOKENIZER_TAR
    if not tar.exists(): raise SystemExit(f"gpu-check: no SmolLM2 tokenizer in the assets cache and no {tar}: run `make gpu-wheels`")
    out = tmp / "smollm2-tokenizer"
    with tarfile.open(tar) as t: t.extractall(out, filter="data")
    return out


def pack_tokenizer():
    "`make gpu-wheels`: SmolLM2's tokenizer files (no weights) as .gpu_wheels/smollm2-tokenizer.tar.gz."
    from usermirror_nb.assets import model_path
    p = model_path("smollm2-135m-instruct")
    WHEELS.mkdir(exist_ok=True)
    with tarfile.open(WHEELS / TOKENIZER_TAR, "w:gz") as t:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "generation_config.json", "LICENSE"):
            if (p / f).exists(): t.add(p / f, arcname=f)
    print(f"packed {WHEELS / TOKENIZER_TAR} ({(WHEELS / TOKENIZER_TAR).stat().st_size / 1e6:.1f} MB)")


class Checks:
    def __init__(self): self.rows = []
    def __call__(self, name: str, ok: bool, detail=""):
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}{': ' + str(detail) if detail != '' else ''}", flush=True)
        return ok


def random_llama(tok, out: Path, device: str, **shape) -> Path:
    "A randomly initialised Llama with the tokenizer's special ids, saved as safetensors (+ the tokenizer) to `out`."
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model.save_pretrained(out); tok.save_pretrained(out)
    del model
    return out


def sft_rows(n: int, words: int = 8):
    import pandas as pd
    from usermirror_nb.rationales import SYSTEM_PROMPT
    from usermirror_nb.scenes import LETTERS
    filler = " ".join(f"film{j}" for j in range(words))
    return pd.DataFrame([{"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": f"Scene {i}: {filler} [A] a [B] b [C] c [D] d"},
                                       {"role": "assistant", "content": f"Stimulus: curiosity.\nBehavior: [{LETTERS[i % 4]}]"}],
                          "scene_id": f"s{i}", "domain": "movielens", "choice_cnt": 4, "gt_pos": i % 4, "behavior_pos": i % 4,
                          "with_rationale": True} for i in range(n)])


def pref_rows(n: int, words: int = 8):
    import pandas as pd
    from usermirror_nb.rationales import SYSTEM_PROMPT
    from usermirror_nb.scenes import LETTERS
    filler = " ".join(f"film{j}" for j in range(words))
    return pd.DataFrame([{"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Scene {i}: {filler} [A] a [B] b [C] c [D] d"}],
                          "chosen": [{"role": "assistant", "content": f"Stimulus: curiosity.\nBehavior: [{LETTERS[i % 4]}]"}],
                          "rejected": [{"role": "assistant", "content": f"Stimulus: boredom.\nBehavior: [{LETTERS[(i + 1) % 4]}]"}],
                          "scene_id": f"s{i}", "domain": "movielens", "choice_cnt": 4, "gt_pos": i % 4, "chosen_pos": i % 4,
                          "rejected_pos": (i + 1) % 4, "chosen_entropy": 1.2, "rejected_entropy": 1.5, "chosen_prob": 0.15 + 0.1 * (i % 4),
                          "rejected_prob": 0.3, "diff_model_uncertainty": 0.1} for i in range(n)])


def n_tokens(tok, messages) -> int:
    return len(tok(tok.apply_chat_template(list(messages), tokenize=False), add_special_tokens=False).input_ids)


def fit_words(tok, target: int) -> int:
    "Filler words that make an SFT row about `target` tokens long (measured: its length is linear in the words)."
    a, b = n_tokens(tok, sft_rows(1, 0)["messages"][0]), n_tokens(tok, sft_rows(1, 200)["messages"][0])
    return max(0, int((target - a) * 200 / max(1, b - a)))


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def moved(after: dict, before: dict, part: str) -> float:
    ks = [k for k in before if part in k]
    return sum(int((after[k] != before[k]).sum()) for k in ks) / max(1, sum(before[k].numel() for k in ks))


def losses(folder: Path) -> list:
    return [h for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h]


def qlora_chain(tok_dir: Path, tmp: Path, device: str, check: Checks) -> dict:
    "Part 2: nf4 QLoRA SFT -> DPO -> RosePO on a random 4-layer Llama with the project's train_sft / train_dpo."
    import torch
    from usermirror_nb.config import FinetuneConfig
    from usermirror_nb.finetune import load_tokenizer, train_dpo, train_sft
    tok = load_tokenizer(str(tok_dir))
    base = random_llama(tok, tmp / "tiny", device, vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    fcfg = FinetuneConfig(method="qlora", lora_r=8, lora_alpha=16, lora_dropout=0.0, batch_size=4, max_length=512, sft_lr=1e-3,
                          sft_max_steps=4, dpo_max_steps=3, save_steps=1000, ablation=False)   # dpo_lr: the default (1e-5)
    t0 = time.time()
    sft = train_sft(str(base), sft_rows(16), fcfg, tmp / "sft", device=device)
    ls = [h["loss"] for h in losses(tmp / "sft")]
    check("SFT finished with finite losses", sft["complete"] and all(map(math.isfinite, ls)), [round(x, 4) for x in ls])
    a_sft = adapter(tmp / "sft")
    check("SFT adapter saved in fp32", all(v.dtype == torch.float32 for v in a_sft.values()), sorted({str(v.dtype) for v in a_sft.values()}))
    check("SFT moved lora_B (zero at init)", moved(a_sft, {k: torch.zeros_like(v) for k, v in a_sft.items()}, "lora_B") > 0.99)
    out = {"sft": {"steps": sft["steps"], "losses": ls, "seconds": sft["seconds"]}}
    for run, smoothed in (("dpo", False), ("dpo_smoothed", True)):
        card = train_dpo(str(base), tmp / "sft", pref_rows(12), fcfg, tmp / run, smoothed=smoothed, device=device)
        hist = losses(tmp / run)
        a = adapter(tmp / run)
        check(f"{run}: finite losses", card["complete"] and all(math.isfinite(h["loss"]) for h in hist), [round(h["loss"], 5) for h in hist])
        check(f"{run}: step 1 at margin 0 (the policy is its reference)", abs(hist[0]["rewards/margins"]) < 1e-4, hist[0]["rewards/margins"])
        mv = {p: round(moved(a, a_sft, p), 4) for p in ("lora_A", "lora_B")}
        check(f"{run}: adapter moved at dpo_lr {fcfg.dpo_lr:g} (fraction of weights changed)", min(mv.values()) > 0.99, mv)
        check(f"{run}: adapter kept in fp32", all(v.dtype == torch.float32 for v in a.values()))
        out[run] = {"steps": card["steps"], "losses": [h["loss"] for h in hist], "margins": [h.get("rewards/margins") for h in hist],
                    "moved": mv, "seconds": card["seconds"], **({"eps_mean": card.get("eps_mean")} if smoothed else {})}
    d, r = adapter(tmp / "dpo"), adapter(tmp / "dpo_smoothed")
    diff = max(float((d[k] - r[k]).abs().max()) for k in d)
    check("RosePO (per-pair epsilon) differs from DPO", diff > 0 and out["dpo"]["losses"][1:] != out["dpo_smoothed"]["losses"][1:], f"max |dW| {diff:.3g}")
    out["rosepo_vs_dpo_max_abs_diff"] = diff
    out["seconds"] = round(time.time() - t0, 1)
    return out


LLAMA_3B = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0)
TINY_3B = dict(LLAMA_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def llama_3b_step(tok_dir: Path, tmp: Path, device: str, check: Checks, sft_steps: int, dpo_steps: int,
                  shape: dict = LLAMA_3B, batch_size: int | None = None, max_length: int | None = None) -> dict:
    "Part 3: a random Llama-3.2-3B-shaped model in nf4, trained by train_sft / train_dpo at the paper profile's batch and length."
    import torch
    from transformers import TrainerCallback
    from usermirror_nb.config import load_config
    from usermirror_nb.finetune import load_tokenizer, qlora_memory_gb, train_dpo, train_sft
    cuda = device.startswith("cuda")
    pcfg = load_config("paper").finetune
    pcfg = dataclasses.replace(pcfg, batch_size=batch_size or pcfg.batch_size, max_length=max_length or pcfg.max_length)
    tok = load_tokenizer(str(tok_dir))
    t0 = time.time()
    base = random_llama(tok, tmp / "llama3b", device, **shape)
    build_s = time.time() - t0
    h, kv, L = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"], shape["num_hidden_layers"]
    n_params = L * (2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"] + 2 * h) + shape["vocab_size"] * h * (1 if shape["tie_word_embeddings"] else 2) + h
    words = fit_words(tok, int(pcfg.max_length * 0.9))       # scenes of ~90% of max_length tokens (longer ones are refused)
    fcfg = dataclasses.replace(pcfg, method="qlora", sft_max_steps=sft_steps, dpo_max_steps=dpo_steps, save_steps=10_000,
                                             merge=False, ablation=False)

    class Steps(TrainerCallback):
        def __init__(self): self.t, self.times = None, []
        def on_step_begin(self, args, state, control, **kw):
            if cuda: torch.cuda.synchronize()
            self.t = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            if cuda: torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    est_kw = dict(params=n_params, layers=L, hidden=h, intermediate=shape["intermediate_size"], kv_dim=kv, vocab=shape["vocab_size"],
                  lora_r=fcfg.lora_r, batch=fcfg.batch_size, seq_len=fcfg.max_length, tied=shape["tie_word_embeddings"])
    out = {"shape": shape, "batch_size": fcfg.batch_size, "max_length": fcfg.max_length, "build_and_save_seconds": round(build_s, 1)}
    sft_data = sft_rows(fcfg.batch_size * sft_steps, words)
    out["sft_tokens_per_example"] = n_tokens(tok, sft_data["messages"].iloc[0])
    for run, data, steps, est in (("sft", sft_data, sft_steps, qlora_memory_gb(**est_kw)),
                                  ("dpo", pref_rows(fcfg.batch_size * dpo_steps, words), dpo_steps, qlora_memory_gb(**est_kw, sequences=2))):
        if steps <= 0: continue
        if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        timer = Steps()
        if run == "sft": card = train_sft(str(base), data, fcfg, tmp / "3b_sft", device=device, callbacks=[timer])
        else: card = train_dpo(str(base), tmp / "3b_sft", data, fcfg, tmp / "3b_dpo", device=device, callbacks=[timer])
        peak, reserved = (torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9) if cuda else (None, None)
        later = sorted(timer.times[1:]) or timer.times
        out[run] = {"steps": card["steps"], "final_loss": card["final_loss"], "peak_allocated_gb": peak and round(peak, 2), "peak_reserved_gb": reserved and round(reserved, 2),
                    "seconds_per_step_median": round(later[len(later) // 2], 3) if later else None, "step_seconds": [round(x, 3) for x in timer.times],
                    "estimate_gb": round(est["total"], 2), "estimate_parts_gb": {k: round(v, 3) for k, v in est.items() if k not in ("total", "lora_params")}}
        check(f"3B QLoRA {run}: finite loss", card["complete"] and math.isfinite(card["final_loss"]), card["final_loss"])
        if cuda: check(f"3B QLoRA {run}: peak allocated {peak:.1f} GB (estimate {est['total']:.1f} GB) fits a 24 GB GPU", reserved < 24, f"reserved {reserved:.1f} GB")
    out["n_params"] = n_params          # 3.21e9 for Llama-3.2-3B
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (the CPU smoke: part 2 only)")
    ap.add_argument("--tiny", action="store_true", help="skip the 3B part (implied by --device cpu)")
    ap.add_argument("--skip-3b", action="store_true", help="skip the 3B part")
    ap.add_argument("--sft-steps", type=int, default=4); ap.add_argument("--dpo-steps", type=int, default=3)
    ap.add_argument("--small-3b", action="store_true", help="run part 3's code path with a 2-layer model at batch 2 x 256 (a CPU check of the script)")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json (default: $OUT, else results/gpu_check)")
    ap.add_argument("--pack-tokenizer", action="store_true", help="(make gpu-wheels) pack SmolLM2's tokenizer into .gpu_wheels and exit")
    a = ap.parse_args(argv)
    if a.pack_tokenizer: pack_tokenizer(); return 0
    t0 = time.time()
    installed = ensure_packages()
    import torch
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); "
                         "`python benchmarks/gpu_check.py --device cpu --tiny` runs the CPU smoke of the same checks")
    import transformers, peft, trl, bitsandbytes
    out_dir = Path(a.out or os.environ.get("OUT") or ROOT / "results" / "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu",
           "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, trl, bitsandbytes)}, "python": platform.python_version(),
           "installed_from_wheels": installed}
    print(f"gpu-check on {res['device']}: {res['versions']}", flush=True)
    check = Checks()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = tokenizer_dir(tmp)
        print("QLoRA SFT -> DPO -> RosePO (random 4-layer Llama, nf4):", flush=True)
        res["qlora_chain"] = qlora_chain(tok_dir, tmp, a.device, check)
        if a.small_3b:
            print("part 3's code path on a 2-layer model with Llama-3.2's vocabulary, batch 2 x 256:", flush=True)
            res["llama_3b"] = llama_3b_step(tok_dir, tmp, a.device, check, 2, 2, TINY_3B, batch_size=2, max_length=256)
        elif not (a.tiny or a.skip_3b or a.device == "cpu"):
            print("Llama-3.2-3B-shaped QLoRA at the paper profile's batch and length (random weights):", flush=True)
            res["llama_3b"] = llama_3b_step(tok_dir, tmp, a.device, check, a.sft_steps, a.dpo_steps)
    res["checks"], res["passed"], res["seconds"] = check.rows, all(r["ok"] for r in check.rows), round(time.time() - t0, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
    b = res.get("llama_3b", {})
    for run in ("sft", "dpo"):
        if run in b:
            r = b[run]
            print(f"3B QLoRA {run}: peak {r['peak_allocated_gb']} GB allocated / {r['peak_reserved_gb']} GB reserved "
                  f"(estimate {r['estimate_gb']} GB), {r['seconds_per_step_median']} s/step at {b['batch_size']} x {b['max_length']}")
    print(f"{sum(r['ok'] for r in check.rows)}/{len(check.rows)} checks passed in {res['seconds']:.0f} s -> {out_dir / 'gpu_check.json'}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
