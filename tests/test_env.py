"Stage 11 (env): the gymnasium environment on real ML-100K users with 09's models and the real SmolLM2."
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from usermirror_nb.baselines import fit_domain
from usermirror_nb.config import BaselinesConfig, DomainConfig, LLMConfig
from usermirror_nb.env import (ENV_ID, Behaviour, ChoiceModel, ClassicChoice, HybridChoice, LLMChoice, RatingModel, RecSimEnv,
                               RecSimVectorEnv)
from usermirror_nb.scenes import prepare_domain


@pytest.fixture(scope="module")
def dom(ml_raw):
    return prepare_domain(ml_raw.users, ml_raw.items, ml_raw.interactions, DomainConfig(name="movielens", source="ml-100k", positive_min=4))


@pytest.fixture(scope="module")
def held(dom):
    "A seeded fifth of the users: the simulated ones; the models and the rating model are fitted on the rest."
    return np.random.default_rng(0).random(dom.n_users) < 0.2


@pytest.fixture(scope="module")
def fit(dom, ml_raw, held):
    return fit_domain(dom, ml_raw.items, held, BaselinesConfig(), seed=0, sasrec=True, sasrec_max_steps=30)


@pytest.fixture(scope="module")
def rating(dom, held):
    return RatingModel.fit(dom, ~held)


def kw(dom, fit, held, rating, model="item_knn", **extra):
    return dict(dom=dom, choice=ClassicChoice(fit, model, beta=3.0), users=np.flatnonzero(held)[:50], rating=rating, **extra)


def rollout(env, seed, steps=12, action_seed=0):
    rng = np.random.default_rng(action_seed)
    obs, info = env.reset(seed=seed)
    out = [("reset", obs.tolist(), info["user_id"], info["start"])]
    for _ in range(steps):
        o, r, te, tr, i = env.step(rng.choice(env.unwrapped.dom.n_items, env.unwrapped.k, replace=False))
        out.append((o.tolist(), r, te, tr, i["item"], round(i["p_exit"], 12)))
        if te or tr: o, info = env.reset(); out.append(("reset", o.tolist(), info["user_id"], info["start"]))
    return out


def test_passes_gymnasium_checks_and_is_registered(dom, fit, held, rating):
    env = gym.make(ENV_ID, **kw(dom, fit, held, rating))
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and info["user"] in set(np.flatnonzero(held)[:50])
    assert env.unwrapped.state.items == dom.items[dom.ptr[info["user"]]:dom.ptr[info["user"]] + info["start"]].tolist()   # the real history


def test_same_seed_same_episode_other_seed_other_episode(dom, fit, held, rating):
    for model in ("popularity", "item_knn", "sasrec"):
        a = rollout(RecSimEnv(**kw(dom, fit, held, rating, model)), seed=3)
        b = rollout(RecSimEnv(**kw(dom, fit, held, rating, model)), seed=3)
        c = rollout(RecSimEnv(**kw(dom, fit, held, rating, model)), seed=4)
        assert a == b and a != c, model


@pytest.mark.parametrize("action, says", [
    (np.array([1, 2, 3, 4]), "a slate is 5 item indices, got shape (4,)"),
    (np.array([1, 2, 3, 4, 2]), "item index 2 appears twice (positions 1 and 4)"),
    (np.array([1, 2, 3, 4, 1682]), "position 4: item index 1682 is not in the catalogue (0..1681)"),
    (np.array([-1, 2, 3, 4, 5]), "position 0: item index -1 is not in the catalogue"),
    (np.array([1.0, 2, 3, 4, 5]), "item indices must be integers"),
])
def test_bad_slates_are_refused_with_what_is_wrong(dom, fit, held, rating, action, says):
    env = RecSimEnv(**kw(dom, fit, held, rating))
    with pytest.raises(RuntimeError, match="reset"): env.step(np.arange(5))
    env.reset(seed=0)
    before = (list(env.state.items), env.state.steps)
    with pytest.raises(ValueError, match=f"{ENV_ID}: bad slate .*{says.replace('(', '.').replace(')', '.')}"):
        env.step(action)
    assert (env.state.items, env.state.steps) == before          # a refused slate changes nothing


