"""Rationale parsing edge cases, and an interrupted generation run that resumes with nothing lost (real SmolLM2)."""
import json

import pandas as pd
import pytest

from usermirror_nb.rationales import (FAILURE_KINDS, STOP_REGEX, failure_counts, generate_rationales, parse_rationale,
                                      rationale_conversation, read_jsonl)


@pytest.mark.parametrize("text,kind", [
    ("", "empty"), ("Stimulus:", "empty"), ("   ", "empty"),
    ("Stimulus: boredom\nKnowledge: quality\nEvaluation: logical\n", "no_behavior"),
    ("Stimulus: boredom\nKnowledge: quality\nEvaluation: logical\nBehavior: [F]", "letter_outside_exposure"),
    ("Stimulus: boredom\nEvaluation: logical\nBehavior: [A]", "missing_stage"),
    ("Stimulus: boredom\nKnowledge: quality\nEvaluation: habitual, as always\nBehavior: [E]", ""),
    ("Stimulus: what moves the user to choose right now - one to three factors\nBehavior: the one item the user chooses, "
     "written exactly as Behavior: [A]", "echoed_prompt"),
])
def test_failure_kinds(text, kind):
    p = parse_rationale(text, 5)
    assert p["failure"] == kind
    assert kind in FAILURE_KINDS or kind == ""


def test_truncated_is_told_apart_from_no_behavior():
    assert parse_rationale("Stimulus: it was a long day and", 5, truncated=True)["failure"] == "truncated"
    assert parse_rationale("Stimulus: it was a long day and", 5, truncated=False)["failure"] == "no_behavior"
    # a truncated text that still reached a behaviour line is not a failure
    assert parse_rationale("Stimulus: a\nKnowledge: b\nEvaluation: c\nBehavior: [B]", 5, truncated=True)["failure"] == ""


def test_fields_and_body():
    t = "Stimulus: curiosity\nKnowledge: novelty, past\n experience\nEvaluation: intuitive - a hunch\nBehavior: [C]\nextra"
    p = parse_rationale(t, 5)
    assert p["knowledge"] == "novelty, past experience"
    assert p["evaluation_style"] == "intuitive" and p["behavior"] == "C"
    assert "Behavior" not in p["body"] and p["body"].startswith("Stimulus: curiosity")
    assert parse_rationale("**Stimulus:** x\n**Knowledge:** y\n**Evaluation:** z\nBehavior: [a]", 3)["behavior"] == "A"


def test_reparse_applies_parser_fixes_to_stored_records():
    from usermirror_nb.rationales import reparse
    old = {"text": "Stimulus: a\nKnowledge: b\nEvaluation: c\nBehavior: [B]", "choice_cnt": 3, "gt_letter": "B",
           "failure": "no_behavior", "behavior": "", "stated_hit": False}
    r = reparse(old)
    assert (r["failure"], r["behavior"], r["stated_hit"], r["truncated"]) == ("", "B", True, False)
    assert reparse({**old, "text": "Stimulus: a and", "failure": "truncated"})["failure"] == "truncated"


def test_letters_bounds_in_prompt():
    with pytest.raises(ValueError, match="2 to 26"):
        rationale_conversation("scene", 27)


class Interrupting:
    "Wraps a real backend and raises KeyboardInterrupt on the call after `after` calls (an interrupted run)."
    def __init__(self, llm, after):
        self.llm, self.after, self.calls, self.name = llm, after, 0, llm.name
        self.count_tokens = llm.count_tokens

    def generate(self, convs, **kw):
        if self.calls == self.after: raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.scenes_seen = getattr(self, "scenes_seen", 0) + len(convs)
        return self.llm.generate(convs, **kw)


@pytest.fixture(scope="module")
def smollm():
    from usermirror_nb.config import LLMConfig
    from usermirror_nb.llm import make_llm
    llm = make_llm(LLMConfig(model="smollm2-135m-instruct", batch_size=8))
    yield llm
    llm.close()


def _scenes(n):
    return [{"scene_id": f"s{i}", "domain": "d", "choice_cnt": 3, "gt_letter": "B",
             "scene_text": f"## User profile\nA reader.\n\n## Exposure list\n[A] Book {i}\n[B] Book {i + 1}\n[C] Book {i + 2}"}
            for i in range(n)]


