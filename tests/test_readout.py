"Readouts (04a_readout) and the lm run's corpus (07_finetune) on real ML-100K scenes and the real SmolLM2."
import numpy as np
import pandas as pd
import pytest
import torch

from usermirror_nb.config import DomainConfig, LLMConfig, ScenesConfig, config_from_dict
from usermirror_nb.readout import READOUTS, choice_distributions, cloze_distribution, option_texts
from usermirror_nb.scenes import _rng, build_scenes, plan_scenes, prepare_domain


@pytest.fixture(scope="module")
def dom(ml_raw):
    return prepare_domain(ml_raw.users, ml_raw.items, ml_raw.interactions, DomainConfig(name="movielens", source="ml-100k", positive_min=4))


@pytest.fixture(scope="module")
def scenes(dom):
    sc = ScenesConfig(style="plain", history_len=4, train_scenes=6, eval_scenes=4, valid_scenes=2, samplers={"random": 1.0, "popularity": 1.0})
    from usermirror_nb.scenes import render_scene
    df = build_scenes(dom, sc, seed=0)
    return df.assign(scene_text=[render_scene(r) for r in df.to_dict("records")])


@pytest.fixture(scope="module")
def llm():
    from usermirror_nb.llm import make_llm
    m = make_llm(LLMConfig(model="smollm2-135m-instruct", batch_size=10, dtype="float32"))
    yield m
    m.close()


def _naive_cloze(llm, scene, body=""):
    "Each option scored alone: one full forward of prompt + option per option, summed log-prob of the option tokens."
    from usermirror_nb.rationales import rationale_conversation
    from usermirror_nb.readout import assistant_text
    p = llm.encode(llm.prompt(rationale_conversation(scene["scene_text"], 5), assistant_text(body, "cloze")))
    rows = []
    for o in option_texts(scene):
        q = llm.encode(o)
        with torch.inference_mode(): lp = llm.model(input_ids=torch.tensor([p + q])).logits[0].double().log_softmax(-1)
        rows.append([float(sum(lp[len(p) - 1 + t, q[t]] for t in range(len(q)))), len(q)])
    return np.array(rows)


def test_batched_cloze_equals_option_by_option_scoring(llm, scenes):
    recs = scenes.head(4).to_dict("records")
    bodies = [[""], ["Stimulus: a quiet evening.\nKnowledge: liked dramas.\nEvaluation: habitual.", ""], [""], [""]]
    got = choice_distributions(llm, recs, bodies, "cloze")
    for s, bs, cp in zip(recs, bodies, got):
        assert cp.probs.shape == (len(bs), 5) and np.all(np.isnan(cp.letter_mass))
        for b, row in zip(bs, cp.probs):
            np.testing.assert_allclose(row, cloze_distribution(_naive_cloze(llm, s, b)), atol=2e-3)
    summed = choice_distributions(llm, recs[:1], None, "cloze_sum")[0].probs[0]
    np.testing.assert_allclose(summed, cloze_distribution(_naive_cloze(llm, recs[0]), "sum"), atol=2e-3)


def test_letter_readout_is_the_backends_letter_probabilities(llm, scenes):
    from usermirror_nb.rationales import rationale_conversation
    recs = scenes.head(3).to_dict("records")
    got = choice_distributions(llm, recs, None, "letter")
    ref = llm.choice_probs([rationale_conversation(s["scene_text"], 5) for s in recs], [["Behavior: ["]] * 3, 5)
    for g, r in zip(got, ref): np.testing.assert_allclose(g.probs, r.probs); np.testing.assert_allclose(g.letter_mass, r.letter_mass)


def test_debiased_letter_removes_the_position_prior(llm, scenes):
    recs = scenes.head(3).to_dict("records")
    letter = np.stack([c.probs[0] for c in choice_distributions(llm, recs, None, "letter")])
    deb = np.stack([c.probs[0] for c in choice_distributions(llm, recs, None, "letter_debiased")])
    np.testing.assert_allclose(deb.sum(1), 1.0)
    # the base model answers A almost always; averaged over the 5 shifts no position keeps that prior
    assert letter[:, 0].mean() > deb[:, 0].mean() and deb.max(1).mean() < letter.max(1).mean()


def test_cloze_needs_a_backend_that_scores_continuations(scenes):
    from usermirror_nb.llm import LLMError
    class LettersOnly:                     # e.g. an OpenAI-compatible server: letters only
        def choice_probs(self, *a, **k): raise AssertionError("not reached")
    with pytest.raises(LLMError, match="readout 'cloze' scores each item's text"):
        choice_distributions(LettersOnly(), scenes.head(1).to_dict("records"), None, "cloze")
    with pytest.raises(ValueError, match="readout must be one of"):
        choice_distributions(LettersOnly(), scenes.head(1).to_dict("records"), None, "cloze_mean")
    assert READOUTS == ("letter", "letter_debiased", "cloze", "cloze_sum", "history", "history_sum")
    for r in ("history", "history_sum"):
        with pytest.raises(LLMError, match=f"readout '{r}' scores each item's title"):
            choice_distributions(LettersOnly(), scenes.head(1).to_dict("records"), None, r)