def test_bad_settings_are_refused(dom, fit, held, rating):
    k = kw(dom, fit, held, None)
    with pytest.raises(ValueError, match="reward='rating' needs a RatingModel"): RecSimEnv(**k, reward="rating")
    with pytest.raises(ValueError, match="reward must be one of"): RecSimEnv(**k, reward="likes")
    with pytest.raises(ValueError, match="not a user of movielens"): RecSimEnv(**{**k, "users": [dom.n_users]})
    with pytest.raises(ValueError, match=r"Behaviour.exit_base must be in \[0, 1\]"): Behaviour(exit_base=1.5)
    with pytest.raises(ValueError, match="k must be in 2..26"): RecSimEnv(**k, k=1)
    with pytest.raises(ValueError, match="start must be in"): RecSimEnv(**k).reset(seed=0, options={"user": int(k["users"][0]), "start": 0})

    class Broken(ChoiceModel):
        name = "broken"
        def slate_probs(self, dom, states, slates): return np.ones((len(states), 3))
    env = RecSimEnv(**{**k, "choice": Broken()}); env.reset(seed=0)
    with pytest.raises(ValueError, match=r"broken: slate_probs returned shape \(1, 3\)"): env.step(np.arange(5))


def test_exit_terminates_and_the_budget_truncates(dom, fit, held, rating):
    leave = RecSimEnv(**kw(dom, fit, held, rating, behaviour=Behaviour(exit_base=1.0)))
    leave.reset(seed=0)
    _, _, te, tr, info = leave.step(np.arange(5))
    assert te and not tr and info["exited"] and info["p_exit"] == 1.0
    stay = RecSimEnv(**kw(dom, fit, held, rating, budget=7, behaviour=Behaviour(exit_base=0.0, exit_dissatisfied=0.0, exit_repeat=0.0)))
    stay.reset(seed=0)
    ends = [stay.step(stay.action_space.sample())[2:4] for _ in range(7)]
    assert ends[:-1] == [(False, False)] * 6 and ends[-1] == (False, True)
    # showing the same slate again raises the exit probability (boredom), all else equal
    env = RecSimEnv(**kw(dom, fit, held, rating, behaviour=Behaviour(exit_base=0.0, exit_dissatisfied=0.0, exit_repeat=0.5)))
    env.reset(seed=0)
    assert env.step(np.arange(10, 15))[4]["p_exit"] == 0.0 and env.step(np.arange(10, 15))[4]["p_exit"] == 0.5


def test_clicks_grow_the_history_with_the_rating_models_rating(dom, fit, held, rating):
    env = RecSimEnv(**kw(dom, fit, held, rating, reward="rating", behaviour=Behaviour(none_prob=0.0, exit_base=0.0, exit_dissatisfied=0.0, exit_repeat=0.0)))
    obs, info = env.reset(seed=5)
    n0 = len(env.state.items)
    slate = np.setdiff1d(np.argsort(-fit.counts)[:40], env.state.items)[:5]     # popular items the user has not seen
    o, r, te, tr, i = env.step(slate)
    assert i["item"] in slate and len(env.state.items) == n0 + 1 and env.state.items[-1] == i["item"]
    assert r == i["rating"] == env.state.feedback[-1] and 1.0 <= r <= 5.0 and o[-1] == i["item"]


