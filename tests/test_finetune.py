"""Fine-tuning (usermirror_nb.finetune): refusals before any model is loaded, the training chat template, letter
labels, the CPU LM head against trl's, a few real SFT/DPO steps on the real SmolLM2 (loss decreases, adapter round
trip, resume after an interruption, held-out curve, reference = SFT policy), RosePO against trl's sigmoid loss and
hand values, QLoRA nf4 on CPU after a forward pass, and the stage on tiny distill outputs.

Examples are real ML-100K scenes (assets stage on the offline wheel, 3 history items, k = 4) as short answer-only
conversations (system + scene without its history + `Behavior: [X]`, ~130 tokens) so each optimizer step stays short on 2 cores.
"""
import json, math, re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from usermirror_nb.config import FinetuneConfig, config_from_dict
from usermirror_nb import finetune as ft
from usermirror_nb.finetune import (DatasetError, compact_lm_head, letter_example, load_finetuned, load_tokenizer, pref_dataset,
                                    renders_identically, rosepo_loss, run_finetune, stop_after, train_dpo, train_sft,
                                    trainer_classes, training_tokenizer, validate_pref, validate_sft)
from usermirror_nb.rationales import SYSTEM_PROMPT, rationale_conversation
from usermirror_nb.scenes import LETTERS, render_scene

BASE = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def scenes(ml_raw):
    "Real ML-100K scenes through the assets and scenes code (12 train, 6 valid, 6 eval)."
    from usermirror_nb.config import DomainConfig, ScenesConfig
    from usermirror_nb.scenes import build_scenes, prepare_domain
    raw = ml_raw
    ml = prepare_domain(raw.users, raw.items, raw.interactions, DomainConfig(name="movielens", source="ml-100k", positive_min=4), has_time=True)
    df = build_scenes(ml, ScenesConfig(train_scenes=12, eval_scenes=6, valid_scenes=6, history_len=3, k=4, samplers={"random": 1.0}), 0)
    df["scene_text"] = [render_scene(r, "plain") for r in df.to_dict("records")]
    return df.reset_index(drop=True)


def short_scene(text: str) -> str:
    "The scene without its history block (~60 tokens): enough for the mechanics, cheap to train on 2 cores."
    return re.sub(r"## History \(oldest first\)\n(?:- .*\n)+\n", "", text)


def sft_rows(sc: pd.DataFrame, short: bool = True) -> pd.DataFrame:
    "Answer-only SFT rows (contract 1); short = system + scene without history, else the full EKB prompt."
    rows = []
    for r in sc.to_dict("records"):
        conv = ([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": short_scene(r["scene_text"])}] if short
                else rationale_conversation(r["scene_text"], int(r["choice_cnt"])))
        rows.append({"messages": conv + [{"role": "assistant", "content": f"Behavior: [{r['gt_letter']}]"}], "scene_id": r["scene_id"],
                     "domain": r["domain"], "choice_cnt": int(r["choice_cnt"]), "gt_pos": int(r["gt_pos"]),
                     "behavior_pos": int(r["gt_pos"]), "with_rationale": False})
    return pd.DataFrame(rows)


def pref_rows(sc: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in sc.to_dict("records"):
        g, k = int(r["gt_pos"]), int(r["choice_cnt"])
        w = (g + 1) % k
        rows.append({"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": short_scene(r["scene_text"])}],
                     "chosen": [{"role": "assistant", "content": f"Stimulus: curiosity.\nBehavior: [{LETTERS[g]}]"}],
                     "rejected": [{"role": "assistant", "content": f"Stimulus: boredom.\nBehavior: [{LETTERS[w]}]"}],
                     "scene_id": r["scene_id"], "domain": r["domain"], "choice_cnt": k, "gt_pos": g, "chosen_pos": g, "rejected_pos": w,
                     "chosen_entropy": 1.2, "rejected_entropy": 1.5, "chosen_prob": 0.3, "rejected_prob": 0.4, "diff_model_uncertainty": 0.1})
    return pd.DataFrame(rows)


def fcfg(**kw) -> FinetuneConfig:
    base = dict(method="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, batch_size=2, sft_lr=1e-3, dpo_lr=5e-4, max_length=512,
                save_steps=50, ablation=False)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BASE)


# -- refusals: no model is loaded ----------------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    "Loading a model fails loudly: a refusal must come before it."
    def boom(*a, **k): raise AssertionError("a model was loaded before the dataset was checked")
    monkeypatch.setattr(ft, "load_student", boom)


def _broken(df, i, field, value):
    df = df.copy()
    df.at[i, field] = value
    return df


