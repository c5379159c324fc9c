"""Stage 08 (evaluate): metric functions against hand computations, prediction validation, loading fine-tuned folders
(a real peft LoRA adapter and a full model folder on the real SmolLM2), the `Simulator` API, and a small end-to-end
`run_evaluate` on scenes built from the real MovieLens-100K."""
import json

import numpy as np
import pandas as pd
import pytest

from usermirror_nb.config import EvaluateConfig, LLMConfig, config_from_dict
from usermirror_nb.evaluate import (PRED_COLUMNS, PredictionsError, Simulator, accuracy_sampled, acc_by_position, argmax_accuracy,
                                    argmax_hits, bootstrap_ci, ece, eval_plan, letter_hist, load_model, metrics_table, nll,
                                    read_model_card, reliability_bins, run_evaluate, sampled_hits, SimSpec, thought_subset,
                                    validate_predictions)

STUDENT = "smollm2-135m-instruct"


# ---------------------------------------------------------------------------------------------------- metrics by hand
def test_ece_four_rows_by_hand():
    P, g = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]], [0, 0, 0, 1]
    # confidences 0.9, 0.8, 0.6, 0.55 with hits 1, 0, 1, 1
    assert ece(P, g, bins=2) == pytest.approx(abs(0.75 - (0.9 + 0.8 + 0.6 + 0.55) / 4))           # one bin [0.5, 1)
    assert ece(P, g, bins=10) == pytest.approx((0.1 + 0.8 + 0.4 + 0.45) / 4)                        # four singleton bins
    # 5 bins: [0.8, 1] holds 0.9 and 0.8 (hits 1, 0), [0.6, 0.8) holds 0.6 (hit), [0.4, 0.6) holds 0.55 (hit)
    assert ece(P, g, bins=5) == pytest.approx((abs(1 - 1.7) + abs(1 - 0.6) + abs(1 - 0.55)) / 4)
    rb = reliability_bins(P, g, bins=5)
    assert rb["count"].tolist() == [0, 0, 1, 1, 2]
    assert rb.loc[4, "confidence"] == pytest.approx(0.85) and rb.loc[4, "accuracy"] == pytest.approx(0.5)
    assert rb.loc[0, ["confidence", "accuracy"]].isna().all()


def test_argmax_nll_hist_positions_by_hand():
    P = [[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]]
    g = [0, 1, 0, 1]
    assert argmax_hits(P, g).tolist() == pytest.approx([1, 1 / 3, 0, 1])
    assert argmax_accuracy(P, g) == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert nll(P, g) == pytest.approx(-(np.log(0.5) + np.log(1 / 3) + np.log(0.1) + np.log(1.0)) / 4)
    assert nll([[0.0, 1.0]], [0], floor=1e-3) == pytest.approx(-np.log(1e-3))
    assert letter_hist(P) == pytest.approx([(1 + 1 / 3) / 4, (1 / 3 + 1) / 4, (1 / 3 + 1) / 4])
    assert acc_by_position([1, 0.5, 0, 1], g, 3)[:2] == pytest.approx([0.5, 0.75])
    # different k in one set: padding never lets a draw land outside the scene's own letters
    mixed = [[0.5, 0.5], [0.2, 0.2, 0.2, 0.2, 0.2]]
    assert argmax_hits(mixed, [1, 4]).tolist() == pytest.approx([0.5, 0.2])
    assert sampled_hits([[1e-12, 1 - 1e-12]] * 50, [1] * 50, repeats=50).min() == 1.0


def test_sampled_accuracy_is_mean_p_gt_for_large_R():
    rng = np.random.default_rng(1)
    P = rng.dirichlet(np.ones(5), size=300); g = rng.integers(0, 5, 300)
    expect = P[np.arange(300), g].mean()
    assert accuracy_sampled(P, g, repeats=400, seed=0) == pytest.approx(expect, abs=0.01)
    assert accuracy_sampled(P, g, 10, seed=5) == accuracy_sampled(P, g, 10, seed=5)        # seeded
    assert accuracy_sampled(P, g, 10, seed=5) != accuracy_sampled(P, g, 10, seed=6)
    ids = [f"s{i}" for i in range(300)]
    a = sampled_hits(P, g, 10, 0, keys=ids); b = sampled_hits(P[::-1], g[::-1], 10, 0, keys=ids[::-1])
    assert np.array_equal(a, b[::-1])                                                       # draws follow the scene, not the row order