def test_interrupted_run_resumes_with_nothing_lost(tmp_path, smollm):
    from usermirror_nb.llm import Sampling
    out = tmp_path / "teacher.jsonl"
    sampling = Sampling(max_new_tokens=12, seed=1, stop_regex=STOP_REGEX)
    scenes = _scenes(5)
    first = Interrupting(smollm, after=2)
    with pytest.raises(KeyboardInterrupt):
        generate_rationales(first, scenes, "teacher", out, n=2, sampling=sampling, batch_scenes=2, progress=False, staged=False)
    done = read_jsonl(out)
    assert len(done) == 2 * 2 * 2                       # two finished batches of 2 scenes x 2 samples survived
    with open(out, "a") as f: f.write('{"scene_id": "s4", "sam')   # and a torn line from the crash
    second = Interrupting(smollm, after=99)
    recs = generate_rationales(second, scenes, "teacher", out, n=2, sampling=sampling, batch_scenes=2, progress=False, staged=False)
    assert second.calls == 1 and second.scenes_seen == 1     # only the missing scene was generated
    assert sorted((r["scene_id"], r["sample"]) for r in recs) == [(f"s{i}", j) for i in range(5) for j in range(2)]
    assert recs[:len(done)] == done                          # finished records untouched
    for r in recs:
        assert r["text"].startswith("Stimulus:") and r["role"] == "teacher"
        assert r["failure"] in ("",) + FAILURE_KINDS
    fc = failure_counts(recs)["teacher"]
    assert fc["total"] == 10 and fc["valid"] + sum(fc["failures"].values()) == 10
    # with 12 new tokens almost nothing reaches a behaviour line: those are counted as truncated, not dropped
    assert fc["failures"]["truncated"] >= 5


def test_a_changed_scene_text_is_written_afresh_and_the_old_record_kept(tmp_path, smollm):
    "Resume skips a (scene, sample) only when its record was written for the same text by the same model."
    from usermirror_nb.llm import Sampling
    out = tmp_path / "teacher.jsonl"
    sampling = Sampling(max_new_tokens=8, seed=1, stop_regex=STOP_REGEX)
    scenes = _scenes(2)
    old = generate_rationales(smollm, scenes, "teacher", out, n=1, sampling=sampling, progress=False, staged=False)
    scenes[1] = {**scenes[1], "scene_text": scenes[1]["scene_text"].replace("A reader.", "A reader from Oslo.")}   # rebuilt scene
    llm = Interrupting(smollm, after=99)
    recs = generate_rationales(llm, scenes, "teacher", out, n=1, sampling=sampling, progress=False, staged=False)
    assert llm.scenes_seen == 1                                     # only the changed scene was written again
    assert [r["scene_id"] for r in recs] == ["s0", "s1"] and recs[0] == old[0] and recs[1]["key"] != old[1]["key"]
    assert len(read_jsonl(out)) == 3                                # the stale record is kept in the file, not returned


def test_real_rationale_generation_is_seeded(tmp_path, smollm):
    from usermirror_nb.llm import Sampling
    s = Sampling(max_new_tokens=24, seed=5, stop_regex=STOP_REGEX)
    a = generate_rationales(smollm, _scenes(2), "student", tmp_path / "a.jsonl", n=2, sampling=s, progress=False)
    b = generate_rationales(smollm, _scenes(2), "student", tmp_path / "b.jsonl", n=2, sampling=s, progress=False)
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert len({r["text"] for r in a}) > 1                  # sampling, not greedy copies


class FieldsInterrupting:
    "A real backend whose structured generation raises KeyboardInterrupt on the call after `after` calls."
    def __init__(self, llm, after):
        self.llm, self.after, self.calls, self.name = llm, after, 0, llm.name
        self.count_tokens, self.prompt = llm.count_tokens, llm.prompt

    def generate_fields(self, prompts, *a, **kw):
        if self.calls == self.after: raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self.llm.generate_fields(prompts, *a, **kw)


def test_staged_rationales_have_every_stage_and_resume(tmp_path, smollm):
    from usermirror_nb.llm import Sampling
    from usermirror_nb.rationales import STAGE_NAMES
    out = tmp_path / "student.jsonl"
    s = Sampling(temperature=1.0, top_p=0.9, seed=2)
    first = FieldsInterrupting(smollm, after=1)
    with pytest.raises(KeyboardInterrupt):
        generate_rationales(first, _scenes(4), "student", out, n=2, sampling=s, batch_scenes=2, progress=False, field_tokens=8)
    assert len(read_jsonl(out)) == 4                         # the finished batch survived
    recs = generate_rationales(FieldsInterrupting(smollm, after=99), _scenes(4), "student", out, n=2, sampling=s, batch_scenes=2,
                               progress=False, field_tokens=8)
    assert len(recs) == 8
    for r in recs:
        assert r["staged"] and [l.split(":")[0] for l in r["text"].splitlines()] == list(STAGE_NAMES)
        assert all(r[st.lower()] for st in STAGE_NAMES)       # no field is empty (constrained decoding)
        assert r["failure"] in ("", "echoed_prompt")          # a staged rationale needs no behaviour line
        assert r["behavior"] == "" and not r["stated_hit"]