@pytest.mark.parametrize("mutate,expect", [
    (lambda d: d.iloc[:0], "the dataset is empty"),
    (lambda d: d.drop(columns=["messages"]), "missing column(s) ['messages']"),
    (lambda d: _broken(d, 2, "messages", [d.messages[2][1], d.messages[2][0], d.messages[2][2]]),
     "row 2 (scene_id '{sid2}'), field 'messages': roles must be ['system', 'user', 'assistant']"),
    (lambda d: _broken(d, 1, "messages", d.messages[1][:2] + [{"role": "assistant", "content": ""}]),
     "row 1 (scene_id '{sid1}'), field 'messages': message 2 (assistant) has empty content"),
    (lambda d: _broken(d, 1, "messages", d.messages[1][:2] + [{"role": "assistant", "content": "The user picks the second."}]),
     "row 1 (scene_id '{sid1}'), field 'messages': the assistant turn must end with 'Behavior: [X]'"),
    (lambda d: _broken(d, 0, "behavior_pos", (int(d.behavior_pos[0]) + 1) % 4), "row 0 (scene_id '{sid0}'), field 'messages': the answer says"),
    (lambda d: _broken(d, 2, "choice_cnt", 30), "row 2 (scene_id '{sid2}'), field 'choice_cnt': must be an int in 2..26"),
])
def test_sft_refusals_name_file_row_scene_field(scenes, mutate, expect, no_model, tmp_path):
    df = sft_rows(scenes[scenes.split == "train"].head(3))
    msg = "dist/uncertainty/sft.parquet: " + expect.format(**{f"sid{i}": s for i, s in enumerate(df.scene_id)})
    with pytest.raises(DatasetError) as e:
        train_sft(BASE, mutate(df), fcfg(), tmp_path / "m", source="dist/uncertainty/sft.parquet")
    assert msg.split(": ", 1)[1] in str(e.value) and str(e.value).startswith("dist/uncertainty/sft.parquet"), str(e.value)
    assert not (tmp_path / "m").exists()


def test_too_long_example_is_refused_by_the_tokenizer_alone(scenes, no_model, tmp_path):
    df = sft_rows(scenes[scenes.split == "train"].head(3), short=False)     # the real prompt: ~400 tokens
    with pytest.raises(DatasetError, match=r"sft: row 0 \(scene_id '.+'\), field 'messages': \d+ tokens .* exceed finetune.max_length = 64"):
        train_sft(BASE, df, fcfg(max_length=64), tmp_path / "m")
    n = validate_sft(df, "x", load_tokenizer(BASE), 1024)["n_tokens"]
    assert n.between(300, 1024).all(), n.tolist()


@pytest.mark.parametrize("field,value,expect", [
    ("chosen", [{"role": "user", "content": "Behavior: [A]"}], "field 'chosen': roles must be ['assistant']"),
    ("prompt", [{"role": "user", "content": "scene"}], "field 'prompt': roles must be ['system', 'user']"),
    ("rejected_pos", "same", "field 'rejected_pos': chosen and rejected name the same behaviour"),
    ("chosen_prob", 1.5, "field 'chosen_prob': must be a finite number in [0, 1]"),
    ("chosen_prob", float("nan"), "field 'chosen_prob': must be a finite number in [0, 1]"),
])
def test_pref_refusals(scenes, field, value, expect, no_model, tmp_path):
    df = pref_rows(scenes[scenes.split == "train"].head(2))
    if value == "same": value = int(df.chosen_pos[1])
    with pytest.raises(DatasetError) as e:
        train_dpo(BASE, tmp_path / "sft", _broken(df, 1, field, value), fcfg(), tmp_path / "d", smoothed=True, source="p.parquet")
    assert f"p.parquet: row 1 (scene_id '{df.scene_id[1]}'), {expect}" in str(e.value), str(e.value)


# -- template, labels, LM head ------------------------------------------------------------------------------------

def test_training_template_renders_real_conversations_identically(scenes, tok):
    tt = training_tokenizer(tok)
    convs = list(sft_rows(scenes.head(4), short=False).messages) + list(sft_rows(scenes.head(2)).messages)
    assert renders_identically(tok, tt.chat_template, convs)
    for c in convs:
        enc = tt.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]) == c[-1]["content"] + "<|im_end|>"


def test_letter_labels_mark_only_the_letter(scenes, tok):
    df = pref_rows(scenes.head(3))
    for p, c, g in zip(df.prompt, df.chosen, df.gt_pos):            # a rationale before the behaviour line
        ex = letter_example(tok, p + c)
        assert [tok.decode([l]) for l in ex["labels"] if l != -100] == [LETTERS[g]]
        assert ex["input_ids"] == tok(tok.apply_chat_template(p + c, tokenize=False), add_special_tokens=False)["input_ids"]


def test_compact_head_matches_trls_fused_head(scenes, tok):
    "Same per-token log-probs, entropy, top-1, loss and LoRA gradients as trl's head (which scores every position on CPU)."
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head
    from usermirror_nb.assets import load_causal_lm
    tt = training_tokenizer(tok)
    encs = [tt.apply_chat_template(m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True) for m in sft_rows(scenes.head(2)).messages]
    L = max(len(e["input_ids"]) for e in encs)
    ids, am, lab = torch.full((2, L), tok.pad_token_id), torch.zeros((2, L), dtype=torch.long), torch.full((2, L), -100)
    for i, e in enumerate(encs):
        n = len(e["input_ids"]); ids[i, :n] = torch.tensor(e["input_ids"]); am[i, :n] = 1
        m = torch.tensor(e["assistant_masks"]).bool(); lab[i, :n][m] = ids[i, :n][m]
    res = {}
    for kind in ("trl", "compact"):
        torch.manual_seed(0)
        model, _ = load_causal_lm(BASE)
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM"))
        add_fused_lm_head(pm.get_base_model(), outputs=("log_probs", "entropy", "is_top1", "mean_logits"))
        if kind == "compact": compact_lm_head(pm.get_base_model(), chunk_elements=49152 * 3)   # several chunks, recomputed in backward
        out = pm(input_ids=ids, attention_mask=am, labels=lab, fused_lm_head=True)
        out.loss.backward()
        res[kind] = out, {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    (a, ga), (b, gb) = res["trl"], res["compact"]
    for f in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-4), f
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-5)
    assert ga.keys() == gb.keys() and len(ga) == 120
    for k in ga: assert (ga[k] - gb[k]).norm() <= 1e-3 * ga[k].norm(), k           # fp32, summed in another order