def test_bootstrap_ci_contains_estimate_and_shrinks():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 2000):
        x = (rng.random(n) < 0.3).astype(float)
        lo, hi = bootstrap_ci(x, n_boot=1000, seed=0)
        assert lo <= x.mean() <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 2000), rel=0.2)       # ≈ the normal interval
    lo, hi = bootstrap_ci(np.column_stack([x, x]), stat=lambda a: a[:, 0].mean(), n_boot=300)
    assert lo <= x.mean() <= hi
    assert bootstrap_ci(x, n_boot=200, seed=3) == bootstrap_ci(x, n_boot=200, seed=3)


# ---------------------------------------------------------------------------------------------------- the table
def _preds(model="m", n=40, k=5, seed=0, split="eval"):
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(k), size=n)
    return pd.DataFrame({"model": model, "mode": "direct", "split": split, "scene_id": [f"s{i}" for i in range(n)],
                         "domain": np.where(np.arange(n) % 2, "books", "movielens"), "choice_cnt": k,
                         "gt_pos": rng.integers(0, k, n), "probs": [list(p) for p in P], "letter_mass": 0.5, "rationale": ""})


def test_metrics_table_shape_and_consistency():
    df = pd.concat([_preds("a"), _preds("b", seed=1), _preds("a", split="valid", n=10)], ignore_index=True)
    mt = metrics_table(df, EvaluateConfig(bootstrap=200), seed=0)
    assert list(mt.columns) == ["model", "mode", "split", "group", "n", "accuracy", "accuracy_lo", "accuracy_hi",
                                "argmax_accuracy", "argmax_accuracy_lo", "argmax_accuracy_hi", "nll", "nll_lo", "nll_hi",
                                "ece", "ece_lo", "ece_hi", "acc_by_pos", "letter_hist"]
    assert len(mt) == 3 * 4
    a = mt[(mt.model == "a") & (mt.split == "eval")].set_index("group")
    assert list(a.index) == ["all", "domain=books", "domain=movielens", "choice_cnt=5"]
    assert a.loc["domain=books", "n"] + a.loc["domain=movielens", "n"] == a.loc["all", "n"] == 40
    # the same sampled hits underlie every group: the domains' accuracies average to the overall one
    assert (a.loc["domain=books", "accuracy"] + a.loc["domain=movielens", "accuracy"]) / 2 == pytest.approx(a.loc["all", "accuracy"])
    d = df[(df.model == "a") & (df.split == "eval")]
    assert a.loc["all", "argmax_accuracy"] == pytest.approx(argmax_accuracy(d.probs, d.gt_pos))
    assert a.loc["all", "nll"] == pytest.approx(nll(d.probs, d.gt_pos))
    assert a.loc["all", "ece"] == pytest.approx(ece(d.probs, d.gt_pos, 10))
    for m in ("accuracy", "argmax_accuracy", "nll", "ece"):
        assert (mt[f"{m}_lo"] <= mt[m] + 1e-12).all() and (mt[m] <= mt[f"{m}_hi"] + 1e-12).all(), m
    r = a.loc["all"]
    assert len(r["acc_by_pos"]) == 5 and sum(r["letter_hist"]) == pytest.approx(1.0)
    counts = np.bincount(d.gt_pos, minlength=5)
    assert np.nansum(np.asarray(r["acc_by_pos"]) * counts) / 40 == pytest.approx(r["accuracy"])
    mt2 = metrics_table(df, EvaluateConfig(bootstrap=200), seed=0)
    pd.testing.assert_frame_equal(mt, mt2)                                                  # deterministic


