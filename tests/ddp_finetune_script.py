"""Launched by tests/test_finetune_ddp.py under `accelerate launch --config_file configs/accelerate/ddp.yaml
--num_processes 2` (CUDA hidden, so DDP over gloo on CPU): the real `train_sft` then `train_dpo` (RosePO) of
usermirror_nb.finetune, both ranks writing into the same folders, as `usermirror-finetune` does on several GPUs.

Usage: ddp_finetune_script.py BASE_DIR DATA_DIR OUT_DIR. BASE_DIR is a tiny random Llama with the SmolLM2 tokenizer,
DATA_DIR holds sft.parquet and pref.parquet. Each rank writes OUT_DIR/rank{r}.json: the cards train_sft and train_dpo
returned, the world size, the device it trained on, and which files it saw in the SFT folder when it returned.
"""
import json, os, sys
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from usermirror_nb.config import FinetuneConfig
from usermirror_nb.finetune import train_dpo, train_sft


def main(base: Path, data: Path, out: Path):
    fcfg = FinetuneConfig(lora_r=4, lora_alpha=8, batch_size=1, max_length=256, sft_lr=1e-3, sft_epochs=1.0,
                          dpo_lr=1e-3, dpo_epochs=1.0, eps_max=0.4, save_steps=1000)
    sft = train_sft(str(base), pd.read_parquet(data / "sft.parquet"), fcfg, out / "sft", device="cpu", seed=0)
    seen = sorted(p.name for p in (out / "sft").iterdir())          # after train_sft's barrier: rank 0 has written
    dpo = train_dpo(str(base), out / "sft", pd.read_parquet(data / "pref.parquet"), fcfg, out / "dpo", smoothed=True,
                    device="cpu", seed=0)
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({"sft": sft, "dpo": dpo, "sft_files": seen, "rank": rank,
                                                      "world_size": dist.get_world_size() if dist.is_initialized() else 1}))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