def test_an_outside_option_makes_good_slates_earn_more_clicks(dom, fit, held, rating):
    "Without appeal every slate is taken with 1 - none_prob; with an outside option the model's top items beat random ones."
    users = np.flatnonzero(held)[:40]
    def clicks(choice, pick_top, seed=0):
        env, rng, total = RecSimEnv(dom, choice, users=users, k=5, budget=5, rating=rating), np.random.default_rng(seed), 0
        for i, u in enumerate(users):
            env.reset(seed=i, options={"user": int(u)}); done = False
            while not done:
                s = ClassicChoice(fit, "item_knn").scores(dom, [env.state], np.arange(dom.n_items)[None, :])[0]
                s[env.state.items] = -np.inf; s[list(env.state.shown)] = -np.inf
                slate = np.argsort(-s)[:5] if pick_top else rng.choice(np.flatnonzero(np.isfinite(s)), 5, replace=False)
                _, r, te, tr, _ = env.step(slate); total += r; done = te or tr
        return total / len(users)
    plain = ClassicChoice(fit, "item_knn", beta=3.0)
    outside = ClassicChoice(fit, "item_knn", beta=3.0, outside=0.9)
    top, rnd = clicks(outside, True), clicks(outside, False)
    assert top > rnd + 0.5, (top, rnd)
    assert abs(clicks(plain, True) - clicks(plain, False)) < 0.6     # the old behaviour: the slate barely matters


def test_vectorised_equals_sequential(dom, fit, held, rating):
    for model in ("item_knn", "sasrec"):
        k = kw(dom, fit, held, rating, model, budget=4)
        vec = gym.make_vec(ENV_ID, num_envs=4, vectorization_mode="vector_entry_point", **k)
        assert isinstance(vec.unwrapped, RecSimVectorEnv) if hasattr(vec, "unwrapped") else isinstance(vec, RecSimVectorEnv)
        seq = [RecSimEnv(**k) for _ in range(4)]
        ov, _ = vec.reset(seed=11)
        assert np.array_equal(ov, np.stack([e.reset(seed=11 + i)[0] for i, e in enumerate(seq)]))
        rng, done, ended = np.random.default_rng(1), np.zeros(4, bool), 0
        for _ in range(10):
            a = np.stack([rng.choice(dom.n_items, 5, replace=False) for _ in range(4)])
            ov, rv, tv, uv, iv = vec.step(a)
            for i, e in enumerate(seq):
                if done[i]: assert np.array_equal(ov[i], e.reset()[0]); continue
                o, r, t, u, info = e.step(a[i])
                assert (o.tolist(), r, t, u, info["item"]) == (ov[i].tolist(), rv[i], tv[i], uv[i], iv["item"][i]), (model, i)
                np.testing.assert_allclose(info["p_choice"], iv["p_choice"][i], atol=1e-6)
            done = tv | uv; ended += int(done.sum())
        assert ended > 0, model                               # the comparison covered episode ends and autoresets


def test_language_model_simulator_in_the_loop(dom, fit, held, rating):
    from usermirror_nb.evaluate import Simulator
    sim = Simulator.load("smollm2-135m-instruct", llm_cfg=LLMConfig(model="smollm2-135m-instruct", batch_size=8, readout="history_sum"))
    try:
        llm = LLMChoice(sim)
        k = dict(dom=dom, choice=llm, users=np.flatnonzero(held)[:20], rating=rating, budget=3)
        vec = RecSimVectorEnv(3, **k)
        seq = [RecSimEnv(**k) for _ in range(3)]
        vec.reset(seed=0); [e.reset(seed=i) for i, e in enumerate(seq)]
        calls = []
        orig = llm.slate_probs
        llm.slate_probs = lambda d, s, sl: calls.append(len(s)) or orig(d, s, sl)
        a = np.stack([np.arange(5) + 7 * i for i in range(3)])
        _, rv, _, _, iv = vec.step(a)
        assert calls == [3]                                   # one language-model call for the three users
        for i, e in enumerate(seq):
            info = e.step(a[i])[4]
            np.testing.assert_allclose(info["p_choice"], iv["p_choice"][i], atol=2e-3)   # batched vs alone: padding numerics only
        # the hybrid with w = 1 is the language model, with w = 0 the classic model
        st, sl = [vec.envs[0].state], a[:1]
        cl = ClassicChoice(fit, "item_knn", 3.0)
        np.testing.assert_allclose(HybridChoice(llm, cl, 1.0).slate_probs(dom, st, sl), orig(dom, st, sl), atol=1e-6)
        np.testing.assert_allclose(HybridChoice(llm, cl, 0.0).slate_probs(dom, st, sl), cl.slate_probs(dom, st, sl), atol=1e-6)
    finally:
        sim.close()