def test_validation_names_row_scene_and_model():
    df = _preds("simA", n=5)
    bad = df.copy(); bad.at[3, "probs"] = [0.5, 0.5, 0.1, 0.0, 0.0]
    with pytest.raises(PredictionsError, match=r"row 3 \(scene_id='s3', model='simA'\): probs sum to 1.1"):
        metrics_table(bad, EvaluateConfig(bootstrap=10))
    bad = df.copy(); bad.at[1, "probs"] = [0.5, 0.5]
    with pytest.raises(PredictionsError, match=r"row 1 .*probs has length 2 but choice_cnt is 5"):
        validate_predictions(bad)
    bad = df.copy(); bad.at[2, "gt_pos"] = 5
    with pytest.raises(PredictionsError, match=r"row 2 .*gt_pos 5 is outside 0..4"):
        validate_predictions(bad)
    bad = df.copy(); bad.at[0, "probs"] = [np.nan, 0.5, 0.5, 0, 0]
    with pytest.raises(PredictionsError, match="finite"):
        validate_predictions(bad)
    with pytest.raises(PredictionsError, match="duplicate prediction for model='simA'"):
        validate_predictions(pd.concat([df, df.iloc[:1]], ignore_index=True))
    with pytest.raises(PredictionsError, match=r"missing column\(s\) \['gt_pos'\]"):
        validate_predictions(df.drop(columns=["gt_pos"]), where="baselines/predictions.parquet")


def test_eval_plan_selection():
    from usermirror_nb.config import LLMConfig
    cfg = config_from_dict({"profile": "t", "domains": [{"name": "m", "source": "ml-100k", "positive_min": 4}]})
    sp = lambda n, role="finetuned": SimSpec(n, "", role, LLMConfig())
    specs = [sp(STUDENT, "student"), sp("gemma3-270m", "teacher"), sp("sft"), sp("dpo_smoothed"), sp("sft_random")]
    p = eval_plan(cfg, specs)
    assert [s.name for s in p["models"]] == [STUDENT, "gemma3-270m", "sft", "dpo_smoothed", "sft_random"]
    assert p["valid"] == ["dpo_smoothed"] and p["thought"] == [STUDENT, "dpo_smoothed"] and p["missing"] == []
    cfg.evaluate.models, cfg.evaluate.thought_models = ["gemma3-270m", "sft", "dpo"], ["sft"]
    with pytest.warns(UserWarning, match=r"\['dpo'\] are not available"):
        p = eval_plan(cfg, specs)
    assert [s.name for s in p["models"]] == ["gemma3-270m", "sft"] and p["valid"] == ["sft"] and p["thought"] == ["sft"]
    cfg.evaluate.modes = ["direct"]
    with pytest.warns(UserWarning):
        assert eval_plan(cfg, specs)["thought"] == []
    sc = pd.DataFrame({"scene_id": [f"s{i:02d}" for i in range(20)], "domain": ["a"] * 12 + ["b"] * 8})
    sub = thought_subset(sc, 5, seed=0)
    assert sub["domain"].value_counts().to_dict() == {"a": 5, "b": 5} and sub["scene_id"].is_monotonic_increasing
    assert sub.equals(thought_subset(sc, 5, seed=0)) and len(thought_subset(sc, 0)) == 20


# ---------------------------------------------------------------------------------------------------- real models
def _scenes_df(k=5, n=3):
    from usermirror_nb.scenes import render_scene
    items = ["Heat (1995) — Action, Crime", "Aladdin (1992) — Animation, Children's, Comedy", "Casino (1995) — Drama",
             "Nixon (1995) — Drama", "Othello (1995) — Drama", "Fargo (1996) — Crime, Drama"]
    rows = []
    for i in range(n):
        sc = {"profile": f"Age {20 + i}, student.", "history": ["Toy Story (1995) — Animation; rated 5/5"] * (i + 1),
              "exposure_texts": items[i:i + k], "style": "plain"}
        rows.append({"scene_id": f"t{i}", "split": "eval", "domain": "movielens", "choice_cnt": k, "gt_pos": i % k,
                     "scene_text": render_scene(sc)})
    return pd.DataFrame(rows)


