"Augmentation (13_augment) on real ML-100K users: labels only at allowed slots of training users, seeded, changing SASRec's windows, end to end."
import dataclasses
import json

import numpy as np
import pytest

from usermirror_nb.augment import (METRICS, augment_domain, augmented_windows, cut_states, label_choices, label_plan,
                                   run_augment_study)
from usermirror_nb.baselines import fit_domain, sasrec_windows
from usermirror_nb.config import BaselinesConfig, DomainConfig
from usermirror_nb.env import ClassicChoice
from usermirror_nb.scenes import prepare_domain

@pytest.fixture(scope="module")
def setup(ml_raw):
    dom = prepare_domain(ml_raw.users, ml_raw.items, ml_raw.interactions, DomainConfig(name="movielens", source="ml-100k", positive_min=4))
    held = np.random.default_rng(0).random(dom.n_users) < 0.2
    fit = fit_domain(dom, ml_raw.items, held, BaselinesConfig(), seed=0, sasrec=False)
    train = np.flatnonzero(~held & (np.diff(dom.ptr) >= 3))[:120]
    return dom, held, fit, train, ml_raw


def _labels(dom, fit, train, seed=0):
    plan = label_plan(dom, fit, train, cuts_per_user=3, k=5, seed=seed)
    return plan, label_choices(dom, ClassicChoice(fit, "item_knn", beta=3.0), plan, seed=seed)


def test_labels_are_allowed_slate_items_inserted_at_the_cut(setup):
    dom, held, fit, train, _ = setup
    plan, chosen = _labels(dom, fit, train)
    assert len(plan) == 3 * len(train) and not held[plan.user].any()
    n = np.diff(dom.ptr)
    assert ((plan.cut >= 3) & (plan.cut <= n[plan.user])).all()
    for u, t, sl, c in zip(plan.user, plan.cut, plan.slate, chosen):
        past = dom.items[dom.ptr[u]:dom.ptr[u] + t]
        assert len(set(sl.tolist())) == 5 and not np.isin(sl, past).any()       # the slate never shows an item consumed before the cut
        assert c == -1 or (c in sl and c not in past)
    assert 0.6 < (chosen >= 0).mean() < 0.95                                     # 1 - none_prob = 0.8 of the slates are taken
    aug = augment_domain(dom, plan, chosen)
    for u in np.unique(plan.user)[:40]:
        rows = np.flatnonzero((plan.user == u) & (chosen >= 0))
        real = dom.items[dom.ptr[u]:dom.ptr[u + 1]].tolist()
        for r in sorted(rows, key=lambda r: -plan.cut[r]): real.insert(int(plan.cut[r]), int(chosen[r]))   # rebuilt by hand, last cut first
        assert aug.items[aug.ptr[u]:aug.ptr[u + 1]].tolist() == real
    for u in np.flatnonzero(held)[:40]:                                          # held-out users exactly as they were
        assert aug.items[aug.ptr[u]:aug.ptr[u + 1]].tolist() == dom.items[dom.ptr[u]:dom.ptr[u + 1]].tolist()


def test_no_leak_from_the_future_or_from_held_out_users(setup):
    dom, held, fit, train, raw = setup
    plan, chosen = _labels(dom, fit, train)
    # (1) a label depends on the prefix before its cut only: rewrite every labelled user's items after their last cut
    items = dom.items.copy()
    rng = np.random.default_rng(5)
    for u in np.unique(plan.user):
        a, b = dom.ptr[u], dom.ptr[u + 1]
        last = int(plan.cut[plan.user == u].max())
        items[a + last:b] = rng.integers(0, dom.n_items, b - a - last)
    fut = dataclasses.replace(dom, items=items)
    p2, c2 = _labels(fut, fit, train)
    assert (p2.slate == plan.slate).all() and (c2 == chosen).all()
    assert [s.items for s in cut_states(fut, p2)] == [s.items for s in cut_states(dom, plan)]
    # (2) held-out users' data never reaches labelling or training: scramble them, refit 09's models, same windows
    items = dom.items.copy()
    m = held[dom.user_of]
    items[m] = rng.integers(0, dom.n_items, int(m.sum()))
    scr = dataclasses.replace(dom, items=items)
    fit2 = fit_domain(scr, raw.items, held, BaselinesConfig(), seed=0, sasrec=False)
    p3, c3 = _labels(scr, fit2, train)
    assert (p3.slate == plan.slate).all() and (c3 == chosen).all()
    w1, u1 = augmented_windows(dom, fit.fit_users, plan, chosen, 20)
    w3, u3 = augmented_windows(scr, fit2.fit_users, p3, c3, 20)
    assert (w1 == w3).all() and not held[u1].any()
    with pytest.raises(ValueError, match="held out"): label_plan(dom, fit, np.flatnonzero(held)[:2])