# -- real training ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_model(scenes, tmp_path_factory):
    "A real LoRA SFT run: 4 scenes repeated twice, 4 steps of batch 2, held-out curve every 2 steps; keeps the in-memory model."
    from transformers import TrainerCallback
    keep = {}
    class Keep(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw): keep["model"] = model
    train = sft_rows(scenes[scenes.split == "train"].head(4))
    out = tmp_path_factory.mktemp("ft") / "sft"
    um = train_sft(BASE, pd.concat([train] * 2, ignore_index=True), fcfg(sft_max_steps=4), out, seed=0, device="cpu",
                   eval_scenes=scenes[scenes.split == "valid"].head(1), eval_every=2, callbacks=[Keep()], meta={"strategy": "uncertainty"})
    return um, out, keep["model"]


def test_sft_learns_and_writes_its_folder(sft_model):
    um, out, _ = sft_model
    hist = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    curve = [h for h in hist if "heldout_accuracy" in h]
    assert [c["step"] for c in curve] == [0, 2, 4] and all(0 <= c["heldout_accuracy"] <= 1 and c["heldout_scenes"] == 1 for c in curve)
    for f in ("adapter_config.json", "adapter_model.safetensors", "usermirror.json", "train_config.json", "log_history.json", "loss.png", "tokenizer.json"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints").exists()
    assert {k: um[k] for k in ("name", "base_model", "kind", "run", "strategy", "steps", "train_examples")} == \
        {"name": "sft", "base_model": BASE, "kind": "adapter", "run": "sft", "strategy": "uncertainty", "steps": 4, "train_examples": 8}
    assert um["final_loss"] == losses[-1] and um["seconds"] > 0 and um["config"]["lora_r"] == 8
    tc = json.loads((out / "train_config.json").read_text())
    assert tc["sft_config"]["assistant_only_loss"] is True and tc["sft_config"]["gradient_checkpointing"] is False and tc["lora"]["r"] == 8
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template", "").find("generation") < 0   # the base template


def test_saved_adapter_gives_the_same_logits(sft_model, scenes, tok):
    _, out, trained = sft_model
    loaded, _ = load_finetuned(out)
    conv = sft_rows(scenes.head(1)).messages[0][:2]
    x = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) + "Behavior: [", return_tensors="pt", add_special_tokens=False)
    trained.eval()
    with torch.no_grad():
        a, b = trained(**x).logits[0, -1], loaded(**x).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    with torch.no_grad(), loaded.disable_adapter():
        c = loaded(**x).logits[0, -1]
    assert not torch.allclose(a, c, atol=1e-3)                # the adapter did change the model


def test_a_finished_folder_is_reused(sft_model, scenes, monkeypatch):
    um, out, _ = sft_model
    monkeypatch.setattr(ft, "load_student", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    train = sft_rows(scenes[scenes.split == "train"].head(4))
    again = train_sft(BASE, pd.concat([train] * 2, ignore_index=True), fcfg(sft_max_steps=4), out, seed=0, device="cpu",
                      eval_scenes=scenes[scenes.split == "valid"].head(1), eval_every=2, meta={"strategy": "uncertainty"})
    assert again == um


def test_resume_after_an_interruption(scenes, tmp_path):
    "Letter-only loss; checkpoint every 2 steps; stopped after step 3, the rerun continues from checkpoint-2 and ends at step 4."
    df = sft_rows(scenes[scenes.split == "train"].head(8))
    cfg = fcfg(loss_on="letter", sft_max_steps=4, save_steps=2)
    first = train_sft(BASE, df, cfg, tmp_path / "m", device="cpu", callbacks=[stop_after(3)])
    assert first["complete"] is False and first["steps"] == 3
    assert (tmp_path / "m" / "checkpoints" / "checkpoint-2").is_dir() and not (tmp_path / "m" / "usermirror.json").exists()
    um = train_sft(BASE, df, cfg, tmp_path / "m", device="cpu")
    assert um["complete"] and um["steps"] == 4 and um["resumed_from"] == "checkpoint-2" and um["loss_on"] == "letter"
    hist = json.loads((tmp_path / "m" / "log_history.json").read_text())
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3, 4]
    assert all(0 < h["loss"] < 10 for h in hist if "loss" in h)          # one letter token per example: ~ln k at the start