def make_adapter(folder, name="sft", steps=0):
    "A real LoRA adapter on SmolLM2 (non-zero random B so it changes the model) with contract-2 usermirror.json."
    import torch
    from peft import LoraConfig, get_peft_model
    from usermirror_nb.assets import load_causal_lm
    torch.manual_seed(0)
    base, tok = load_causal_lm(STUDENT)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    m.save_pretrained(str(folder))
    card = {"name": name, "base_model": STUDENT, "kind": "adapter", "run": "sft", "strategy": "uncertainty", "style": "plain",
            "train_examples": 0, "steps": steps, "final_loss": None, "seconds": 0.0, "config": {}}
    (folder / "usermirror.json").write_text(json.dumps(card))
    return card


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft") / "sft"
    make_adapter(d)
    return d


F32 = LLMConfig(dtype="float32")   # exactness below is about the code, not the precision (`auto` is bf16 on a CPU with native bf16)


@pytest.fixture(scope="module")
def base_sim():
    return Simulator.load(STUDENT, llm_cfg=F32)


@pytest.fixture(scope="module")
def base_probs(base_sim):
    "The base student's direct-mode letter distributions on two hand-made scenes."
    return np.stack(base_sim.direct(_scenes_df(n=2))["probs"])


def test_adapter_loads_merged_and_matches_peft(adapter_dir, base_probs):
    import torch
    from peft import PeftModel
    from usermirror_nb.assets import load_causal_lm
    assert read_model_card(adapter_dir)["kind"] == "adapter"
    sim = Simulator.load(adapter_dir, llm_cfg=F32)
    assert sim.name == "sft" and sim.card["base_model"] == STUDENT and sim.llm.template == "chat"
    got = np.stack(sim.direct(_scenes_df(n=2))["probs"])
    assert got.shape == (2, 5) and np.allclose(got.sum(1), 1) and np.abs(got - base_probs).max() > 1e-3                 # the adapter changes the answer
    # merged weights = the unmerged PeftModel, on the very same prompt
    m, tok = load_causal_lm(STUDENT)
    pm = PeftModel.from_pretrained(m, str(adapter_dir)).eval()
    ids = torch.tensor([sim.llm.encode("Hello there, which film?")])
    with torch.inference_mode():
        a = pm(input_ids=ids).logits[0, -1]; b = sim.llm.model(input_ids=ids).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-3)
    um, _, card = load_model(adapter_dir, merge=False)
    assert isinstance(um, PeftModel) and card["name"] == "sft"


