"""The whole executable paper (stages 00-10, real papermill, real SmolLM2, real ML-100K) on the `tiny` profile.

Checks that every stage finishes, that REPORT.md has its tables, and that the numbers in the report are the numbers
in the artifacts (metrics.parquet of the evaluate and baselines stages). Results go to a temporary results_root.
"""
import json, re
from pathlib import Path

import pandas as pd
import pytest

from usermirror_nb.config import STAGES, load_config
from usermirror_nb.paper import run_paper
from usermirror_nb.report import ci

ROOT = Path(__file__).resolve().parents[1]


# Not marked slow: it runs in `make test` (about 9 min on the 2-core machine, measured beside another job).


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    overrides = f"results_root={root}"
    summary = run_paper("tiny", overrides)
    cfg = load_config("tiny", overrides)
    return summary, cfg, cfg.results_dir


def test_every_stage_done(tiny):
    summary, cfg, out = tiny
    status = {r["stage"]: r["status"] for r in summary["stages"]}
    assert status == {s: "done" for s in STAGES}, status
    for s in STAGES:
        rec = json.loads((out / "stages" / f"{s}.json").read_text())
        assert rec["status"] == "done" and rec["config_hash"] == cfg.hash()


def test_report_sections_and_figures(tiny):
    _, cfg, out = tiny
    text = (out / "REPORT.md").read_text()
    for title in ("How to read this report", "Main table", "Headline", "SFT, DPO and RosePO-smoothed DPO", "Distillation ablation",
                  "Hybrid simulator", "Task difficulty", "Position bias", "Readouts: the same model read as letters or as item texts",
                  "What the models learned from", "Rationales: parsed, and teacher vs student",
                  "Paired differences on the same scenes", "Wall time per stage", "Provenance"):
        assert f"## {title}" in text, title
    for link in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (out / link).exists(), link


def test_report_numbers_match_the_artifacts(tiny):
    _, cfg, out = tiny
    m = pd.concat([pd.read_parquet(out / "evaluate" / "metrics.parquet"), pd.read_parquet(out / "baselines" / "metrics.parquet")])
    rep = json.loads((out / "report.json").read_text())
    text = (out / "REPORT.md").read_text()
    main = rep["main"]
    models = {r["model"] for r in main}
    want = {"smollm2-135m-instruct", "smollm2-135m-instruct[letter]", "lm", "sft", "dpo", "dpo_smoothed", "random", "popularity", "item_knn", "sasrec", "aaai2025", "hybrid"}
    assert want <= models, want - models
    for r in main:
        x = m[(m.model == r["model"]) & (m.split == "eval") & (m["mode"] == "direct") & (m.group == "all")].iloc[0]
        cell = ci(x["accuracy"], x["accuracy_lo"], x["accuracy_hi"])
        assert r["accuracy % (all)"] == cell
        assert f"| {r['model']} |" in text and cell in text
        assert int(r["n (all)"]) == int(x["n"]) == 12
    # the headline names the best non-random baseline of the artifacts and says where the fine-tuned model stands
    hl = {r["group"]: r for r in rep["headline"]}["all"]
    bl = m[(m.split == "eval") & (m["mode"] == "direct") & (m.group == "all") & m.model.isin(["popularity", "item_knn", "sasrec", "aaai2025"])]
    assert hl["baseline"] in set(bl.loc[bl.accuracy == bl.accuracy.max(), "model"]) and hl["base"] == "smollm2-135m-instruct"
    assert len(hl["verdicts"]) == 5 and f"**all**: base student `smollm2-135m-instruct`" in text
    assert hl["llm_only"] in {"smollm2-135m-instruct", "lm", "sft", "dpo", "dpo_smoothed"} and "popularity's" in hl["verdicts"][3]
    # paired differences: every fine-tuned model against the base student, on the 12 scenes both scored
    pr = {(r["a"], r["b"]): r for r in rep["paired"]}
    for ft in ("lm", "sft", "dpo", "dpo_smoothed"):
        r = pr[(ft, "smollm2-135m-instruct")]
        assert r["scenes"] == 12 and r["accuracy_diff_lo"] <= r["accuracy_diff"] <= r["accuracy_diff_hi"]
        assert r["verdict"] == ("above" if r["accuracy_diff_lo"] > 0 else "below" if r["accuracy_diff_hi"] < 0 else "not distinguishable from")
    # teacher vs student: both roles and their paired difference, from stage 05's choice_probs
    assert set(rep["teacher_vs_student"]) == {"teacher", "student", "teacher - student"}
    assert [r["role"] for r in rep["rationales"]] == ["student", "teacher"] and all(r["written"] == 8 for r in rep["rationales"])