# -- a history student: notes + history -> the chosen title -------------------------------------------------------

def test_history_student_trains_on_notes_and_history_and_is_read_by_the_history_readout(scenes, tmp_path, tok):
    "readout history: rows become prompt (rationale under ## Notes, then the history) + completion (the chosen title); labels = the title."
    from usermirror_nb.llm import TransformersLLM
    from usermirror_nb.config import LLMConfig
    from usermirror_nb.readout import choice_distributions, history_options
    tr = scenes[scenes.split == "train"].head(4).reset_index(drop=True)
    df = sft_rows(tr)
    df.at[0, "messages"] = df.messages[0][:2] + [{"role": "assistant", "content": "Stimulus: a quiet evening.\n" + df.messages[0][2]["content"]}]
    df.at[0, "with_rationale"] = True
    rows = ft.history_sft_rows(validate_sft(df), tr)
    assert rows.prompt[0].startswith("## Notes\nStimulus: a quiet evening.\n## History (oldest first)\n- ") and rows.prompt[0].endswith("\n-")
    assert rows.prompt[1].startswith("## History (oldest first)\n- ")
    assert rows.completion.tolist() == [history_options(r)[int(r["gt_pos"])] for r in tr.to_dict("records")]
    ds = ft.sft_dataset(rows, tok, "answer", "history")
    for ex, c in zip(ds, rows.completion):
        assert tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]) == c
    with pytest.raises(ValueError, match="needs `scenes`"):
        train_sft(BASE, df, fcfg(), tmp_path / "x", readout="history")
    um = train_sft(BASE, pd.concat([df] * 2, ignore_index=True), fcfg(sft_max_steps=3, loss_on="answer"), tmp_path / "h", seed=0,
                   device="cpu", readout="history", scenes=tr)
    assert um["complete"] and um["steps"] == 3 and um["readout"] == "history" and math.isfinite(um["final_loss"])
    model, mtok = load_finetuned(tmp_path / "h")
    llm = TransformersLLM(LLMConfig(model="h", batch_size=8), model=model, tokenizer=mtok)
    recs = tr.to_dict("records")
    trained = np.array([c.probs[0][int(r["gt_pos"])] for c, r in zip(choice_distributions(llm, recs, None, "history"), recs)])
    with model.disable_adapter():
        base = np.array([c.probs[0][int(r["gt_pos"])] for c, r in zip(choice_distributions(llm, recs, None, "history"), recs)])
    assert trained.mean() > base.mean(), (trained, base)     # 3 steps on these very scenes raise p(chosen title)
    # history_sum trains the same prompt/completion examples: the same dataset, the same fingerprint (reused, not retrained)
    again = train_sft(BASE, pd.concat([df] * 2, ignore_index=True), fcfg(sft_max_steps=3, loss_on="answer"), tmp_path / "h", seed=0,
                      device="cpu", readout="history_sum", scenes=tr)
    assert again["fingerprint"] == um["fingerprint"]


def test_dpo_refuses_the_history_readout_before_loading(scenes, no_model, tmp_path):
    for readout in ("history", "history_sum"):
        with pytest.raises(ValueError, match="no shared prompt"):
            train_dpo(BASE, tmp_path / "sft", pref_rows(scenes.head(2)), fcfg(), tmp_path / "d", readout=readout)


def test_dpo_smoothed_starts_from_the_sft_policy(sft_model, scenes, tmp_path):
    "Reference = the SFT adapter: at the first step policy == reference, so the margin is 0 and the loss is log 2 for any ε."
    _, sft_dir, _ = sft_model
    pref = pref_rows(scenes[scenes.split == "train"].head(4))
    pref["chosen_prob"] = [0.9, 0.5, 0.2, 0.0]
    cfg = fcfg(dpo_max_steps=2, eps_min=0.0, eps_max=0.4)
    um = train_dpo(BASE, sft_dir, pref, cfg, tmp_path / "dpo_smoothed", smoothed=True, device="cpu")
    hist = json.loads((tmp_path / "dpo_smoothed" / "log_history.json").read_text())
    steps = [h for h in hist if "loss" in h]
    assert len(steps) == 2 and steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and all(math.isfinite(h["loss"]) for h in steps)
    assert um["eps_mean"] == pytest.approx(np.mean([0.04, 0.2, 0.32, 0.4])) and um["run"] == "dpo_smoothed" and um["kind"] == "adapter"
    assert np.mean([h["rosepo/epsilon"] for h in steps]) == pytest.approx(um["eps_mean"])
    files = {p.name for p in (tmp_path / "dpo_smoothed").iterdir()}
    assert "adapter_model.safetensors" in files and "ref" not in files        # only the trained adapter is saved
    loaded, _ = load_finetuned(tmp_path / "dpo_smoothed")
    assert list(loaded.peft_config) == ["default"]


