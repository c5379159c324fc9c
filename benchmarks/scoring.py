"""Letter scoring and generation speed of the local transformers backend (SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/scoring.py [--quick] [--scenes 3] [--rationales 10] [--batch-size 16]

1. Choice probabilities for `--rationales` rationales per scene on ~800-token scene prompts (an ML-100K scene from
   results/quick/scenes/train.parquet when present, else a synthetic one, plus the EKB instructions): rationales
   scored per second with shared-prefix reuse (`choice_probs`) and with naive full passes (`choice_probs_full`,
   same batch size), their ratio, and the largest difference between the two (must be < 1e-4); once for EKB-length
   rationales (~120 tokens) and once for short ones (~45 tokens). Target (issue #3): >= 5x on a 2-core CPU.
2. Generation tokens/second (sampling, 64 new tokens, one scene prompt, n = batch sequences) at batch 1, 8, 16, 32.

Timings are wall-clock on whatever else the machine is doing; run it twice if in doubt.
"""
import argparse, os, sys, time
from pathlib import Path

import numpy as np

from usermirror_nb.config import LLMConfig, project_root
from usermirror_nb.llm import BEHAVIOR_CONTEXT, Sampling, TransformersLLM

SYSTEM = (
    "You simulate a real user of a recommender system. You see the user's profile, the items they interacted with "
    "before (oldest first, with their feedback) and an exposure list of items shown to them now, each with a letter. "
    "Explain how this user arrives at a choice, following the Engel-Kollat-Blackwell consumer decision model:\n"
    "Stimulus: what prompts the user to look for something now (1-3 stimulus factors: internal states such as boredom, "
    "curiosity or a mood; external cues such as the time, an occasion, a friend's advice).\n"
    "Knowledge: what the user knows or notices about the candidates (2-4 knowledge factors: quality, novelty, personal "
    "relevance to their history, social proof, past experience with similar items, genre, era).\n"
    "Evaluation: how the user weighs them (one style: logical, intuitive, impulsive or habitual), in one or two sentences.\n"
    "Behavior: the letter of the item the user chooses, written exactly as Behavior: [X].\n"
    "Do not mention that you are a model; write in the third person; be specific about the items by name; keep each "
    "part short. The user may choose any item of the exposure list, including one that does not match their history.")
STIMULI = ["boredom", "curiosity", "a rainy evening", "a weekend at home", "a friend's recommendation", "nostalgia",
           "a long week at work", "a date night"]
KNOWLEDGE = ["quality", "novelty", "personal relevance", "social proof", "past experience", "the genre", "the era", "the cast"]
STYLES = ["logical", "intuitive", "impulsive", "habitual"]


