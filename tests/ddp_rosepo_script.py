"""Launched by tests/test_rosepo_ddp.py under `accelerate launch --cpu --num_processes 2` (DDP over gloo): the same tiny
policy trained 3 DPO steps three times, with trl's DPOTrainer, RosePOTrainer at ε = 0 and RosePOTrainer at ε > 0.

The policy is a randomly initialised 2-layer Llama (hidden 32) with the SmolLM2 tokenizer's vocabulary, wrapped in a LoRA
adapter with non-zero B (an "SFT adapter"): the path train_dpo takes, where trl copies the adapter as "ref" and the
reference forward is the policy model itself with "ref" active, so RosePO's hooks sit on the same module for both passes.

Usage: ddp_rosepo_script.py OUT_DIR. Each rank writes OUT_DIR/rank{r}.pt: {run: {"log": log_history, "weights": {name:
tensor}}, "world_size", "wrapped" (the type compute_loss received), "module" (usermirror_nb's file)}.
"""
import sys, tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import usermirror_nb
from usermirror_nb.config import FinetuneConfig
from usermirror_nb.finetune import dpo_config, load_tokenizer, pref_dataset

EPS = [0.3, 0.45, 0.2, 0.4, 0.35, 0.25]      # per pair, RosePO at ε > 0
STEPS = 3


def policy(tok):
    "The same tiny LoRA policy every time (seeded)."
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")     # B != 0: a trained adapter, as after SFT
    return get_peft_model(model, lcfg)


def pairs() -> pd.DataFrame:
    letters = "ABCD"
    rows = []
    for i in range(len(EPS)):
        g, w = i % 4, (i + 1) % 4
        rows.append({"prompt": [{"role": "system", "content": "You predict which item the user picks."},
                                {"role": "user", "content": f"Scene {i}: items " + ", ".join(f"[{x}] item {i}{x}" for x in letters)}],
                     "chosen": [{"role": "assistant", "content": f"Stimulus: curiosity.\nBehavior: [{letters[g]}]"}],
                     "rejected": [{"role": "assistant", "content": f"Stimulus: boredom.\nBehavior: [{letters[w]}]"}]})
    return pd.DataFrame(rows)


def main(out_dir: Path):
    from trl import DPOTrainer
    from usermirror_nb.rosepo import RosePOCollator, RosePOTrainer
    tok = load_tokenizer("smollm2-135m-instruct")
    df = pairs()
    fcfg = FinetuneConfig(batch_size=1, dpo_lr=5e-3, dpo_max_steps=STEPS, max_length=256, beta=0.1, save_steps=1000)
    res, wrapped = {}, {}
    for run, cls, eps in (("dpo", DPOTrainer, None), ("rosepo_eps0", RosePOTrainer, [0.0] * len(EPS)), ("rosepo", RosePOTrainer, EPS)):
        with tempfile.TemporaryDirectory() as tmp:
            args = dpo_config(fcfg, tmp, "cpu", seed=0, save_strategy="no", logging_steps=1)
            coll = RosePOCollator(pad_token_id=tok.pad_token_id, max_length=args.max_length) if eps is not None else None
            tr = cls(model=policy(tok), args=args, train_dataset=pref_dataset(df, None if eps is None else np.array(eps)),
                     processing_class=tok, data_collator=coll)
            seen = []
            orig = tr.compute_loss
            def spy(model, inputs, *a, **k):        # record what trl hands compute_loss (the DDP wrapper under accelerate launch)
                seen.append(type(model).__name__)
                return orig(model, inputs, *a, **k)
            tr.compute_loss = spy
            tr.train()
            wrapped[run] = sorted(set(seen))
            res[run] = {"log": tr.state.log_history,
                        "weights": {n: p.detach().clone() for n, p in tr.model.named_parameters() if ".default." in n}}
    r = tr.accelerator.process_index
    torch.save({**res, "world_size": tr.accelerator.num_processes, "wrapped": wrapped, "module": usermirror_nb.__file__},
               out_dir / f"rank{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