def test_full_fine_tune_and_its_dpo_reference(scenes, tmp_path):
    "method=full: every weight trains and is saved as a transformers folder; DPO's reference is a frozen copy of it."
    df = sft_rows(scenes[scenes.split == "train"].head(2))
    cfg = fcfg(method="full", sft_lr=1e-5, dpo_lr=1e-6, sft_max_steps=1, dpo_max_steps=1, batch_size=2)
    um = train_sft(BASE, df, cfg, tmp_path / "sft", device="cpu")
    assert um["kind"] == "full" and um["steps"] == 1 and math.isfinite(um["final_loss"])
    files = {p.name for p in (tmp_path / "sft").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "usermirror.json"} <= files and "adapter_config.json" not in files
    tc = json.loads((tmp_path / "sft" / "train_config.json").read_text())
    assert tc["lora"] is None
    d = train_dpo(BASE, tmp_path / "sft", pref_rows(scenes[scenes.split == "train"].head(1)), cfg, tmp_path / "dpo", device="cpu")
    assert d["kind"] == "full" and d["reference"] == "frozen copy of the sft model"
    first = [h for h in json.loads((tmp_path / "dpo" / "log_history.json").read_text()) if "loss" in h][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    m, _ = load_finetuned(tmp_path / "dpo")
    assert type(m).__name__ == "LlamaForCausalLM"


def _dpo_trainer(cls, sft_dir, ds, **kw):
    from peft import PeftModel
    from usermirror_nb.finetune import dpo_config, load_student, lora_config
    model = PeftModel.from_pretrained(load_student(BASE, "lora"), str(sft_dir), is_trainable=True)
    tr = cls(model=model, args=dpo_config(fcfg(batch_size=1), "/tmp/unused-dpo", seed=0), train_dataset=ds, processing_class=load_tokenizer(BASE), **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                    # move the policy away from the reference, identically in both trainers
        for n, p in sorted(tr.model.named_parameters()):
            if ".default." in n and "lora_B" in n: p.add_(0.02 * torch.randn(p.shape, generator=g))
    return tr


def test_rosepo_equals_trl_sigmoid_at_eps_0_and_the_hand_formula(sft_model, scenes):
    from trl import DPOTrainer
    _, sft_dir, _ = sft_model
    C = trainer_classes()
    df = validate_pref(pref_rows(scenes[scenes.split == "train"].head(1)), "p")
    tok = load_tokenizer(BASE)
    coll = lambda: C.RosePOCollator(pad_token_id=tok.pad_token_id)
    plain = _dpo_trainer(DPOTrainer, sft_dir, pref_dataset(df))
    batch = next(iter(plain.get_train_dataloader()))
    with torch.no_grad(): l_trl = plain.compute_loss(plain.model, dict(batch)).item()
    z = plain._metrics["train"]["rewards/margins"][-1]
    assert abs(z) > 1e-3                                      # a real margin
    tr = _dpo_trainer(C.RosePOTrainer, sft_dir, pref_dataset(df, np.array([0.25])), data_collator=coll())
    b = next(iter(tr.get_train_dataloader()))
    assert "rosepo_eps" in b and b["rosepo_eps"].tolist() == [0.25]          # kept through trl's preprocessing and collator
    assert torch.equal(b["input_ids"], batch["input_ids"])
    for eps in (0.0, 0.25):                                                   # the same batch, ε set per pair
        with torch.no_grad(): loss = tr.compute_loss(tr.model, {**b, "rosepo_eps": torch.tensor([eps])}).item()
        assert tr._metrics["train"]["rewards/margins"][-1] == pytest.approx(z, abs=1e-6)
        assert tr._metrics["train"]["rosepo/epsilon"][-1] == pytest.approx(eps)
        hand = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
        assert loss == pytest.approx(hand, abs=1e-5)
        assert loss == pytest.approx(rosepo_loss(torch.tensor(z), eps).item(), abs=1e-5)
        if eps == 0: assert loss == pytest.approx(l_trl, abs=1e-6)


def test_rosepo_refuses_options_that_change_the_margin(sft_model, scenes):
    _, sft_dir, _ = sft_model
    C = trainer_classes()
    from peft import PeftModel
    from usermirror_nb.finetune import dpo_config, load_student
    df = validate_pref(pref_rows(scenes.head(1)), "p")
    with pytest.raises(ValueError, match="plain sigmoid"):
        C.RosePOTrainer(model=PeftModel.from_pretrained(load_student(BASE), str(sft_dir), is_trainable=True),
                        args=dpo_config(fcfg(), "/tmp/unused-dpo", loss_type=["ipo"]), train_dataset=pref_dataset(df, np.array([0.1])),
                        processing_class=load_tokenizer(BASE))


# -- QLoRA --------------------------------------------------------------------------------------------------------

def test_qlora_nf4_on_cpu_learns_after_a_forward_pass(scenes, tok):
    "bitsandbytes repacks Linear4bit weights on an eval no-grad forward (no autograd there); load_student/cpu_trainable_4bit prevent and undo it."
    import bitsandbytes as bnb
    from peft import get_peft_model
    from usermirror_nb.finetune import cpu_trainable_4bit, load_student, lora_config
    model = load_student(BASE, "qlora", device="cpu")          # nf4 from the safetensors folder, kbit-prepared, flag off
    lin = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(lin) == 210 and not any(m.support_avx512bf16_for_cpu for m in lin)
    pm = get_peft_model(model, lora_config(fcfg(lora_dropout=0.0)))
    with torch.no_grad():                                     # LoRA B != 0, so gradients reach the A matrices of every layer
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    expo = scenes.scene_text[0].split("## Exposure list\n")[1].splitlines()[:2]      # ~40 tokens: 4-bit layers are slow on CPU
    x = tok("\n".join(expo) + f"\nBehavior: [{scenes.gt_letter[0]}]", return_tensors="pt")
    packed = lambda: any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in lin)
    rel = lambda a, b: max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)

    def step():
        pm.zero_grad(); pm.train()
        loss = pm(**x, labels=x["input_ids"]).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters() if "layers.0." in n and p.grad is not None}

    def eval_forward():
        pm.eval()
        with torch.no_grad(): return pm(**x, labels=x["input_ids"]).loss.item()

    l0, g0 = step()
    assert len(g0) >= 14
    eval_forward()
    assert not packed()                                       # the flag is off: an eval forward does not repack
    for m in lin: m.support_avx512bf16_for_cpu = True        # what a fresh Linear4bit does on an AVX512-BF16 CPU
    eval_forward()
    if packed():                                              # repacked (where the CPU supports it): the trap
        assert rel(g0, step()[1]) > 0.5                      # no gradient through the repacked 4-bit weights
    assert cpu_trainable_4bit(pm) == 210 and not packed()
    l1, g1 = step()
    assert rel(g0, g1) < 0.25                                 # unpacked: the 4-bit codes exactly, the block scales rounded to bf16
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    opt.step()
    step(); opt.step()
    after = eval_forward()
    assert math.isfinite(after) and after < l1 - 0.05, (l0, l1, after)