def test_same_seed_same_augmented_data_and_classic_labels_change_the_windows(setup):
    dom, held, fit, train, _ = setup
    plan, chosen = _labels(dom, fit, train, seed=3)
    plan2, chosen2 = _labels(dom, fit, train, seed=3)
    assert (plan.slate == plan2.slate).all() and (plan.cut == plan2.cut).all() and (chosen == chosen2).all()
    w, wu = augmented_windows(dom, fit.fit_users, plan, chosen, 20)
    w0, wu0 = sasrec_windows(dom, fit.fit_users, 20)
    assert (augmented_windows(dom, fit.fit_users, plan, np.full(len(plan), -1), 20)[0] == w0).all()   # no label: 09's windows
    labelled = np.isin(wu, plan.user[chosen >= 0])
    assert len(w) >= len(w0) and labelled.any()
    assert (w[~labelled] == w0[~np.isin(wu0, plan.user[chosen >= 0])]).all()                       # unlabelled users' windows as in 09
    w_lab, w0_lab = w[labelled], w0[np.isin(wu0, plan.user[chosen >= 0])]
    assert len(w_lab) != len(w0_lab) or (w_lab != w0_lab).any(axis=1).all()                         # every labelled user's windows changed
    other = _labels(dom, fit, train, seed=4)[1]
    assert (other != chosen).any()                                                                   # another seed, other labels


def test_study_runs_end_to_end_on_a_slice(setup, tmp_path):
    from usermirror_nb.assets import write_raw
    from usermirror_nb.config import config_from_dict
    dom, held, fit, train, raw = setup
    cfg = config_from_dict({"profile": "t", "results_root": str(tmp_path), "assets": {"models": []},
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}],
                            "baselines": {"sasrec_dim": 16, "sasrec_heads": 1, "sasrec_layers": 1, "sasrec_max_len": 20}})
    write_raw(raw, cfg.results_dir / "assets" / "raw" / "movielens")
    s = run_augment_study(cfg, simulators=("item_knn", "random"), users=30, label_users=60, cuts_per_user=2, sasrec_steps=4,
                          sasrec_seeds=2, out_dir=tmp_path / "augment_study", n_boot=50, progress=False)
    assert s["held_out_rule"].startswith("02's plan") and s["training_users"] + s["held_out_users"] == dom.n_users
    names = [r["condition"] for r in s["conditions"]]
    assert names == ["none", "item_knn", "random", "none (seeds + 2)"]
    by = {r["condition"]: r for r in s["conditions"]}
    assert by["item_knn"]["sasrec_seeds"] == [0, 1] and by["none (seeds + 2)"]["sasrec_seeds"] == [2, 3]   # same seeds in every condition
    assert by["none"]["labels"] == 0 and by["item_knn"]["labels"] == s["labellers"]["item_knn"]["labels"] > 60
    assert by["item_knn"]["windows"] >= by["none"]["windows"] and s["users_with_targets"] >= 25
    for r in s["conditions"]:
        for m in METRICS:
            x = r["metrics"][m]
            assert 0 <= x["lo"] <= x["mean"] <= x["hi"] <= 1 and x["n"] == s["users_with_targets"]
    assert all(by["none"]["vs_none"][m]["mean"] == 0 for m in METRICS)
    assert json.loads((tmp_path / "augment_study" / "summary.json").read_text())["verdict"] == s["verdict"]
    rep = (tmp_path / "augment_study" / "REPORT.md").read_text()
    assert s["verdict"] in rep and f"| item_knn | {by['item_knn']['labels']} | {by['item_knn']['windows']} |" in rep