def scene_prompts(n_scenes: int, target_tokens: int, tok) -> list[list[dict]]:
    "Scene-like conversations of ~target_tokens tokens: real ML-100K scenes when the quick profile's scenes exist."
    path = project_root() / "results" / "quick" / "scenes" / "train.parquet"
    if path.exists():
        import pandas as pd
        df = pd.read_parquet(path)
        df = df[df.domain == "movielens"].reset_index(drop=True)
        texts, extra = list(df.scene_text[:n_scenes]), [h for hs in df.history[n_scenes:n_scenes + 40] for h in hs]
        print(f"scenes: {n_scenes} ML-100K scenes from {path.relative_to(project_root())}")
    else:
        rng = np.random.default_rng(0)
        hist = lambda n: [f"Movie {rng.integers(1000)} ({rng.integers(1950, 1998)}) — genres: Drama, Comedy — rated {rng.integers(1, 6)}/5 on 1998-0{rng.integers(1, 9)}-1{rng.integers(9)}" for _ in range(n)]
        texts = ["## User profile\nA 35-year-old man whose occupation is engineer.\n\n## History (oldest first)\n" + "\n".join(f"- {h}" for h in hist(10))
                 + "\n\n## Exposure list\n" + "\n".join(f"[{L}] Candidate {L} ({1990 + j}) — genres: Thriller" for j, L in enumerate("ABCDE"))
                 for _ in range(n_scenes)]
        extra = hist(60)
        print(f"scenes: {n_scenes} synthetic scenes ({path} not found)")
    convs = []
    for s, text in enumerate(texts):
        head, tail = text.split("\n\n## Exposure list", 1)
        more = []
        while True:
            user = head + "".join(f"\n- {h}" for h in more) + "\n\n## Exposure list" + tail + "\n\nWhich item does the user choose?"
            conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            n = len(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            if n >= target_tokens or len(more) >= len(extra): break
            more.append(extra[(s * 7 + len(more)) % len(extra)])
        convs.append(conv)
    return convs


def rationales(conv, n: int, rng, short: bool = False) -> list[str]:
    "n EKB-shaped rationales naming items of the scene, each ending with 'Behavior: [': ~90-160 tokens, or ~25-60 with `short`."
    expo = [l[4:].split(" — ")[0] for l in conv[1]["content"].splitlines() if l.startswith("[") and "] " in l]
    hist = [l[2:].split(" — ")[0] for l in conv[1]["content"].splitlines() if l.startswith("- ")]
    out = []
    for _ in range(n):
        st = ", ".join(rng.choice(STIMULI, rng.integers(1, 4), replace=False))
        kn = rng.choice(KNOWLEDGE, rng.integers(1, 3) if short else rng.integers(2, 5), replace=False)
        know = "; ".join(f"{k}: {rng.choice(expo)}" + ("" if short else f" compared with {rng.choice(hist)}"
                         + (" which the user rated highly" if rng.random() < .5 else "")) for k in kn)
        ev = rng.choice(STYLES)
        why = "" if short else " — " + " ".join(["The user weighs the familiar against the new."] * int(rng.integers(1, 4)))
        out.append(f"Stimulus: {st}.\nKnowledge: {know}.\nEvaluation: {ev}{why}\n{BEHAVIOR_CONTEXT}")
    return out


def score(llm, convs, conts, label):
    import torch
    plen = [len(llm.encode(llm.prompt(c))) for c in convs]
    clen = [len(llm.encode(x)) for cs in conts for x in cs]
    n, P, C = sum(map(len, conts)), np.mean(plen), np.mean(clen)
    t0 = time.perf_counter(); reuse = llm.choice_probs(convs, conts, k=5); t_reuse = time.perf_counter() - t0
    t0 = time.perf_counter(); full = llm.choice_probs_full(convs, conts, k=5); t_full = time.perf_counter() - t0
    assert llm.stats["boundary_fallbacks"] == 0
    diff = max(float(np.abs(r.probs - f.probs).max()) for r, f in zip(reuse, full))
    bound = len(conts[0]) * (P + C) / (P + len(conts[0]) * C)
    print(f"-- {label}: rationale tokens min/mean/max {min(clen)}/{C:.0f}/{max(clen)}, prefix tokens {plen}")
    print(f"prefix reuse      : {n / t_reuse:6.2f} rationales/s ({t_reuse:.1f} s for {n})")
    print(f"naive full passes : {n / t_full:6.2f} rationales/s ({t_full:.1f} s for {n})")
    print(f"ratio             : {t_full / t_reuse:6.2f}x  (target >= 5x; tokens processed naive/reuse = {bound:.2f}x)")
    print(f"max |reuse - full| over all letter probabilities: {diff:.2e} (must be < 1e-4)")
    return reuse, t_reuse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 scene, batches 1 and 8 only (about a minute)")
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--rationales", type=int, default=10)
    ap.add_argument("--prefix-tokens", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args(argv)
    import torch
    n_scenes, gen_batches = (1, [1, 8]) if a.quick else (a.scenes, [1, 8, 16, 32])
    llm = TransformersLLM(LLMConfig(model="smollm2-135m-instruct", batch_size=a.batch_size))
    print(f"model {llm.name} ({llm.dtype}, {llm.device}), torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    convs = scene_prompts(n_scenes, a.prefix_tokens, llm.tok)
    rng = np.random.default_rng(0)
    plen = [len(llm.encode(llm.prompt(c))) for c in convs]
    print(f"{len(convs)} scenes x {a.rationales} rationales, batch size {a.batch_size}")
    llm.choice_probs(convs[:1], [rationales(convs[0], 2, rng)], k=5)      # warm-up
    print("\n== choice probabilities ==")
    reuse, t_reuse = score(llm, convs, [rationales(c, a.rationales, rng) for c in convs], "EKB rationales")
    score(llm, convs, [rationales(c, a.rationales, rng, short=True) for c in convs], "short rationales")
    with torch.inference_mode():
        t0 = time.perf_counter()
        for c in convs: llm.model(input_ids=torch.tensor([llm.encode(llm.prompt(c))]), use_cache=True, logits_to_keep=1)
        t_prefix = (time.perf_counter() - t0) / len(convs)
    mass = np.concatenate([r.letter_mass for r in reuse])
    print(f"letter_mass (share of next-token probability on A-E): median {np.median(mass):.3f}, range {mass.min():.3f}-{mass.max():.3f}")
    print("cross-scene batching: implemented for one continuation per scene only (direct mode: full passes batched across "
          "scenes, where reuse gains nothing). Not for rationales: each scene's prefix is encoded once and its "
          f"{a.rationales} rationales are scored against it in one or two length-grouped batches; encoding a prefix "
          f"({t_prefix:.1f} s per scene here, {t_prefix * len(convs) / t_reuse:.0%} of the reuse time) would not get cheaper "
          "by batching scenes together on a CPU, so no cross-scene variant is measured.")

    print(f"\n== generation (sampling T=1.0 top_p=0.9, up to {a.new_tokens} new tokens after 'Stimulus:', one scene prompt of {plen[0]} "
          f"tokens, whose encoding took {t_prefix:.1f} s) ==")
    for b in gen_batches:
        llm.batch_size = b
        reps = 3 if b == 1 else 1
        toks, dt = 0, 0.0
        for r in range(reps):
            s = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=a.new_tokens, seed=r)
            t0 = time.perf_counter(); out = llm.generate(convs[:1], n=b, sampling=s, assistant_prefix="Stimulus:"); dt += time.perf_counter() - t0
            toks += sum(len(llm.encode(t)) for t in out[0])
        print(f"batch {b:2d}: {toks / dt:6.1f} generated tokens/s ({toks} tokens in {dt:.1f} s over {reps} call(s), "
              f"at most {reps * b * a.new_tokens}; each call also encodes the prompt once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