def test_full_folder_and_bad_folders(tmp_path, base_probs):
    from usermirror_nb.assets import load_causal_lm
    m, tok = load_causal_lm(STUDENT)
    d = tmp_path / "full"
    m.save_pretrained(str(d), safe_serialization=True); tok.save_pretrained(str(d))
    (d / "usermirror.json").write_text(json.dumps({"name": "sft_full", "base_model": STUDENT, "kind": "full", "run": "sft"}))
    sim = Simulator.load(d, llm_cfg=F32)
    assert sim.name == "sft_full"
    assert np.allclose(np.stack(sim.direct(_scenes_df(n=2))["probs"]), base_probs, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        read_model_card(tmp_path / "empty")
    (tmp_path / "broken").mkdir(); (tmp_path / "broken" / "usermirror.json").write_text(json.dumps({"kind": "adapter"}))
    with pytest.raises(ValueError, match=r"usermirror.json: missing field\(s\) \['base_model'\]"):
        read_model_card(tmp_path / "broken")


def test_simulator_choice_api(base_sim):
    from usermirror_nb.llm import Sampling
    from usermirror_nb.rationales import STOP_REGEX
    hist = ["Toy Story (1995) — Animation, Comedy; rated 5/5", "Babe (1995) — Children's, Comedy; rated 4/5"]
    expo = ["Heat (1995) — Action, Crime", "Aladdin (1992) — Animation, Children's, Comedy", "Casino (1995) — Drama", "Nixon (1995) — Drama"]
    a = base_sim.choice("Age 24, student, female.", hist, expo)
    b = base_sim.choice("Age 24, student, female.", hist, expo)
    assert a["letters"] == list("ABCD") and len(a["probs"]) == 4 and sum(a["probs"]) == pytest.approx(1.0)
    assert a == b and a["choice"] in "ABCD" and a["rationale"] == "" and 0 < a["letter_mass"] <= 1
    base_sim.sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, stop_regex=STOP_REGEX)
    t1 = base_sim.choice("Age 24, student, female.", hist, expo, mode="thought", seed=1)
    t2 = base_sim.choice("Age 24, student, female.", hist, expo, mode="thought", seed=1)
    assert isinstance(t1["rationale"], str) and t1["rationale"].startswith("Stimulus:") and len(t1["rationale"]) > len("Stimulus:")
    assert t1 == t2 and sum(t1["probs"]) == pytest.approx(1.0) and len(t1["probs"]) == 4
    with pytest.raises(ValueError, match="mode must be"):
        base_sim.choice("x", hist, expo, mode="guess")


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, adapter_dir):
    "A results folder with real ML-100K scenes (2 eval, 1 valid) and one fine-tuned adapter listed in models.json."
    import shutil
    from usermirror_nb.assets import load_raw, run_assets
    from usermirror_nb.config import ScenesConfig
    from usermirror_nb.scenes import build_scenes, prepare_domain, save_scenes
    root = tmp_path_factory.mktemp("results")
    cfg = config_from_dict({"profile": "t", "seed": 0, "results_root": str(root), "assets": {"models": []},
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}],
                            "scenes": {"train_scenes": 4, "eval_scenes": 2, "valid_scenes": 1, "samplers": {"random": 1.0, "collaborative": 1.0}},
                            "evaluate": {"bootstrap": 50, "thought_scenes": 1, "max_new_tokens": 12, "models": [STUDENT, "sft"],
                                         "thought_models": ["sft"]}})
    run_assets(cfg)
    raw = load_raw(cfg.results_dir / "assets" / "raw" / "movielens")
    dom = prepare_domain(raw.users, raw.items, raw.interactions, cfg.domains[0], has_time=True)
    save_scenes(build_scenes(dom, cfg.scenes, 0), cfg.results_dir / "scenes")
    ft = cfg.stage_dir("finetune")
    shutil.copytree(adapter_dir, ft / "sft")
    card = json.loads((ft / "sft" / "usermirror.json").read_text())
    (ft / "models.json").write_text(json.dumps({"models": [{**card, "path": "sft"}]}))
    return cfg


def test_run_evaluate_end_to_end_and_resume(tiny_results):
    cfg = tiny_results
    art = run_evaluate(cfg, progress=False)
    out = cfg.results_dir / "evaluate"
    assert art == out / "metrics.parquet"
    pred = pd.read_parquet(out / "predictions.parquet")
    assert list(pred.columns) == PRED_COLUMNS
    validate_predictions(pred)
    n = pred.groupby(["model", "mode", "split"]).size().to_dict()
    assert n == {(STUDENT, "direct", "eval"): 2,     # valid scenes: only the hybrid's LLM (the fine-tuned one here)
                 ("sft", "direct", "eval"): 2, ("sft", "direct", "valid"): 1, ("sft", "thought", "eval"): 1}
    th = pred[pred["mode"] == "thought"]
    assert th["rationale"].str.startswith("Stimulus:").all() and (pred.loc[pred["mode"] == "direct", "rationale"] == "").all()
    mt = pd.read_parquet(out / "metrics.parquet")
    assert set(mt["group"]) == {"all", "domain=movielens", "choice_cnt=5"} and len(mt) == 4 * 3
    for f in ("summary.json", "reliability.png", "position_bias.png"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "summary.json").read_text())
    print(s["timings"])
    assert s["scenes"] == {"eval": 2, "valid": 1, "thought": 1}
    assert s["timings"]["sft"]["direct"]["scenes"] == 3 and not s["timings"]["sft"]["direct"]["reused"]
    st = json.loads((cfg.results_dir / "stages" / "evaluate.json").read_text())
    assert st["status"] == "done" and st["counts"]["predictions"] == 6
    # rerun: every part is reused, the predictions are identical
    run_evaluate(cfg, progress=False)
    s2 = json.loads((out / "summary.json").read_text())
    assert [t[m]["reused"] for t in s2["timings"].values() for m in ("direct", "thought") if m in t] == [True] * 3
    pd.testing.assert_frame_equal(pred, pd.read_parquet(out / "predictions.parquet"))
