"""Fine-tuning speed of the finetune stage (LoRA on SmolLM2-135M-Instruct): seconds per optimizer step, peak memory and
tokens trained per second, for SFT and DPO, side by side in one run.

    .venv/bin/python benchmarks/finetune.py [--steps 3] [--batch 4] [--device cpu|cuda] [--loss-on assistant|letter]
                                            [--variants ours,top4,trl] [--phases sft,dpo]

Variants (same data, same trainer code path `train_sft` / `train_dpo`):
  ours  the stage's settings: on CPU fp32, no gradient checkpointing, group_by_length, LM head on labelled positions only
        (`compact_lm_head`); on GPU trl's own head with bf16. LoRA on every layer.
  top4  ours with `finetune.lora_layers=4`: LoRA on the top 4 of 30 layers, so the backward pass stops there (the quick
        profile's setting).
  trl   trl's defaults on this device: gradient checkpointing on, bf16 autocast, trl's fused LM head (which scores every
        position when there is no Triton), random sampling.
Data: the full EKB prompt on ML-100K scenes from results/quick/scenes/train.parquet when present (else synthetic ones),
~600-900 tokens; SFT examples answer-only (`Behavior: [X]`), DPO pairs = a short EKB rationale + behaviour each.
Each (phase, variant) runs in its own child process: step time = wall time between the trainer's step begin/end (the
first step is reported apart as warm-up), tokens/s = non-padding tokens of the steps after the first / their time,
peak memory = the child's max RSS (CPU; includes the loaded model) or torch.cuda.max_memory_allocated (GPU).
Timings are wall-clock on whatever else the machine is doing; `cpu_s` (process CPU seconds per step) is steadier on a
shared machine. Run it twice if in doubt.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

BASE = "smollm2-135m-instruct"
BODY = ("Stimulus: a quiet evening and curiosity about something new.\nKnowledge: the user rated dramas highly and knows the "
        "director's earlier work; the item is well reviewed.\nEvaluation: logical - it matches the history best.")


def scenes(n: int):
    import numpy as np
    import pandas as pd
    from usermirror_nb.config import project_root
    p = project_root() / "results" / "quick" / "scenes" / "train.parquet"
    if p.exists():
        df = pd.read_parquet(p)
        return df[df.domain == "movielens"].head(n).reset_index(drop=True), f"{n} ML-100K scenes from {p.relative_to(project_root())}"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        hist = "\n".join(f"- Movie {rng.integers(1000)} ({rng.integers(1950, 1998)}) — genres: Drama, Comedy — rated {rng.integers(1, 6)}/5" for _ in range(10))
        expo = "\n".join(f"[{L}] Candidate {L} ({1990 + j}) — genres: Thriller" for j, L in enumerate("ABCDE"))
        rows.append({"scene_id": f"s{i}", "domain": "movielens", "choice_cnt": 5, "gt_pos": int(rng.integers(5)),
                     "scene_text": f"## User profile\nA 35-year-old engineer.\n\n## History (oldest first)\n{hist}\n\n## Exposure list\n{expo}"})
    return pd.DataFrame(rows), f"{n} synthetic scenes ({p} not found)"


def tables(n: int):
    import pandas as pd
    from usermirror_nb.rationales import rationale_conversation
    from usermirror_nb.scenes import LETTERS
    sc, where = scenes(n)
    sft, pref = [], []
    for r in sc.to_dict("records"):
        k, g = int(r["choice_cnt"]), int(r["gt_pos"])
        conv = rationale_conversation(r["scene_text"], k)
        meta = {"scene_id": r["scene_id"], "domain": r["domain"], "choice_cnt": k, "gt_pos": g}
        sft.append({"messages": conv + [{"role": "assistant", "content": f"Behavior: [{LETTERS[g]}]"}], **meta, "behavior_pos": g, "with_rationale": False})
        w = (g + 1) % k
        pref.append({"prompt": conv, "chosen": [{"role": "assistant", "content": f"{BODY}\nBehavior: [{LETTERS[g]}]"}],
                     "rejected": [{"role": "assistant", "content": f"{BODY}\nBehavior: [{LETTERS[w]}]"}], **meta, "chosen_pos": g,
                     "rejected_pos": w, "chosen_entropy": 1.5, "rejected_entropy": 1.8, "chosen_prob": 0.3, "rejected_prob": 0.4,
                     "diff_model_uncertainty": 0.2})
    return pd.DataFrame(sft), pd.DataFrame(pref), where


def fresh_adapter(path: Path, fc, device: str):
    "An untrained LoRA adapter folder that train_dpo accepts as its SFT model (DPO's speed does not depend on it)."
    from peft import get_peft_model
    from usermirror_nb.finetune import load_student, lora_config, num_layers
    get_peft_model(load_student(BASE, fc.method, device=device), lora_config(fc, num_layers(BASE))).save_pretrained(str(path))
    (path / "usermirror.json").write_text(json.dumps({"kind": "adapter", "strategy": "uncertainty", "style": "plain", "fingerprint": "benchmark"}))


def child(a) -> dict:
    import resource
    import torch
    from transformers import TrainerCallback
    from usermirror_nb.config import FinetuneConfig
    from usermirror_nb.finetune import train_dpo, train_sft
    sft, pref, where = tables(a.batch * a.steps)
    steps, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw): self.t, self.c = time.perf_counter(), time.process_time()
        def on_step_end(self, args, state, control, **kw): steps.append(time.perf_counter() - self.t); cpu.append(time.process_time() - self.c)

    fc = FinetuneConfig(method="lora", batch_size=a.batch, sft_max_steps=a.steps, dpo_max_steps=a.steps, loss_on=a.loss_on,
                        save_steps=10 ** 6, max_length=4096, ablation=False, lora_layers=4 if a.variant == "top4" else 0)
    ours = a.variant in ("ours", "top4")
    over = {} if ours else dict(gradient_checkpointing=True, bf16=True)
    if a.phase == "sft" and not ours: over["train_sampling_strategy"] = "random"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if a.phase == "sft":
            um = train_sft(BASE, sft, fc, d / "m", device=a.device, callbacks=[Timer()], compact_head=ours, **over)
        else:
            fresh_adapter(d / "sft", fc, a.device)
            um = train_dpo(BASE, d / "sft", pref, fc, d / "m", smoothed=True, device=a.device, callbacks=[Timer()], compact_head=ours, **over)
        hist = json.loads((d / "m" / "log_history.json").read_text())
    toks = [h["num_tokens"] for h in hist if "num_tokens" in h]
    per_step = [t1 - t0 for t0, t1 in zip([0] + toks[:-1], toks)]
    rest = slice(1, None) if len(steps) > 1 else slice(None)
    peak = (torch.cuda.max_memory_allocated() if a.device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    return {"phase": a.phase, "variant": a.variant, "device": a.device, "batch": a.batch, "steps": len(steps), "data": where,
            "first_step_s": round(steps[0], 2), "s_per_step": round(sum(steps[rest]) / len(steps[rest]), 2),
            "cpu_s_per_step": round(sum(cpu[rest]) / len(cpu[rest]), 2),
            "tokens_per_step": round(sum(per_step[rest]) / len(per_step[rest])),
            "tokens_per_s": round(sum(per_step[rest]) / sum(steps[rest]), 1), "peak_gib": round(peak, 2), "final_loss": um["final_loss"],
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--batch", type=int, default=4, help="examples (SFT) or pairs (DPO) per step")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--loss-on", default="assistant", choices=["assistant", "letter"])
    p.add_argument("--variants", default="ours,top4,trl")
    p.add_argument("--phases", default="sft,dpo")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    rows = []
    for phase in a.phases.split(","):
        for variant in a.variants.split(","):
            cmd = [sys.executable, __file__, "--child", "--phase", phase, "--variant", variant, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--device", a.device, "--loss-on", a.loss_on]
            t0 = time.time()
            out = subprocess.run(cmd, capture_output=True, text=True)
            res = [json.loads(l[7:]) for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not res:
                print(f"{phase}/{variant} failed ({out.returncode}):\n{out.stderr[-3000:]}")
                continue
            rows.append({**res[0], "wall_s": round(time.time() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if rows:
        print(f"\n{rows[0]['data']}; device {a.device}; batch {a.batch}; loss on {a.loss_on}; load average at start {rows[0]['load_avg']:.1f}")
        cols = ["phase", "variant", "s_per_step", "cpu_s_per_step", "first_step_s", "tokens_per_step", "tokens_per_s", "peak_gib", "final_loss"]
        print(" | ".join(cols))
        for r in rows: print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
