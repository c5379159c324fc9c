"""Scene building on real MovieLens-100K (and a tiny no-time domain): sampler properties, uniform gt_pos,
disjoint users, determinism, leak-free statistics, k bounds, storage."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare

from usermirror_nb.config import ConfigError, DomainConfig, ScenesConfig, config_from_dict
from usermirror_nb.scenes import (assemble_scenes, build_scenes, compute_stats, item_embeddings, letters, load_scenes,
                                  precompute, prepare_domain, save_scenes)

ML = DomainConfig(name="movielens", source="ml-100k", positive_min=4)
MIX = {"random": 1.0, "popularity": 1.0, "collaborative": 1.0, "content": 1.0}


@pytest.fixture(scope="module")
def ml(ml_raw):
    return prepare_domain(ml_raw.users, ml_raw.items, ml_raw.interactions, ML, has_time=True)


@pytest.fixture(scope="module")
def ml_emb(ml):
    return item_embeddings(ml.item_text, "minilm-l6")


@pytest.fixture(scope="module")
def big(ml, ml_emb):
    "6,000 scenes with every sampler mixed in."
    sc = ScenesConfig(train_scenes=5000, eval_scenes=1000, scenes_per_user=40, samplers=MIX, style="evidence")
    plan, stats = precompute(ml, sc, seed=0)
    return sc, plan, stats, assemble_scenes(ml, sc, plan, stats, 0, ml_emb), ml.user_ids


def test_real_counts(ml):
    assert (ml.n_users, ml.n_items, len(ml.items)) == (943, 1682, 100_000)


def test_exposure_properties(big, ml_raw):
    sc, plan, stats, df, _ = big
    assert (df.split == "train").sum() == 5000 and (df.split == "eval").sum() == 1000 and (df.split == "valid").sum() == 50
    seen = ml_raw.interactions.groupby("user_id")["item_id"].agg(set).to_dict()
    release = ml_raw.items.set_index("item_id")["release_time"].to_dict()
    for r in df.itertuples():
        ex = r.exposure_item_ids
        assert len(ex) == sc.k and len(set(ex)) == sc.k                     # no duplicates
        assert ex[r.gt_pos] == r.item_id and ex.count(r.item_id) == 1       # ground truth exactly once, at gt_pos
        negs = [x for j, x in enumerate(ex) if j != r.gt_pos]
        assert not set(negs) & seen[r.user_id]                              # never an item the user interacted with
        assert all(not (release[x] > r.timestamp) for x in negs)            # never released after the target time
        assert r.negative_samplers[r.gt_pos] == "ground_truth"
        assert sum(s == "ground_truth" for s in r.negative_samplers) == 1
    used = pd.Series([s for r in df.negative_samplers for s in r]).value_counts()
    for name in MIX: assert used.get(name, 0) > 500, f"sampler {name} barely used: {used.to_dict()}"


def test_gt_pos_uniform(big):
    df = big[3]
    counts = np.bincount(df["gt_pos"], minlength=5)
    assert len(df) >= 5000
    assert chisquare(counts).pvalue > 0.001, counts


def test_history_is_strictly_before_target(big, ml):
    "Same-second interactions are neither history nor eligibility (their order within the second is unknown)."
    sc, plan, stats, df, _ = big
    tied = 0
    for s in range(len(df)):
        u, p = plan.user[s], plan.pos[s]
        earlier = [q for q in range(ml.ptr[u], ml.ptr[u + 1]) if ml.time[q] < ml.time[p]]
        tied += any(ml.time[q] == ml.time[p] for q in range(ml.ptr[u], p))       # file order put a same-second item first
        assert len(earlier) >= sc.min_history, s
        if s % 7: continue
        assert df.history_item_ids[s] == [ml.item_ids[ml.items[q]] for q in earlier[-sc.history_len:]]   # last N, oldest first
        assert ml.item_ids[ml.items[p]] not in df.history_item_ids[s]
    assert tied > 500, tied        # ML-100K rates in bursts: the rule is exercised, not vacuous


def test_train_valid_eval_users_disjoint(big):
    df = big[3]
    tr, ev, va = (set(df[df.split == s].user_id) for s in ("train", "eval", "valid"))
    assert tr and ev and va and not tr & ev and not tr & va and not va & ev


def test_statistics_leak_free(big, ml_raw):
    "Evidence counts equal an independent count over training users' interactions strictly before the bucket start."
    sc, plan, stats, df, user_ids = big
    eval_ids = set(user_ids[plan.is_eval_user])               # every held-out user, with or without a scene
    assert set(df[df.split == "eval"].user_id) <= eval_ids
    x = ml_raw.interactions
    xt = x[~x.user_id.isin(eval_ids)]
    for s in range(0, len(df), 211):
        cutoff = plan.edges[plan.bucket[s]]
        assert cutoff <= df.timestamp[s]
        before = xt[xt.timestamp < cutoff]
        for item, ev in zip(df.exposure_item_ids[s], df.exposure_evidence[s]):
            n = before[before.item_id == item].user_id.nunique()
            assert ev.startswith(f"chosen by {n} earlier user"), (item, ev, n)


def test_eval_targets_never_in_statistics(ml):
    "Changing what eval users did changes no statistic."
    sc = ScenesConfig(train_scenes=200, eval_scenes=200)
    plan, stats = precompute(ml, sc, seed=3)
    train = ~plan.is_eval_user
    st = compute_stats(ml, train, float(plan.edges[-1]), svd_dim=8)
    shuffled = ml.items.copy()
    ev_pos = np.flatnonzero(plan.is_eval_user[ml.user_of])
    shuffled[ev_pos] = np.random.default_rng(0).permutation(shuffled[ev_pos])
    import dataclasses
    st2 = compute_stats(dataclasses.replace(ml, items=shuffled), train, float(plan.edges[-1]), svd_dim=8)
    assert np.array_equal(st.counts, st2.counts)
    assert (st.X != st2.X).nnz == 0


def test_deterministic(ml, ml_emb):
    sc = ScenesConfig(train_scenes=300, eval_scenes=100, samplers=MIX, style="evidence")
    a, b = build_scenes(ml, sc, 7, ml_emb), build_scenes(ml, sc, 7, ml_emb)
    pd.testing.assert_frame_equal(a, b)
    c = build_scenes(ml, sc, 8, ml_emb)
    assert not a.exposure_item_ids.equals(c.exposure_item_ids)


@pytest.mark.parametrize("k", [2, 26])
def test_k_range(ml, ml_emb, k):
    df = build_scenes(ml, ScenesConfig(k=k, train_scenes=50, eval_scenes=20), 0, ml_emb)
    assert df.exposure_item_ids.map(len).eq(k).all() and df.gt_pos.between(0, k - 1).all()
    assert set(df.gt_letter) <= set(letters(k))


def test_k_above_26_is_refused():
    with pytest.raises(ConfigError, match="2 to 26"):
        ScenesConfig(k=27)
    with pytest.raises(ValueError, match="2 to 26"):
        letters(27)


def test_plain_has_no_evidence(ml, ml_emb):
    df = build_scenes(ml, ScenesConfig(style="plain", train_scenes=30, eval_scenes=10), 0, ml_emb)
    assert all(e == "" for r in df.exposure_evidence for e in r)
    assert (df["style"] == "plain").all()


def test_no_timestamp_fallback():
    "Book-Crossing-like domain: history = the user's other rated items in file order, target removed."
    rng = np.random.default_rng(0)
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(40)], "location": "oslo, norway", "age": np.nan})
    items = pd.DataFrame({"item_id": [f"b{j}" for j in range(60)], "title": [f"Book {j}" for j in range(60)],
                          "release_time": np.nan, "author": "A. Writer", "year": "2001", "publisher": "P"})
    rows = [(f"u{u}", f"b{j}", float(rng.choice([0, 3, 9]))) for u in range(40) for j in rng.choice(60, 8, replace=False)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "feedback"])
    inter["timestamp"] = np.nan; inter["seq"] = np.arange(len(inter))
    dom = prepare_domain(users, items, inter, DomainConfig(name="books", source="book-crossing", positive_min=8), has_time=False)
    sc = ScenesConfig(train_scenes=40, eval_scenes=10, history_len=5, min_history=3, samplers={"random": 1, "popularity": 1, "collaborative": 1})
    plan, stats = precompute(dom, sc, 0)
    df = assemble_scenes(dom, sc, plan, stats, 0)
    assert len(stats) == 1 and np.isinf(plan.edges[0])
    for s, r in enumerate(df.itertuples()):
        u, p = plan.user[s], plan.pos[s]
        others = [dom.item_ids[dom.items[q]] for q in range(dom.ptr[u], dom.ptr[u + 1]) if q != p]
        assert r.history_item_ids == others[-5:]
        assert r.feedback >= 8 and r.item_id not in r.history_item_ids
    assert df.timestamp.isna().all()
    # statistics never count a scene target
    assert stats[0].X[plan.user, dom.items[plan.pos]].sum() == 0
    assert "read (no rating)" in " ".join(h for r in df.history for h in r) or (inter.feedback > 0).all()


def test_save_load_roundtrip(tmp_path, ml, ml_emb):
    df = build_scenes(ml, ScenesConfig(train_scenes=20, eval_scenes=10), 0, ml_emb)
    out = save_scenes(df, tmp_path / "scenes")
    tr, ev = load_scenes(out, "train"), load_scenes(out, "eval")
    assert (len(tr), len(ev)) == (20, 10)
    for col in ("scene_id", "domain", "user_id", "item_id", "timestamp", "profile", "history", "exposure_item_ids",
                "exposure_texts", "gt_pos", "choice_cnt", "negative_samplers", "style", "scene_text"):
        assert col in tr.column_names
    assert tr[0]["exposure_item_ids"][tr[0]["gt_pos"]] == tr[0]["item_id"]
    # a failing rewrite leaves the earlier scenes intact
    bad = df.drop(columns=["gt_pos"])
    with pytest.raises(Exception):
        save_scenes(bad, out)
    assert len(load_scenes(out, "train")) == 20
    with pytest.raises(FileNotFoundError, match="02_scenes"):
        load_scenes(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("over,why", [({"positive_min": 6}, "positive_min emptied it"),
                                      ({"min_history": 10_000}, "min_history emptied it")])
def test_no_eligible_targets_names_the_filter_and_writes_nothing(ml_raw, tmp_path, monkeypatch, over, why):
    "positive_min above every rating, or min_history above every user's length: a clear error with the counts, no scene files, no record."
    from pathlib import Path
    from usermirror_nb.assets import write_raw
    from usermirror_nb.scenes import run_scenes
    monkeypatch.setenv("USERMIRROR_ROOT", str(Path(__file__).resolve().parents[1]))
    hist = over.get("min_history", 3)
    cfg = config_from_dict({"profile": "t", "results_root": str(tmp_path), "assets": {"models": []},
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": over.get("positive_min", 4)}],
                            "scenes": {"train_scenes": 20, "eval_scenes": 10, "valid_scenes": 0, "samplers": {"random": 1.0},
                                       "history_len": max(hist, 5), "min_history": hist}})
    write_raw(ml_raw, cfg.results_dir / "assets" / "raw" / "movielens")
    with pytest.raises(ValueError, match=why) as e:
        run_scenes(cfg)
    assert "no train scenes" in str(e.value) and "of their" in str(e.value) and "nothing was written" in str(e.value)
    assert not (cfg.results_dir / "scenes").exists() and not (cfg.results_dir / "stages" / "scenes.json").exists()