def test_history_readout_scores_titles_after_the_users_history_in_the_lm_corpus_format(llm, scenes, dom):
    from usermirror_nb.finetune import lm_sequences
    from usermirror_nb.readout import history_options, history_prompt, shifted_scene
    recs = scenes.head(4).to_dict("records")
    got = choice_distributions(llm, recs, None, "history")
    for s, cp in zip(recs, got):
        assert cp.probs.shape == (1, 5) and np.all(np.isnan(cp.letter_mass))
        np.testing.assert_allclose(cp.probs.sum(1), 1.0)
        # the same numbers as scoring each title alone after the prompt (mean token log-prob)
        p = llm.encode(history_prompt(s)); rows = []
        for o in history_options(s):
            q = llm.encode(o)
            with torch.inference_mode(): lp = llm.model(input_ids=torch.tensor([p + q])).logits[0].double().log_softmax(-1)
            rows.append([float(sum(lp[len(p) - 1 + t, q[t]] for t in range(len(q)))), len(q)])
        np.testing.assert_allclose(cp.probs[0], cloze_distribution(np.array(rows)), atol=2e-3)
        summed = choice_distributions(llm, [s], None, "history_sum")[0].probs[0]     # the same titles, summed log-prob
        np.testing.assert_allclose(summed, cloze_distribution(np.array(rows), "sum"), atol=2e-3)
    # the exposure order is not in the prompt: a shifted list gives the same distribution over the items
    sh = choice_distributions(llm, [shifted_scene(recs[0], 2)], None, "history")[0].probs[0]
    np.testing.assert_allclose(sh, np.roll(got[0].probs[0], -2), atol=1e-5)
    # every history line is a line of that user's sequence in the lm corpus (lm_line: title), in the same order
    u = int(np.flatnonzero(dom.user_ids == recs[0]["user_id"])[0])
    corpus = lm_sequences(dom, np.arange(dom.n_users) == u, positive_only=False, line="title")[0].split("\n")
    lines = history_prompt(recs[0]).split("\n")
    assert lines[0] == corpus[0] and lines[-1] == "-"
    pos = [corpus.index(l) for l in lines[1:-1]]
    assert pos == sorted(pos) and len(pos) == len(recs[0]["history"])
    # after a rationale: one row per body; the empty body is the direct-mode row, and the notes sit above the same history
    body = "Evaluation: this user wants" + history_options(recs[0])[3] + " tonight."
    two = choice_distributions(llm, recs[:1], [["", body]], "history")[0].probs
    np.testing.assert_allclose(two[0], got[0].probs[0], atol=1e-6)
    assert two[1][3] > two[0][3], two            # a note naming an item moves probability to it
    assert history_prompt(recs[0], body) == "## Notes\n" + body + "\n" + history_prompt(recs[0])


def test_lm_corpus_holds_training_users_only(ml_raw, dom, tmp_path):
    from usermirror_nb.finetune import lm_corpus
    cfg = config_from_dict({"profile": "t", "results_root": str(tmp_path), "assets": {"models": []},
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}],
                            "scenes": {"valid_scenes": 10}})
    from usermirror_nb.assets import run_assets
    run_assets(cfg)
    texts = lm_corpus(cfg)["movielens"]
    plan = plan_scenes(dom, cfg.scenes, _rng(cfg.seed, dom.name, 0))
    held = plan.is_eval_user | plan.is_valid_user
    assert plan.is_valid_user.sum() > 0 and held.sum() < dom.n_users
    # every text is one training user's liked items in time order; no held-out user's sequence is in the corpus
    from usermirror_nb.scenes import TEMPLATES
    fb = TEMPLATES["ml-100k"][2]
    want = {}
    for u in np.flatnonzero(~held):
        idx = np.arange(dom.ptr[u], dom.ptr[u + 1]); idx = idx[dom.feedback[idx] >= 4]
        if len(idx) >= 2: want["\n".join(f"- {dom.item_text[dom.items[p]]} — {fb(dom.feedback[p])}" for p in idx)] = u
    got = [t.split("\n", 1)[1] for t in texts]
    assert set(got) == set(want) and len(got) == len(want)
    held_texts = set()
    for u in np.flatnonzero(held):
        idx = np.arange(dom.ptr[u], dom.ptr[u + 1]); idx = idx[dom.feedback[idx] >= 4]
        held_texts.add("\n".join(f"- {dom.item_text[dom.items[p]]} — {fb(dom.feedback[p])}" for p in idx))
    assert not (held_texts & set(got))


def test_shared_system_turn_is_encoded_once_and_changes_no_result(llm, scenes):
    "prefill (03_llm): the prompts' common prefix (the system turn with the EKB instructions) is encoded once per batch."
    from usermirror_nb.llm import Sampling
    from usermirror_nb.rationales import ASSISTANT_PREFIX, rationale_conversation
    recs = scenes.head(3).to_dict("records")
    prompts = [llm.prompt(rationale_conversation(s["scene_text"], 5), ASSISTANT_PREFIX) for s in recs]
    ids = [llm.encode(p) for p in prompts]
    before = llm.stats.get("shared_prefix_tokens", 0)
    with torch.inference_mode():
        last, _, am = llm.prefill(ids)
        alone = [llm.model(input_ids=torch.tensor([p])).logits[0, -1] for p in ids]
    shared = llm.stats["shared_prefix_tokens"] - before
    assert shared >= 2 * 150, shared                      # the ~225-token system turn, saved for 2 of the 3 prompts
    assert am.sum(1).tolist() == [len(p) for p in ids]
    for a, b in zip(last, alone):
        np.testing.assert_allclose(a.float().log_softmax(-1).numpy(), b.float().log_softmax(-1).numpy(), atol=2e-3)
    greedy = Sampling(temperature=0)
    batch = llm.generate_fields(prompts, 1, ["\nKnowledge:"], greedy, field_tokens=6)
    assert batch == [llm.generate_fields([p], 1, ["\nKnowledge:"], greedy, field_tokens=6)[0] for p in prompts]
