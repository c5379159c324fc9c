"""Scene-building speed on MovieLens-100K: the vectorised builder vs a straightforward per-row reference.

    .venv/bin/python benchmarks/scenes.py [--scenes 10000] [--reference 500]

Prints the one-off precomputation (raw load, domain arrays, MiniLM item embeddings, per-bucket statistics)
apart, then scenes/second for the vectorised `assemble_scenes` (plain and evidence styles) and for the
per-row reference below (same plan, same statistics, same embeddings), and their ratio — measured side by
side in one run. Targets (issue #2): >= 2,000 scenes/s and >= 20x on a 2-core machine.
"""
import argparse, sys, tempfile, time

import numpy as np
import pandas as pd

from usermirror_nb.assets import load_raw, run_assets
from usermirror_nb.config import DomainConfig, ScenesConfig, config_from_dict
from usermirror_nb.scenes import LETTERS, assemble_scenes, item_embeddings, precompute, prepare_domain

MIX = {"random": 1.0, "popularity": 1.0, "collaborative": 1.0, "content": 1.0}


def reference_scenes(dom, raw, plan, stats, emb, sc: ScenesConfig, rows, seed=0):
    """The straightforward implementation: one target row at a time with pandas filtering and python sets."""
    rng = np.random.default_rng(seed)
    inter, items = raw.interactions, raw.items.set_index("item_id")
    item_text = dict(zip(dom.item_ids, dom.item_text))
    idx = {iid: j for j, iid in enumerate(dom.item_ids)}
    names, w = list(sc.samplers), np.array(list(sc.samplers.values()), float)
    w /= w.sum()
    targets = pd.DataFrame({"user_id": dom.user_ids[plan.user[rows]], "item_id": dom.item_ids[dom.items[plan.pos[rows]]],
                            "timestamp": dom.time[plan.pos[rows]], "bucket": plan.bucket[rows]})

    def one(t):
        mine = inter[inter.user_id == t.user_id].sort_values(["timestamp", "seq"]).reset_index(drop=True)
        at = int(np.flatnonzero(mine.item_id.to_numpy() == t.item_id)[0])
        hist = mine.iloc[max(0, at - sc.history_len):at]
        seen = set(mine.item_id)
        allowed = [i for i in items.index if i not in seen and not items.at[i, "release_time"] > t.timestamp]
        st = stats[t.bucket]
        chosen, used = [], []
        for _ in range(sc.k - 1):
            s = rng.choice(names, p=w)
            pool = [a for a in allowed if a not in chosen]
            if s == "popularity" and st.counts.sum() > 0:
                p = np.array([st.counts[idx[a]] for a in pool], float)
                c = pool[rng.choice(len(pool), p=p / p.sum())] if p.sum() > 0 else pool[rng.integers(len(pool))]
            elif s in ("collaborative", "content") and (st.factors is not None or s == "content"):
                table = st.factors if s == "collaborative" else emb
                hv = np.mean([table[idx[h]] for h in hist.item_id], axis=0)
                scores = np.array([table[idx[a]] @ hv for a in pool])
                top = [pool[j] for j in np.argsort(-scores)[:sc.candidate_pool]]
                c = top[rng.integers(len(top))]
            else:
                s, c = "random", pool[rng.integers(len(pool))]
            chosen.append(c); used.append(s)
        g = int(rng.integers(sc.k))
        expo = chosen[:g] + [t.item_id] + chosen[g:]
        return pd.Series({"history": [f"{item_text[h]} — rated {f:g}/5" for h, f in zip(hist.item_id, hist.feedback)],
                          "exposure_item_ids": expo, "exposure_texts": [item_text[e] for e in expo],
                          "negative_samplers": used[:g] + ["ground_truth"] + used[g:], "gt_pos": g, "gt_letter": LETTERS[g]})

    return targets.apply(one, axis=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", type=int, default=10_000)
    ap.add_argument("--reference", type=int, default=500, help="scenes built by the per-row reference")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cfg = config_from_dict({"profile": "bench", "results_root": d, "assets": {"models": []},
                                "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4}]})
        run_assets(cfg)
        raw = load_raw(cfg.results_dir / "assets" / "raw" / "movielens")
    t_raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    dom = prepare_domain(raw.users, raw.items, raw.interactions, DomainConfig(name="movielens", source="ml-100k", positive_min=4), True)
    t_dom = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = item_embeddings(dom.item_text, "minilm-l6")
    t_emb = time.perf_counter() - t0
    n_eval = a.scenes // 5
    print(f"MovieLens-100K: {dom.n_users} users, {dom.n_items} items, {len(dom.items)} interactions")
    print(f"one-off: raw tables {t_raw:.2f}s, domain arrays {t_dom:.2f}s, item embeddings {t_emb:.2f}s (cached after the first run)")
    res = {}
    for style in ("plain", "evidence"):
        sc = ScenesConfig(style=style, train_scenes=a.scenes - n_eval, eval_scenes=n_eval, scenes_per_user=60, samplers=MIX)
        t0 = time.perf_counter(); plan, stats = precompute(dom, sc, 0); t_pre = time.perf_counter() - t0
        t0 = time.perf_counter(); df = assemble_scenes(dom, sc, plan, stats, 0, emb); t_asm = time.perf_counter() - t0
        res[style] = (sc, plan, stats, len(df) / t_asm)
        print(f"[{style}] precompute (plan + {len(stats)} time-bucket statistics, SVD-{sc.svd_dim}): {t_pre:.2f}s; "
              f"assemble {len(df)} scenes: {t_asm:.2f}s -> {len(df) / t_asm:,.0f} scenes/s")
    sc, plan, stats, fast = res["plain"]
    rows = np.random.default_rng(0).choice(len(plan.pos), size=min(a.reference, len(plan.pos)), replace=False)
    t0 = time.perf_counter(); ref = reference_scenes(dom, raw, plan, stats, emb, sc, rows); t_ref = time.perf_counter() - t0
    slow = len(ref) / t_ref
    print(f"[reference, per-row] {len(ref)} scenes: {t_ref:.2f}s -> {slow:,.1f} scenes/s")
    print(f"ratio vectorised/reference (plain): {fast / slow:.1f}x; evidence style: {res['evidence'][3] / slow:.1f}x "
          f"(targets: >= 20x and >= 2,000 scenes/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
