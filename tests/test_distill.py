"""Stage 06 (distill): behaviour sampling, denoising, chosen/rejected picks, allocation, strategies, the answer-only
format and `run_distill` end to end on a small synthetic results folder (CI has no results/quick)."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from usermirror_nb.config import DISTILL_STRATEGIES, config_from_dict
from usermirror_nb.distill import (allocate, answer_only_example, distill_datasets, load_distilled, pick_pairs,
                                   preference_example, rationale_example, run_distill, sample_behaviours, select_ranked)
from usermirror_nb.rationales import rationale_conversation
from usermirror_nb.scenes import LETTERS, render_scene
from usermirror_nb.uncertainty import scene_metrics

SFT_COLUMNS = {"messages", "scene_id", "domain", "choice_cnt", "gt_pos", "behavior_pos", "with_rationale"}
PREF_COLUMNS = {"prompt", "chosen", "rejected", "scene_id", "domain", "choice_cnt", "gt_pos", "chosen_pos", "rejected_pos",
                "chosen_entropy", "rejected_entropy", "chosen_prob", "rejected_prob", "diff_model_uncertainty",
                "teacher_expected_entropy", "student_expected_entropy"}


# ---------------------------------------------------------------- synthetic world
def make_scene(sid: str, domain: str, k: int, gt: int, split: str = "train") -> dict:
    s = {"scene_id": sid, "domain": domain, "split": split, "choice_cnt": k, "gt_pos": gt, "gt_letter": LETTERS[gt],
         "style": "plain", "profile": f"User of {sid}.", "history": ["Old item, rated 4/5"],
         "exposure_texts": [f"item {sid}/{j}" for j in range(k)], "exposure_evidence": [f"chosen by {j} users" for j in range(k)]}
    return {**s, "scene_text": render_scene(s)}


def make_world(n_per_domain: int = 8, n: int = 4, seed: int = 0, rated_frac: float = 0.75, conc: float = 0.6):
    "Train scenes (two domains, k 4 or 5), n rationales per role for the first `rated_frac` of them, their choice_probs and metrics."
    rng = np.random.default_rng(seed)
    train, cp, rats = [], [], []
    for d in ("books", "movielens"):
        for i in range(n_per_domain):
            k = 4 if i % 3 == 0 else 5
            sc = make_scene(f"{d}-{i:04d}", d, k, int(rng.integers(k)))
            train.append(sc)
            if i >= rated_frac * n_per_domain: continue
            for role in ("teacher", "student"):
                for j in range(n):
                    p = rng.dirichlet(np.full(k, conc))
                    if i % 4 == 1: p[sc["gt_pos"]] = 0.0; p /= p.sum()      # every 4th scene: nobody can be right
                    fail = "echoed_prompt" if (role == "student" and j == 0) else ""
                    cp.append(dict(scene_id=sc["scene_id"], domain=d, role=role, sample=j, gt_pos=sc["gt_pos"], choice_cnt=k,
                                   probs=p.tolist(), letter_mass=0.8, entropy=0.0, stated="", failure=fail))
                    rats.append(dict(scene_id=sc["scene_id"], domain=d, role=role, sample=j,
                                     body=f"Stimulus: {role} {j} of {sc['scene_id']}\nKnowledge: k\nEvaluation: logical", failure=fail))
    train, cp, rats = pd.DataFrame(train), pd.DataFrame(cp), pd.DataFrame(rats)
    return train, cp, rats, scene_metrics(cp)


@pytest.fixture(scope="module")
def world():
    return make_world()


def run(world, **kw):
    train, cp, rats, met = world
    return distill_datasets(cp, met, rats, train, **{"seed": 0, **kw})


# ---------------------------------------------------------------- behaviour sampling
def test_sampling_follows_the_distribution_and_the_seed():
    cp = pd.DataFrame([dict(scene_id="s", role="teacher", sample=j, gt_pos=1, choice_cnt=2, probs=[0.2, 0.8]) for j in range(3000)])
    b = sample_behaviours(cp, seed=0)
    assert abs(b["behaviour"].mean() - 0.8) < 0.03                 # P(behaviour = 1) = 0.8
    assert b["correct"].tolist() == (b["behaviour"] == 1).tolist()
    assert np.allclose(b["prob_gt"], 0.8) and np.allclose(b["entropy"], -(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8)))
    other = sample_behaviours(cp, seed=1)
    assert (other["behaviour"] != b["behaviour"]).sum() > 100       # another seed, other draws
    assert sample_behaviours(cp, seed=0)["behaviour"].tolist() == b["behaviour"].tolist()


def test_sampling_does_not_depend_on_row_order_or_on_other_rows(world):
    _, cp, _, _ = world
    a = sample_behaviours(cp, 7).set_index(["scene_id", "role", "sample"])["behaviour"]
    b = sample_behaviours(cp.sample(frac=1.0, random_state=3).reset_index(drop=True), 7).set_index(["scene_id", "role", "sample"])["behaviour"]
    half = sample_behaviours(cp[cp["scene_id"].str.startswith("books")], 7).set_index(["scene_id", "role", "sample"])["behaviour"]
    assert a.to_dict() == b.to_dict()
    assert half.to_dict() == {k: v for k, v in a.items() if k[0].startswith("books")}


@pytest.mark.parametrize("change,msg", [
    (dict(probs=[0.5, 0.5]), "x.parquet: row 1 (scene_id 's1'): probs has 2 entries but choice_cnt is 3"),
    (dict(probs=[0.5, 0.3, 0.1]), "x.parquet: row 1 (scene_id 's1'): probs sum to 0.900000, not 1"),
    (dict(probs=[0.5, float("nan"), 0.5]), "NaN, inf or negative"),
    (dict(gt_pos=3), "gt_pos 3 is outside 0..2"),
    (dict(role="oracle"), "role 'oracle' is not one of"),
    (dict(sample=0), "row 1 (scene_id 's1') repeats (role, sample) = ('teacher', 0)"),
])
def test_bad_choice_probs_rows_are_refused(change, msg):
    rows = [dict(scene_id="s0", role="teacher", sample=0, gt_pos=0, choice_cnt=3, probs=[1.0, 0.0, 0.0]),
            dict(scene_id="s1", role="teacher", sample=1, gt_pos=0, choice_cnt=3, probs=[0.2, 0.3, 0.5])]
    if "sample" in change: rows[1]["scene_id"] = "s0"; msg = msg.replace("'s1'", "'s0'")
    rows[1].update(change)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sample_behaviours(pd.DataFrame(rows), 0, "x.parquet")


def test_missing_column_is_refused():
    with pytest.raises(ValueError, match=r"cp.parquet: missing column\(s\) \['probs'\]"):
        sample_behaviours(pd.DataFrame([dict(scene_id="s", role="teacher", sample=0, gt_pos=0, choice_cnt=2)]), 0, "cp.parquet")


# ---------------------------------------------------------------- chosen / rejected
def beh(sid, role, sample, behaviour, H, gt=0, failure=""):
    return dict(scene_id=sid, domain="d", role=role, sample=sample, gt_pos=gt, choice_cnt=4, behaviour=behaviour,
                correct=behaviour == gt, entropy=H, prob_behaviour=0.4, prob_gt=0.3, failure=failure)


def test_chosen_is_lowest_entropy_correct_teacher_and_rejected_lowest_incorrect_of_both():
    b = pd.DataFrame([beh("s", "student", 0, 0, 0.05),            # correct, lowest entropy, but a student: never chosen
                      beh("s", "teacher", 0, 0, 0.80), beh("s", "teacher", 1, 0, 0.30),
                      beh("s", "teacher", 2, 2, 0.20),            # incorrect teacher, H 0.2 ...
                      beh("s", "student", 1, 3, 0.20),            # ... ties the student: teacher first
                      beh("s", "student", 2, 1, 0.90)])
    p = pick_pairs(b).iloc[0]
    assert (p.status, p.chosen_role, p.chosen_sample, p.chosen_pos) == ("kept", "teacher", 1, 0)
    assert (p.rejected_role, p.rejected_sample, p.rejected_pos) == ("teacher", 2, 2)
    assert p.chosen_entropy == 0.30 and p.rejected_entropy == 0.20
    assert p.teacher_acc == pytest.approx(2 / 3) and p.student_acc == pytest.approx(1 / 3)
    # same rows in another order: the same picks
    q = pick_pairs(b.iloc[::-1].reset_index(drop=True)).iloc[0]
    assert q.drop(labels=["teacher_acc", "student_acc"]).equals(p.drop(labels=["teacher_acc", "student_acc"]))


def test_statuses_and_excluded_failures():
    b = pd.DataFrame([beh("a", "teacher", 0, 1, 0.1), beh("a", "student", 0, 2, 0.1),                     # nothing correct
                      beh("b", "teacher", 0, 1, 0.1), beh("b", "student", 0, 0, 0.1),                     # only the student
                      beh("c", "teacher", 0, 0, 0.1), beh("c", "student", 0, 0, 0.2),                     # nothing wrong
                      beh("d", "teacher", 0, 0, 0.1, failure="echoed_prompt"), beh("d", "teacher", 1, 0, 0.9, failure="truncated"),
                      beh("d", "student", 0, 3, 0.4)])
    p = pick_pairs(b).set_index("scene_id")
    assert p.status.to_dict() == {"a": "no_correct", "b": "no_correct_teacher", "c": "no_incorrect", "d": "kept"}
    assert p.loc["d", "chosen_sample"] == 1                              # the echoed prompt is skipped, the truncated one is fine
    assert pick_pairs(b, chosen_exclude=("echoed_prompt", "truncated")).set_index("scene_id").loc["d", "status"] == "no_correct_teacher"
    assert p.loc["a", "chosen_pos"] == -1 and math.isnan(p.loc["a", "chosen_entropy"])


# ---------------------------------------------------------------- allocation
def test_allocation_properties_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(500):
        avail = {f"g{i}": int(rng.integers(0, 30)) for i in range(int(rng.integers(1, 7)))}
        total = sum(avail.values())
        N = int(rng.integers(0, total + 10))
        out = allocate(avail, N)
        want = total if N == 0 else min(N, total)
        assert sum(out.values()) == want and set(out) == set(avail)
        assert all(0 <= out[g] <= avail[g] for g in avail)
        if total:                                                        # Hamilton: within one seat of the exact quota
            assert all(abs(out[g] - want * avail[g] / total) < 1 for g in avail)


def test_allocation_largest_remainder_by_hand():
    # quotas for N=10 over 42/33/25: 4.2, 3.3, 2.5 -> floors 4, 3, 2 (9); the largest remainder (.5) gets the last seat
    assert allocate({"a": 42, "b": 33, "c": 25}, 10) == {"a": 4, "b": 3, "c": 3}
    assert allocate({"a": 0, "b": 4}, 3) == {"a": 0, "b": 3}
    assert allocate({"a": 2, "b": 2}, 0) == {"a": 2, "b": 2}
    assert allocate({"a": 0}, 5) == {"a": 0}
    with pytest.raises(ValueError, match="budget"): allocate({"a": 1}, -1)


def test_select_ranked_respects_groups_order_and_refuses_short_groups():
    df = pd.DataFrame({"scene_id": [f"s{i}" for i in range(6)], "domain": ["a"] * 4 + ["b"] * 2, "choice_cnt": [5, 5, 5, 4, 5, 5],
                       "key": [1.0, 3.0, 2.0, 9.0, 0.5, 0.7]})
    sel = select_ranked(df, ["key"], [False], budget=4)                  # groups (a,5):3 (a,4):1 (b,5):2 -> 2, 1, 1
    assert sel["scene_id"].tolist() == ["s3", "s1", "s2", "s5"]
    with pytest.raises(ValueError, match="fewer candidates"):
        select_ranked(df, ["key"], [False], counts={("b", 5): 3})


# ---------------------------------------------------------------- strategies
def test_denoising_counts_add_up(world):
    s = run(world)["summary"]
    assert s["scenes_scored"] == s["dropped_no_correct"] + s["no_correct_teacher"] + s["no_incorrect"] + s["kept"] == 12
    assert s["rationales_scored"] == 12 * 8 and s["size"] == s["kept"]   # budget 0 = all kept
    assert s["dropped_no_correct"] >= 4 and s["kept"] >= 4                 # scenes 1 and 5 of each domain cannot be right


def test_all_wrong_scenes_are_dropped():
    train = pd.DataFrame([make_scene("m-1", "movielens", 3, 2), make_scene("m-2", "movielens", 3, 0)])
    cp = pd.DataFrame([dict(scene_id=s, domain="movielens", role=r, sample=j, gt_pos=g, choice_cnt=3, probs=[0.0, 1.0, 0.0], failure="",
                            stated="", letter_mass=1.0) for s, g in (("m-1", 2), ("m-2", 0)) for r in ("teacher", "student") for j in range(2)])
    rats = cp[["scene_id", "role", "sample"]].assign(body="Stimulus: x")
    res = distill_datasets(cp, scene_metrics(cp), rats, train)
    s = res["summary"]
    assert (s["dropped_no_correct"], s["kept"], s["size"]) == (2, 0, 0)
    assert all(len(d["sft"]) == 0 for d in res["datasets"].values())
    assert s["behaviour_accuracy"] == {"student": 0.0, "teacher": 0.0}
    assert len(res["pool"]) == 2                                          # the answer-only pool is every train scene anyway


def test_empty_input():
    train = pd.DataFrame([make_scene("m-1", "movielens", 3, 2)])
    cp = pd.DataFrame(columns=["scene_id", "domain", "role", "sample", "gt_pos", "choice_cnt", "probs", "failure"])
    met = pd.DataFrame(columns=["scene_id", "diff_model_uncertainty", "teacher_expected_entropy", "student_expected_entropy"])
    res = distill_datasets(cp, met, pd.DataFrame(columns=["scene_id", "role", "sample", "body"]), train, budget=5)
    s = res["summary"]
    assert (s["scenes_scored"], s["kept"], s["size"], s["behaviour_accuracy"]) == (0, 0, 0, {})
    assert {k: v["sft"] for k, v in s["strategies"].items()} == {k: 0 for k in DISTILL_STRATEGIES}
    assert len(res["pool"]) == 1 and len(res["behaviours"]) == 0 and len(res["pairs"]) == 0


def test_budget_larger_than_available_takes_all_kept(world):
    s_all, s_big = run(world)["summary"], run(world, budget=10_000)["summary"]
    assert s_big["size"] == s_all["kept"] == s_big["kept"]
    assert s_big["strategies"]["uncertainty"]["scene_ids"] == s_all["strategies"]["uncertainty"]["scene_ids"]


def test_budget_and_same_size_and_mix_for_every_strategy(world):
    res = run(world, budget=5)
    s = res["summary"]
    assert s["size"] == 5
    mixes = {k: v["by_domain"] for k, v in s["strategies"].items()}
    assert all(m == mixes["uncertainty"] for m in mixes.values()), mixes
    assert all(v["sft"] == 5 for v in s["strategies"].values())
    assert all(v["pref"] == 5 for k, v in s["strategies"].items() if k != "random_answer_only")
    assert s["strategies"]["random_answer_only"]["pref"] is None
    kept = set(res["pairs"].loc[res["pairs"]["status"] == "kept", "scene_id"])
    assert all(set(v["scene_ids"]) <= kept for k, v in s["strategies"].items() if k != "random_answer_only")
    # the same (domain, choice_cnt) counts for every strategy
    groups = {k: sorted((r["domain"], r["choice_cnt"]) for r in d["sft"]) for k, d in res["datasets"].items()}
    assert all(g == groups["uncertainty"] for g in groups.values())


def test_strategy_orders_by_hand(world):
    res = run(world)
    kept = res["pairs"][res["pairs"]["status"] == "kept"].copy()
    ids = {k: v["scene_ids"] for k, v in res["summary"]["strategies"].items()}
    # budget 0: every kept scene, each group in rank order; the method's order is diff_model_uncertainty, descending, within each group
    for strat, key, desc in (("uncertainty", "diff_model_uncertainty", True), ("teacher_acc_high", "teacher_acc", True),
                             ("teacher_acc_low", "teacher_acc", False)):
        v = kept.set_index("scene_id").loc[ids[strat], key].to_numpy()
        assert sorted(ids[strat]) == sorted(kept["scene_id"])
        assert list(v) == sorted(v, reverse=desc), strat
    kept["acc_diff"] = kept["teacher_acc"] - kept["student_acc"]
    v = kept.set_index("scene_id").loc[ids["acc_diff"], "acc_diff"].to_numpy()
    assert list(v) == sorted(v, reverse=True)
    # with a budget: the top of each group (high / low accuracy pick opposite ends)
    small = run(world, budget=3)["summary"]["strategies"]
    hi = kept.set_index("scene_id").loc[small["teacher_acc_high"]["scene_ids"], "teacher_acc"]
    lo = kept.set_index("scene_id").loc[small["teacher_acc_low"]["scene_ids"], "teacher_acc"]
    assert hi.mean() >= lo.mean()


def test_random_answer_only_draws_from_train_scenes_not_only_kept():
    train, cp, rats, met = make_world(n_per_domain=30, rated_frac=0.2, seed=1)
    res = distill_datasets(cp, met, rats, train, seed=0)
    kept = set(res["pairs"].loc[res["pairs"]["status"] == "kept", "scene_id"])
    ao = res["summary"]["strategies"]["random_answer_only"]["scene_ids"]
    assert len(ao) == len(kept) and not set(ao) <= kept                   # random train scenes, mostly unscored
    assert all(r["with_rationale"] is False for r in res["datasets"]["random_answer_only"]["sft"])


def test_determinism_across_row_order(world):
    train, cp, rats, met = world
    a = distill_datasets(cp, met, rats, train, seed=5, budget=6)
    shuf = lambda d: d.sample(frac=1.0, random_state=11).reset_index(drop=True)
    b = distill_datasets(shuf(cp), shuf(met), shuf(rats), shuf(train), seed=5, budget=6)
    assert a["datasets"] == b["datasets"] and a["pool"] == b["pool"]
    assert a["summary"] == b["summary"]
    assert a["behaviours"].equals(b["behaviours"])
    c = distill_datasets(cp, met, rats, train, seed=6, budget=6)
    assert not c["behaviours"]["behaviour"].equals(a["behaviours"]["behaviour"])


def test_examples_follow_the_contract(world):
    res = run(world, budget=4)
    train, cp, rats, met = world
    scenes = train.set_index("scene_id")
    beh = res["behaviours"].set_index(["scene_id", "role", "sample"])
    pairs = res["pairs"].set_index("scene_id")
    for sft, pref in zip(res["datasets"]["uncertainty"]["sft"], res["datasets"]["uncertainty"]["pref"]):
        assert set(sft) == SFT_COLUMNS and set(pref) == PREF_COLUMNS
        sid, k = sft["scene_id"], sft["choice_cnt"]
        assert sft["messages"][:2] == rationale_conversation(scenes.loc[sid, "scene_text"], k) == pref["prompt"]
        p = pairs.loc[sid]
        assert sft["behavior_pos"] == sft["gt_pos"] == p.chosen_pos == pref["chosen_pos"]
        body = rats.set_index(["scene_id", "role", "sample"]).loc[(sid, p.chosen_role, p.chosen_sample), "body"]
        assert sft["messages"][2] == {"role": "assistant", "content": body.strip() + f"\nBehavior: [{LETTERS[sft['gt_pos']]}]"}
        assert pref["chosen"] == [sft["messages"][2]]
        assert pref["rejected"][0]["content"].endswith(f"\nBehavior: [{LETTERS[pref['rejected_pos']]}]")
        assert pref["rejected_pos"] != pref["gt_pos"]
        assert p.chosen_role == "teacher"
        probs = np.asarray(cp.set_index(["scene_id", "role", "sample"]).loc[(sid, p.chosen_role, p.chosen_sample), "probs"])
        assert pref["chosen_prob"] == pytest.approx(probs[pref["chosen_pos"]])
        assert pref["chosen_entropy"] == pytest.approx(beh.loc[(sid, p.chosen_role, p.chosen_sample), "entropy"])
        m = met.set_index("scene_id").loc[sid]
        assert pref["diff_model_uncertainty"] == pytest.approx(m.diff_model_uncertainty)
        assert pref["rejected_entropy"] == pytest.approx(beh.loc[(sid, p.rejected_role, p.rejected_sample), "entropy"])
        wrong = beh.loc[sid][~beh.loc[sid]["correct"]]
        assert pref["rejected_entropy"] == pytest.approx(wrong["entropy"].min())      # the lowest-entropy incorrect one


def test_answer_only_and_style_builders():
    sc = make_scene("b-1", "books", 4, 3)
    ao = answer_only_example(sc)
    assert ao["messages"] == rationale_conversation(sc["scene_text"], 4) + [{"role": "assistant", "content": "Behavior: [D]"}]
    assert (ao["behavior_pos"], ao["with_rationale"], ao["choice_cnt"]) == (3, False, 4)
    ev = answer_only_example(sc, style="evidence")
    assert ev["messages"][1]["content"] == rationale_conversation(render_scene(sc, "evidence"), 4)[1]["content"]
    assert "evidence: chosen by 3 users" in ev["messages"][1]["content"] and "evidence:" not in ao["messages"][1]["content"]
    ex = rationale_example(sc, "\n Stimulus: s \n", 3, style="evidence")
    assert ex["messages"][2]["content"] == "Stimulus: s\nBehavior: [D]" and ex["with_rationale"] is True
    pe = preference_example(sc, "Stimulus: a", 3, "Stimulus: b", 1)
    assert pe["rejected"] == [{"role": "assistant", "content": "Stimulus: b\nBehavior: [B]"}]
    with pytest.raises(ValueError, match="rejected_pos 4 is outside 0..3"): preference_example(sc, "a", 3, "b", 4)


def test_unknown_strategy_and_missing_rationale_are_refused(world):
    train, cp, rats, met = world
    with pytest.raises(ValueError, match="unknown distillation strategy"):
        distill_datasets(cp, met, rats, train, strategies=["uncertainty", "magic"])
    with pytest.raises(ValueError, match="no rationale for scene_id"):
        distill_datasets(cp, met, rats.iloc[0:0], train)
    with pytest.raises(ValueError, match="are not in train scenes"):
        distill_datasets(cp, met, rats, train.iloc[2:])


# ---------------------------------------------------------------- run_distill end to end
def write_results(root, world, valid_eval=True):
    train, cp, rats, met = world
    for rel, df in (("scenes/train.parquet", train), ("rationales/rationales.parquet", rats),
                    ("uncertainty/choice_probs.parquet", cp), ("uncertainty/scenes.parquet", met)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(root / rel, index=False)
    if valid_eval:
        for split in ("valid", "eval"):
            pd.DataFrame([make_scene(f"{split}-{i}", "books", 5, i, split) for i in range(3)]).to_parquet(root / f"scenes/{split}.parquet", index=False)


@pytest.fixture
def cfg(tmp_path):
    return config_from_dict({"profile": "t", "results_root": str(tmp_path), "seed": 2, "distill": {"budget": 5},
                             "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}]})


def test_run_distill_end_to_end(cfg, world):
    write_results(cfg.results_dir, world)
    out = run_distill(cfg)
    assert out == cfg.results_dir / "distill"
    s = json.loads((out / "summary.json").read_text())
    assert s["size"] == 5 and s["scenes_scored"] == 12 and s["rationales_scored"] == 96 and s["rationales_read"] == 96
    assert s["config_hash"] == cfg.hash() and s["budget"] == 5
    for strat in DISTILL_STRATEGIES:
        sft = load_distilled(cfg, strat)
        assert set(sft.column_names) == SFT_COLUMNS and len(sft) == 5 == s["strategies"][strat]["sft"]
        if strat == "random_answer_only":
            assert not (out / strat / "pref.parquet").exists()
            with pytest.raises(FileNotFoundError, match="answer-only"): load_distilled(cfg, strat, "pref")
        else:
            pref = load_distilled(cfg, strat, "pref")
            assert set(pref.column_names) == PREF_COLUMNS and len(pref) == 5
    pool = load_distilled(cfg, "answer_only_pool")
    train = world[0]
    assert sorted(pool["scene_id"]) == sorted(train["scene_id"])          # every train scene, no valid/eval scene
    assert all(m[2]["content"] == f"Behavior: [{LETTERS[g]}]" for m, g in zip(pool["messages"], pool["gt_pos"]))
    beh = pd.read_parquet(out / "behaviours.parquet")
    assert {"scene_id", "role", "sample", "behaviour", "correct", "entropy"} <= set(beh.columns) and len(beh) == 96
    assert beh.equals(sample_behaviours(world[1], 2).astype(beh.dtypes.to_dict()))
    rec = json.loads((cfg.results_dir / "stages" / "distill.json").read_text())
    assert rec["status"] == "done" and rec["counts"]["kept"] == s["kept"] and rec["counts"]["size"] == 5
    assert not [p for p in cfg.results_dir.iterdir() if p.name.startswith(".")]          # no temporary folders left
    # a rerun replaces the folder (a stale strategy folder disappears)
    (out / "stale").mkdir()
    run_distill(cfg)
    assert not (out / "stale").exists()


def test_run_distill_refuses_missing_inputs_and_bad_rows(cfg, world):
    with pytest.raises(FileNotFoundError, match=r"scenes/train.parquet does not exist: run the scenes \(02_scenes\) stage first"):
        run_distill(cfg)
    write_results(cfg.results_dir, world, valid_eval=False)
    (cfg.results_dir / "uncertainty" / "scenes.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"uncertainty/scenes.parquet does not exist: run the uncertainty \(05_uncertainty\)"):
        run_distill(cfg)
    train, cp, rats, met = world
    bad = cp.copy(); bad.at[3, "probs"] = bad.at[3, "probs"][:-1]
    write_results(cfg.results_dir, (train, bad, rats, met), valid_eval=False)
    with pytest.raises(ValueError, match=rf"choice_probs.parquet: row 3 \(scene_id '{cp.at[3, 'scene_id']}'\): probs has"):
        run_distill(cfg)
    with pytest.raises(FileNotFoundError, match=r"run the distill stage \(06_distill\) first"):
        load_distilled(cfg)
