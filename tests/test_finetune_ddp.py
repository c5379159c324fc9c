"""#11.3: training on several GPUs through `accelerate launch`, checked with two CPU processes (DDP over gloo).

A single process trains on one GPU (`one_gpu_per_process`: no nn.DataParallel, which trl refuses). For several, the
stage runs under `accelerate launch --config_file configs/accelerate/ddp.yaml ... usermirror-finetune`: every rank
trains, each on its own device and share of the batch, and rank 0 alone writes the folders and cards. Here the shipped
DDP config launches the real `train_sft` and `train_dpo` (RosePO) in two processes with CUDA hidden (as in
test_rosepo_ddp.py: accelerate's `--cpu` launcher would start one process only), and the shipped DeepSpeed and FSDP
configs are read by accelerate's own launcher code.
"""
import json, os, socket, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from usermirror_nb.finetune import load_tokenizer
from usermirror_nb.rationales import SYSTEM_PROMPT
from usermirror_nb.scenes import LETTERS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_args(name: str, *extra):
    "accelerate's own parsing of `accelerate launch --config_file configs/accelerate/<name>.yaml ...`."
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), *extra, "script.py"])
    return _validate_launch_command(args)[0]


def test_shipped_accelerate_configs_are_read_by_accelerate():
    from accelerate.utils.launch import prepare_multi_gpu_env
    ddp = _launch_args("ddp", "--num_processes", "4")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.use_deepspeed and ddp.num_processes == 4
    assert ddp.mixed_precision == "no"           # precision comes from the trainer arguments (bf16 / fp16 per GPU)
    fsdp = _launch_args("fsdp", "--num_processes", "2")
    env = prepare_multi_gpu_env(fsdp)
    assert fsdp.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"      # every rank loads the weights (train_* move them to their GPU)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer   # the class the config names exists
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer   # ... and the one its comment names for Qwen2.5
    assert LlamaDecoderLayer.__name__ in open(CONFIGS / "fsdp.yaml").read() and Qwen2DecoderLayer.__name__ in open(CONFIGS / "fsdp.yaml").read()
    ds = _launch_args("deepspeed_zero3", "--num_processes", "8")
    assert ds.use_deepspeed and int(ds.zero_stage) == 3 and ds.mixed_precision == "bf16" and ds.zero3_save_16bit_model in (True, "true")


@pytest.fixture(scope="module")
def ddp_finetune(tmp_path_factory):
    "Two ranks of the real train_sft -> train_dpo(RosePO) on a tiny random Llama; ~60 s on 2 busy cores."
    from transformers import LlamaConfig, LlamaForCausalLM
    tmp = tmp_path_factory.mktemp("ddp_ft")
    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    base, data, out = tmp / "tiny", tmp / "data", tmp / "out"
    LlamaForCausalLM(cfg).save_pretrained(base); tok.save_pretrained(base)
    data.mkdir(); out.mkdir()
    prompt = lambda i: [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Scene {i}: [A] a [B] b [C] c [D] d"}]
    pd.DataFrame([{"messages": prompt(i) + [{"role": "assistant", "content": f"Behavior: [{LETTERS[i % 4]}]"}], "scene_id": f"s{i}",
                   "domain": "movielens", "choice_cnt": 4, "gt_pos": i % 4, "behavior_pos": i % 4, "with_rationale": False}
                  for i in range(8)]).to_parquet(data / "sft.parquet")
    pd.DataFrame([{"prompt": prompt(i), "chosen": [{"role": "assistant", "content": f"Behavior: [{LETTERS[i % 4]}]"}],
                   "rejected": [{"role": "assistant", "content": f"Behavior: [{LETTERS[(i + 1) % 4]}]"}],
                   "scene_id": f"s{i}", "domain": "movielens", "choice_cnt": 4, "gt_pos": i % 4, "chosen_pos": i % 4,
                   "rejected_pos": (i + 1) % 4, "chosen_entropy": 1.2, "rejected_entropy": 1.5, "chosen_prob": 0.2 + 0.1 * i,
                   "rejected_prob": 0.3, "diff_model_uncertainty": 0.1} for i in range(4)]).to_parquet(data / "pref.parquet")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "ddp_finetune_script.py"), str(base), str(data), str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"accelerate launch failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return out, {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def test_two_ranks_train_one_model_and_rank0_writes_it(ddp_finetune):
    out, ranks = ddp_finetune
    assert [ranks[r]["world_size"] for r in (0, 1)] == [2, 2]
    for run in ("sft", "dpo"):
        c0, c1 = ranks[0][run], ranks[1][run]
        assert c0["complete"] and c1["complete"] and c0["fingerprint"] == c1["fingerprint"] and c0["steps"] == c1["steps"]
        assert json.loads((out / run / "usermirror.json").read_text())["fingerprint"] == c0["fingerprint"]
        assert (out / run / "adapter_model.safetensors").exists() and not (out / run / "checkpoints").exists()
    # each step takes one example per rank: 8 SFT examples in 4 steps, 4 pairs in 2 (a single process takes 8 and 4)
    assert ranks[0]["sft"]["steps"] == 4 and ranks[0]["dpo"]["steps"] == 2
    # both ranks return only after rank 0 has finished the folder (the barrier in _train_and_save)
    assert "usermirror.json" in ranks[1]["sft_files"] and "checkpoints" not in ranks[1]["sft_files"]
    assert ranks[0]["dpo"]["run"] == "dpo_smoothed" and ranks[0]["dpo"]["eps_max"] > ranks[0]["dpo"]["eps_min"]


def test_one_process_with_two_gpus_trains_on_one(tmp_path, monkeypatch):
    """With two GPUs visible to one process, transformers counts both (args.n_gpu = 2) and trl's DPOTrainer refuses to
    start (it does not support nn.DataParallel). dpo_config counts one GPU, so the same trainer builds. CUDA is faked by
    its device count only: the arguments run on the CPU here."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    from usermirror_nb.config import FinetuneConfig
    from usermirror_nb.finetune import dpo_config, pref_dataset
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    tok = load_tokenizer("smollm2-135m-instruct")
    model = lambda: get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id)),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    ds = pref_dataset(pd.DataFrame([{"prompt": [{"role": "user", "content": "pick"}], "chosen": [{"role": "assistant", "content": "A"}],
                                     "rejected": [{"role": "assistant", "content": "B"}]}]))
    plain = DPOConfig(str(tmp_path / "a"), use_cpu=False, bf16=False, report_to=[])
    assert plain.n_gpu == 2
    with pytest.raises(ValueError, match="does not support `nn.DataParallel`"):
        DPOTrainer(model=model(), args=plain, train_dataset=ds, processing_class=tok)
    ours = dpo_config(FinetuneConfig(), tmp_path / "b", "cpu", use_cpu=False)
    assert ours.n_gpu == 1
    DPOTrainer(model=model(), args=ours, train_dataset=ds, processing_class=tok)     # builds: one GPU, no DataParallel
