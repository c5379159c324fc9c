"""Environment steps per second (11_env) per simulator kind, batch 1 against batched, side by side in one run.

    .venv/bin/python benchmarks/env.py [--users 16] [--steps 6] [--http-users 4] [--http-steps 3]

Simulators: item-kNN (classic), the hybrid (item-kNN x SmolLM2 history_sum), SmolLM2-135M read locally with the
`history_sum` readout (LLM direct), and the same model behind `serve()` on loopback HTTP read through `OpenAILLM`
with the letter readout (the only one a server gives). "batch 1" steps `--users` RecSimEnv one after the other
(one simulator call per user per step); "batched" steps one RecSimVectorEnv of `--users` users (one call per step).
The HTTP row uses fewer users and steps (`--http-users`, `--http-steps`): a served letter readout scores the whole
~700-token scene prompt per request (about 2-3 s on 2 cores), and the default sizes took over 15 minutes there.
Real ML-100K users (the offline wheel). Timings are wall-clock on whatever else the machine is doing: read the
ratios, measured here in the same run.
"""
import argparse, time

import numpy as np

from usermirror_nb.assets import load_domain
from usermirror_nb.baselines import fit_domain
from usermirror_nb.config import BaselinesConfig, DomainConfig, LLMConfig
from usermirror_nb.env import ClassicChoice, HybridChoice, LLMChoice, RatingModel, RecSimEnv, RecSimVectorEnv
from usermirror_nb.scenes import prepare_domain


def steps_per_second(make_seq, make_vec, users: int, steps: int, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    actions = [np.stack([rng.choice(1682, 5, replace=False) for _ in range(users)]) for _ in range(steps)]
    envs = make_seq()
    for i, e in enumerate(envs): e.reset(seed=seed + i)
    t = time.perf_counter()
    for a in actions:
        for i, e in enumerate(envs):
            if e.step(a[i])[2:4] != (False, False): e.reset()
    seq = users * steps / (time.perf_counter() - t)
    vec = make_vec(); vec.reset(seed=seed)
    t = time.perf_counter()
    for a in actions: vec.step(a)
    return seq, users * steps / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=16); ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--http-users", type=int, default=4); ap.add_argument("--http-steps", type=int, default=3)
    a = ap.parse_args(argv)
    dcfg = DomainConfig(name="movielens", source="ml-100k", positive_min=4)
    raw = load_domain(dcfg)
    dom = prepare_domain(raw.users, raw.items, raw.interactions, dcfg)
    held = np.random.default_rng(0).random(dom.n_users) < 0.2
    fit = fit_domain(dom, raw.items, held, BaselinesConfig(), seed=0, sasrec=False)
    rating = RatingModel.fit(dom, ~held)
    users = np.flatnonzero(held)
    from usermirror_nb.evaluate import Simulator
    from usermirror_nb.llm import OpenAILLM
    from usermirror_nb.server import serve
    sim = Simulator.load("smollm2-135m-instruct", llm_cfg=LLMConfig(model="smollm2-135m-instruct", batch_size=16, readout="history_sum"))
    srv, url = serve(sim.llm, model_name="smollm2")
    http = type("Served", (), {"llm": OpenAILLM(LLMConfig(backend="openai", model="smollm2", base_url=url, max_concurrency=4)),
                               "readout": "letter", "name": "smollm2@http"})()
    knn = ClassicChoice(fit, "item_knn", beta=3.0)
    kinds = {"classic (item_knn)": knn, "hybrid (item_knn x SmolLM2)": HybridChoice(LLMChoice(sim), knn, 0.1),
             "LLM direct (SmolLM2, history_sum)": LLMChoice(sim), "LLM over loopback HTTP (letter)": LLMChoice(http)}
    print(f"{a.users} users x {a.steps} steps ({a.http_users} x {a.http_steps} over HTTP), k = 5, real ML-100K users\n")
    print(f"| simulator | users x steps | batch 1 steps/s | batched steps/s | batched / batch 1 |\n|---|---|---|---|---|")
    try:
        for name, choice in kinds.items():
            kw = dict(dom=dom, choice=choice, users=users, rating=rating, budget=1000)
            n, st = (a.http_users, a.http_steps) if getattr(choice, "sim", None) is http else (a.users, a.steps)
            seq, vec = steps_per_second(lambda: [RecSimEnv(**kw) for _ in range(n)], lambda: RecSimVectorEnv(n, **kw), n, st)
            print(f"| {name} | {n} x {st} | {seq:.1f} | {vec:.1f} | {vec / seq:.2f}x |", flush=True)
    finally:
        http.llm.close(); srv.shutdown(); srv.server_close(); sim.close()


if __name__ == "__main__":
    main()
