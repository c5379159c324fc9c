"Recommenders in the loop (12_policies) on real ML-100K users: catalogue recommenders, episodes, SB3 PPO, replay metrics, rank agreement."
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from usermirror_nb.baselines import fit_domain
from usermirror_nb.config import BaselinesConfig, DomainConfig
from usermirror_nb.env import ClassicChoice, RecSimEnv, UserState
from usermirror_nb.policies import (BlendEnv, CatalogueRecommender, PolicyRecommender, item_factors, offline_metrics, rank_agreement,
                                    run_episodes, summarise, train_ppo)
from usermirror_nb.scenes import prepare_domain


@pytest.fixture(scope="module")
def setup(ml_raw):
    dom = prepare_domain(ml_raw.users, ml_raw.items, ml_raw.interactions, DomainConfig(name="movielens", source="ml-100k", positive_min=4))
    held = np.random.default_rng(0).random(dom.n_users) < 0.2
    fit = fit_domain(dom, ml_raw.items, held, BaselinesConfig(), seed=0, sasrec=False)
    return dom, held, fit, np.flatnonzero(held)[:60]


def test_catalogue_recommenders_show_fresh_unconsumed_items(setup):
    dom, held, fit, users = setup
    rng = np.random.default_rng(0)
    for model in ("random", "popularity", "item_knn"):
        rec = CatalogueRecommender(fit, model)
        st = UserState(int(users[0]), dom.items[dom.ptr[users[0]]:dom.ptr[users[0]] + 10].tolist(), [4.0] * 10, 10, shown={int(i) for i in range(5)})
        sl = rec.recommend(dom, [st, st], 5, rng)
        assert sl.shape == (2, 5) and all(len(set(r)) == 5 for r in sl.tolist())
        assert not set(sl.ravel()) & (set(st.items) | st.shown), model
    pop = CatalogueRecommender(fit, "popularity").recommend(dom, [UserState(0, [], [], 0)], 5, rng)[0]
    assert set(pop) == set(np.argsort(-fit.counts)[:5])          # popularity = the most-chosen training items


def test_replay_metrics_separate_popularity_from_random(setup):
    dom, held, fit, users = setup
    pop = offline_metrics(CatalogueRecommender(fit, "popularity"), dom, users, k=10)
    rnd = offline_metrics(CatalogueRecommender(fit, "random"), dom, users, k=10)
    a, b = pop["recall"][np.isfinite(pop["recall"])], rnd["recall"][np.isfinite(rnd["recall"])]
    assert len(a) >= 50 and a.mean() > b.mean() + 0.05, (a.mean(), b.mean())
    assert np.nanmax(pop["ndcg"] - pop["recall"]) <= 1e-12          # NDCG@k <= Recall@k per user


def test_episodes_are_seeded_and_summarised(setup):
    dom, held, fit, users = setup
    env = RecSimEnv(dom, ClassicChoice(fit, "item_knn", beta=3.0), users=users, k=5, budget=6)
    rec = CatalogueRecommender(fit, "item_knn")
    a, b = run_episodes(env, rec, users[:20], seed=3), run_episodes(env, rec, users[:20], seed=3)
    assert a == b and [r["user"] for r in a] == users[:20].tolist()
    s = summarise(a, 200)
    assert s["n"] == 20 and s["reward_lo"] <= s["reward"] <= s["reward_hi"] and 1 <= s["steps"] <= 6


def test_ppo_trains_against_the_simulator_and_acts_as_a_recommender(setup):
    dom, held, fit, users = setup
    recs = [CatalogueRecommender(fit, m) for m in ("popularity", "item_knn")]
    fac = item_factors(fit, 8)
    env = BlendEnv(RecSimEnv(dom, ClassicChoice(fit, "item_knn", beta=3.0), users=np.flatnonzero(~held)[:200], k=5, budget=5), recs, fac)
    check_env(env)
    model = train_ppo(env, timesteps=256, n_steps=128, batch_size=64, n_epochs=2)
    assert model.num_timesteps >= 256
    pr = PolicyRecommender(model, recs, fac, budget=5)
    rows = run_episodes(RecSimEnv(dom, ClassicChoice(fit, "item_knn", beta=3.0), users=users, k=5, budget=5), pr, users[:10])
    assert len(rows) == 10 and all(r["steps"] >= 1 for r in rows)
    assert np.isfinite(offline_metrics(pr, dom, users[:10], k=10)["recall"]).any()


def test_rank_agreement_reads_order_not_scale():
    u = np.arange(30.0)
    sim = {"a": u * 0 + 1, "b": u * 0 + 5, "c": u * 0 + 9}
    assert rank_agreement(sim, {"a": u * 0 + .01, "b": u * 0 + .02, "c": u * 0 + .5}, 100)["tau"] == 1.0
    r = rank_agreement(sim, {"a": u * 0 + .5, "b": u * 0 + .02, "c": u * 0 + .01}, 100)
    assert r["tau"] == -1.0 and r["users"] == 30


def test_batched_episodes_make_one_simulator_call_per_step_and_the_same_episodes(setup):
    "#12: an LLM simulator scores every user's slate of a step in one call; the episodes do not depend on the batch size."
    from usermirror_nb.env import ChoiceModel
    dom, held, fit, users = setup
    class Counting(ChoiceModel):
        def __init__(self, inner): self.inner, self.name, self.calls, self.sizes = inner, inner.name, 0, []
        def slate_probs(self, dom, states, slates): self.calls += 1; self.sizes.append(len(states)); return self.inner.slate_probs(dom, states, slates)
        def appeal(self, dom, states, slates): return self.inner.appeal(dom, states, slates)
    for model in ("random", "item_knn"):                          # the random recommender draws from its per-user rng
        seq, bat = Counting(ClassicChoice(fit, "item_knn", beta=3.0, outside=0.9)), Counting(ClassicChoice(fit, "item_knn", beta=3.0, outside=0.9))
        rec = CatalogueRecommender(fit, model)
        a = run_episodes(RecSimEnv(dom, seq, users=users, k=5, budget=6), rec, users[:12], seed=5)
        b = run_episodes(RecSimEnv(dom, bat, users=users, k=5, budget=6), rec, users[:12], seed=5, batch=12)
        assert a == b, model
        steps = [r["steps"] for r in a]
        assert seq.calls == sum(steps) and set(seq.sizes) == {1}
        assert bat.calls == max(steps) and bat.sizes[0] == 12 and sorted(bat.sizes, reverse=True) == bat.sizes   # users leave, the batch shrinks