def test_qlora_dpo_keeps_the_adapter_fp32_and_moves_it_at_dpo_lr(tmp_path, tok):
    """#11.2: trl's DPOTrainer casts a 4-bit model's trainable weights to bf16 (trl/trainer/dpo_trainer.py, `if _is_quantized_model`);
    an Adam step is ~lr per weight and at dpo_lr 1e-5 that is below half a bf16 step for |w| > 2.6e-3, so ~97% of the LoRA A
    weights never moved, and the bf16 policy differed from its fp32 "ref" copy at step 1 (margin -6e-5, not 0). train_dpo
    casts them back to fp32 with their pre-cast values (so the policy equals trl's "ref" copy at step 1), and train_sft
    does the same. A tiny random Llama (hidden 64, SmolLM2's vocabulary) in nf4 on CPU: QLoRA SFT 2 steps, then 1 step."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    base = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(base); tok.save_pretrained(base)
    prompt = lambda i: [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Scene {i}: [A] a [B] b [C] c [D] d"}]
    sft = pd.DataFrame([{"messages": prompt(i) + [{"role": "assistant", "content": f"Behavior: [{LETTERS[i % 4]}]"}], "scene_id": f"s{i}",
                         "domain": "movielens", "choice_cnt": 4, "gt_pos": i % 4, "behavior_pos": i % 4, "with_rationale": False} for i in range(4)])
    pref = pd.DataFrame([{"prompt": prompt(i), "chosen": [{"role": "assistant", "content": f"Stimulus: curiosity.\nBehavior: [{LETTERS[i % 4]}]"}],
                          "rejected": [{"role": "assistant", "content": f"Stimulus: boredom.\nBehavior: [{LETTERS[(i + 1) % 4]}]"}],
                          "scene_id": f"s{i}", "domain": "movielens", "choice_cnt": 4, "gt_pos": i % 4, "chosen_pos": i % 4,
                          "rejected_pos": (i + 1) % 4, "chosen_entropy": 1.2, "rejected_entropy": 1.5, "chosen_prob": 0.3,
                          "rejected_prob": 0.4, "diff_model_uncertainty": 0.1} for i in range(2)])
    cfg = fcfg(method="qlora", lora_r=4, lora_alpha=8, sft_lr=1e-3, dpo_lr=1e-5, sft_max_steps=2, dpo_max_steps=1)
    assert train_sft(str(base), sft, cfg, tmp_path / "sft", device="cpu")["complete"]
    before = load_file(str(tmp_path / "sft" / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in before.values())   # trl's SFTTrainer makes the same cast: undone there too
    for smoothed in (False, True):
        seen = {}
        class Dtypes(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                seen.update({n: p.dtype for n, p in model.named_parameters() if p.requires_grad})
        out = tmp_path / ("dpo_smoothed" if smoothed else "dpo")
        um = train_dpo(str(base), tmp_path / "sft", pref, cfg, out, smoothed=smoothed, device="cpu", callbacks=[Dtypes()])
        assert um["complete"] and um["steps"] == 1
        assert len(seen) == 28 and set(seen.values()) == {torch.float32}, set(seen.values())     # 2 layers x 7 linears x A, B
        first = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h][0]
        assert first["rewards/margins"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy = its reference copy
        after = load_file(str(out / "adapter_model.safetensors"))
        assert after.keys() == before.keys() and all(v.dtype == torch.float32 for v in after.values())
        for part in ("lora_A", "lora_B"):
            ks = [k for k in before if part in k]
            moved = sum(int((after[k] != before[k].float()).sum()) for k in ks) / sum(before[k].numel() for k in ks)
            assert moved > 0.99, (smoothed, part, moved)           # bf16 weights: 3% of lora_A moved
    # #11.11: a QLoRA adapter is evaluated and merged on the base it was trained against, the nf4 weights dequantized, not on
    # the unquantised base (which differs from them by the quantisation error)
    from peft import PeftModel
    from usermirror_nb.evaluate import load_model
    from usermirror_nb.finetune import load_student, merge_adapter
    ids = tok("Scene 9: [A] a [B] b [C] c [D] d", return_tensors="pt").input_ids
    logits = lambda m: m(input_ids=ids).logits[0].float()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):     # the function as trained: nf4 weights, bf16 compute, fp32 adapter
            trained = logits(PeftModel.from_pretrained(load_student(str(base), "qlora", device="cpu"), str(tmp_path / "sft")).eval())
        merged = logits(load_model(tmp_path / "sft", merge=True)[0])
        unmerged = logits(load_model(tmp_path / "sft", merge=False)[0])
        plain = logits(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(tmp_path / "sft")).merge_and_unload().eval())
        on_disk = logits(LlamaForCausalLM.from_pretrained(merge_adapter(str(base), tmp_path / "sft", tmp_path / "merged", method="qlora")))
    err = lambda x: float((x - trained).abs().max())
    print(f"max logit error vs the trained nf4 function: merged {err(merged):.4f}, unmerged {err(unmerged):.4f}, on disk {err(on_disk):.4f}, unquantised base {err(plain):.4f}")
    assert err(merged) < 0.2 * err(plain), (err(merged), err(plain))       # bf16 compute noise vs the quantisation error
    assert err(unmerged) < 0.2 * err(plain) and err(on_disk) < 0.2 * err(plain)


@pytest.mark.gpu
def test_qlora_on_gpu(scenes, tmp_path):
    "QLoRA SFT + RosePO on CUDA (bf16 compute, checkpointing): finite losses and the peak memory of the embedded student."
    torch.cuda.reset_peak_memory_stats()
    df = sft_rows(scenes[scenes.split == "train"].head(8), short=False)
    um = train_sft(BASE, df, fcfg(method="qlora", sft_max_steps=3, batch_size=4), tmp_path / "sft", device="cuda")
    assert um["complete"] and math.isfinite(um["final_loss"])
    d = train_dpo(BASE, tmp_path / "sft", pref_rows(scenes[scenes.split == "train"].head(4)), fcfg(method="qlora", dpo_max_steps=2),
                  tmp_path / "dpo", smoothed=True, device="cuda")
    assert math.isfinite(d["final_loss"])
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak CUDA memory {peak:.2f} GiB")
    assert peak < 6


# -- the stage ----------------------------------------------------------------------------------------------------

def test_run_finetune_on_tiny_distill_outputs(scenes, tmp_path, monkeypatch):
    "SFT on the method's set + 2 answer-only extras, one ablation SFT, DPO skipped (no pairs) with its reason; rerun reuses."
    monkeypatch.setenv("USERMIRROR_ROOT", str(Path(__file__).resolve().parents[1]))
    cfg = config_from_dict({"profile": "tiny", "results_root": str(tmp_path), "seed": 0,
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}],
                            "distill": {"strategies": ["uncertainty", "random", "teacher_acc_high"]},
                            "finetune": {"batch_size": 2, "sft_max_steps": 1, "answer_only_scenes": 2, "lora_r": 4, "lora_alpha": 8,
                                         "max_length": 512, "ablation": True, "runs": ["sft", "dpo", "dpo_smoothed"]}})
    tr = scenes[scenes.split == "train"]
    d = cfg.results_dir / "distill"
    for sub, df in (("uncertainty", sft_rows(tr.head(3))), ("answer_only_pool", sft_rows(tr)), ("random", sft_rows(tr.tail(2)))):
        (d / sub).mkdir(parents=True, exist_ok=True)
        df.to_parquet(d / sub / "sft.parquet")
    pref_rows(tr.head(2)).iloc[:0].to_parquet(d / "uncertainty" / "pref.parquet")       # quick: no pairs
    res = run_finetune(cfg)
    m = json.loads(res.read_text())
    assert [x["name"] for x in m["models"]] == ["sft", "sft_random"]
    assert {x["path"] for x in m["models"]} == {"sft", "sft_random"} and all(x["steps"] == 1 for x in m["models"])
    assert m["models"][0]["train_examples"] == 5 and m["models"][0]["answer_only_extra"] == 2
    reasons = {s["name"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"dpo", "dpo_smoothed", "sft_teacher_acc_high"} and "no preference pairs" in reasons["dpo"]
    rec = json.loads((cfg.results_dir / "stages" / "finetune.json").read_text())
    assert rec["status"] == "done" and rec["counts"]["models"] == 2 and "dpo skipped" in rec["note"]
    monkeypatch.setattr(ft, "load_student", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert json.loads(run_finetune(cfg).read_text())["models"] == m["models"]


# -- LoRA on the top layers only, and the recipe study's cached path -------------------------------------------------

def test_lora_on_the_top_layers_only(scenes, tmp_path):
    "finetune.lora_layers=2: the adapter holds LoRA weights for layers 28 and 29 of SmolLM2's 30 and nothing below."
    from safetensors.torch import load_file
    df = sft_rows(scenes[scenes.split == "train"].head(2))
    um = train_sft(BASE, df, fcfg(lora_layers=2, sft_max_steps=1), tmp_path / "sft", device="cpu")
    assert um["steps"] == 1 and math.isfinite(um["final_loss"])
    keys = load_file(str(tmp_path / "sft" / "adapter_model.safetensors")).keys()
    layers = {int(m.group(1)) for k in keys if (m := re.search(r"\.layers\.(\d+)\.", k))}
    assert layers == {28, 29}, layers
    assert json.loads((tmp_path / "sft" / "train_config.json").read_text())["lora"]["layers_to_transform"] == [28, 29]


def test_recipe_study_cache_is_the_full_model(scenes):
    "Cached states after 28 layers + the top 2 layers give the full model's letter probabilities; training on them runs."
    from usermirror_nb.assets import load_causal_lm
    from usermirror_nb.recipe_study import _study_encode, _top_model, cache_hidden, cached_eval, train_cached
    from usermirror_nb.llm import letter_token_ids
    model, tok = load_causal_lm(BASE, dtype=torch.float32)
    model.eval()
    for p in model.parameters(): p.requires_grad_(False)
    sc = scenes[scenes.split == "eval"].head(3)
    c = cache_hidden(model, tok, sc, "evidence", freeze=28, with_answer=False)
    lid = letter_token_ids(tok, int(sc["choice_cnt"].max()))
    pg = []
    for r in sc.to_dict("records"):     # the full model, fp32, one scene at a time
        ids, pos = _study_encode(tok, r, "evidence", False, lid)
        with torch.no_grad(): logits = model(torch.tensor([ids])).logits[0, pos]
        pg.append(float(torch.softmax(logits[lid], -1)[r["gt_pos"]]))
    res = cached_eval(_top_model(model, 28, "lora", 4, 2), c)
    assert res["n"] == 3 and res["accuracy"] == pytest.approx(float(np.mean(pg)), abs=0.03)
    tr = cache_hidden(model, tok, scenes[scenes.split == "train"].head(4), "evidence", freeze=28, with_answer=True)
    out = train_cached(model, tr, c, kind="full", lr=1e-4, steps=2, batch_size=2, n_layers=1, eval_every=1)
    assert [p["step"] for p in out["curve"]] == [0, 1, 2] and all(math.isfinite(p["loss"]) for p in out["curve"][1:])


def test_gpu_precision_falls_back_to_fp16_where_the_gpu_has_no_bf16(monkeypatch):
    "#11.6: bf16 was hard-coded for GPU training (it raises on GPUs without bf16, e.g. T4/V100)."
    import torch
    from usermirror_nb.finetune import _common_args, half_dtype, precision_args
    assert precision_args("cpu") == {"bf16": False, "fp16": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert half_dtype("cuda") == torch.float16 and precision_args("cuda:1") == {"bf16": False, "fp16": True}
    a = _common_args(fcfg(), "out", "cuda", 0)
    assert (a["bf16"], a["fp16"], a["use_cpu"]) == (False, True, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert half_dtype("cuda") == torch.bfloat16 and precision_args("cuda") == {"bf16": True, "fp16": False}


def test_library_options_pass_through_as_they_are():
    "#11.9 / #14.4: trl's, peft's and transformers' own options reach the real classes; a misspelt one stops the config, naming the class."
    from usermirror_nb.config import ConfigError, FinetuneConfig
    from usermirror_nb.finetune import dpo_config, lora_config, sft_config
    f = FinetuneConfig(trainer_args={"weight_decay": 0.1, "lr_scheduler_type": "cosine"}, sft_args={"packing": True},
                       dpo_args={"disable_dropout": False}, lora_args={"use_rslora": True}, bnb_args={"bnb_4bit_quant_storage": "uint8"})
    s, d, l = sft_config(f, "out"), dpo_config(f, "out"), lora_config(f)
    assert (s.weight_decay, str(s.lr_scheduler_type.value), s.packing, s.learning_rate) == (0.1, "cosine", True, f.sft_lr)
    assert (d.weight_decay, d.disable_dropout, d.beta) == (0.1, False, f.beta) and l.use_rslora and l.r == f.lora_r
    with pytest.raises(ConfigError, match=r"finetune.sft_args: \['pakcing'\] is not an option of trl.SFTConfig"):
        FinetuneConfig(sft_args={"pakcing": True})
    with pytest.raises(ConfigError, match=r"finetune.lora_args: \['rank', 'use_rsLora'\] are not options of peft.LoraConfig"):
        FinetuneConfig(lora_args={"rank": 8, "use_rsLora": True})
    with pytest.raises(ConfigError, match="finetune.bnb_args: .*transformers.BitsAndBytesConfig"):
        FinetuneConfig(bnb_args={"load_in_3bit": True})
    with pytest.raises(ConfigError, match="must be a mapping"):
        FinetuneConfig(trainer_args=["weight_decay"])
