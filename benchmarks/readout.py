"""Cloze readout and staged-rationale speed of the local transformers backend (SmolLM2-135M-Instruct), side by side.

    .venv/bin/python benchmarks/readout.py [--scenes 6] [--batch-size 20] [--profile quick] [--variants 150]

1. Cloze readout on real scenes (results/quick/scenes/eval.parquet; run `make paper` or the scenes stage first):
   `choice_distributions(..., "cloze")` (each prompt encoded once, the k item texts scored against its cached
   prefix, prompts batched across scenes) against the naive form (one full forward of prompt + item per item),
   scenes/second of each, their ratio, and the largest probability difference (must be < 5e-3).
2. Staged rationales (three bounded fields): `write_rationales` with `generate_fields` (one prefill per scene, the
   fields decoded against its cache) against rendering the prompt again per field (the path servers take), rationales
   per second and the ratio.

3. `--variants N`: accuracy of the history readout's prompt forms on the first N eval scenes of `--profile` (argmax
   and mean p(gt) for the mean and summed log-prob, predicted positions A..E): the rows behind 04a_readout's choice.

Timings are wall-clock on whatever else the machine is doing; run it twice if in doubt. Tests never time anything.
"""
import argparse, time

import numpy as np
import torch

from usermirror_nb.config import LLMConfig, load_config
from usermirror_nb.llm import Sampling, TransformersLLM, make_llm
from usermirror_nb.rationales import rationale_conversation, write_rationales
from usermirror_nb.readout import (HISTORY_HEADER, assistant_text, choice_distributions, cloze_distribution, history_options,
                                   history_prompt, item_title, option_texts)
from usermirror_nb.scenes import load_scenes


def naive_cloze(llm, scene):
    p = llm.encode(llm.prompt(rationale_conversation(scene["scene_text"], int(scene["choice_cnt"])), assistant_text("", "cloze")))
    rows = []
    with torch.inference_mode():
        for o in option_texts(scene):
            q = llm.encode(o)
            lp = llm.model(input_ids=torch.tensor([p + q])).logits[0].double().log_softmax(-1)
            rows.append([float(sum(lp[len(p) - 1 + t, q[t]] for t in range(len(q)))), len(q)])
    return cloze_distribution(np.array(rows))


class RenderPerField:
    "The backend without `generate_fields`: write_rationales renders the prompt again for each field."
    def __init__(self, llm): self.llm, self.name, self.count_tokens = llm, llm.name, llm.count_tokens
    def prompt(self, *a, **k): return self.llm.prompt(*a, **k)
    def generate(self, *a, **k): return self.llm.generate(*a, **k)
    def generate_prompts(self, *a, **k): return self.llm.generate_prompts(*a, **k)


VARIANTS = {  # name -> (prompt, options) of one scene record; "titles" is the history readout itself
    "titles": (history_prompt, history_options),
    "titles + newline": (history_prompt, lambda r: [o + "\n" for o in history_options(r)]),
    "chose, no dash": (lambda r: "Movies this user chose, in order:\n" + "".join(f"{item_title(h)}\n" for h in r["history"]),
                       lambda r: [item_title(x) + "\n" for x in r["exposure_texts"]]),
    "full lines": (lambda r: HISTORY_HEADER + "".join(f"- {h}\n" for h in r["history"]) + "-", option_texts),
}


def variants(llm, recs):
    gt = np.array([int(r["gt_pos"]) for r in recs])
    for name, (pf, of) in VARIANTS.items():
        t0 = time.time(); res = llm.option_logprobs([pf(r) for r in recs], [of(r) for r in recs]); dt = time.time() - t0
        for norm in ("mean", "sum"):
            p = np.stack([cloze_distribution(x, norm) for x in res]); a = p.argmax(1)
            print(f"{name:18s} {norm:4s}: argmax {np.mean(a == gt):.3f}  p(gt) {p[np.arange(len(gt)), gt].mean():.3f}  "
                  f"positions {np.bincount(a, minlength=p.shape[1]).tolist()}  ({len(recs)} scenes, {dt:.0f} s)", flush=True)


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--scenes", type=int, default=6); ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--profile", default="quick"); ap.add_argument("--variants", type=int, default=0)
    a = ap.parse_args()
    cfg = load_config(a.profile)
    if a.variants:
        llm = make_llm(LLMConfig(model="smollm2-135m-instruct", batch_size=40, dtype="auto"), cfg.assets.cache_path)
        return variants(llm, load_scenes(cfg, "eval").to_pandas().head(a.variants).to_dict("records"))
    recs = load_scenes(cfg, "eval").to_pandas().head(a.scenes).to_dict("records")
    llm = make_llm(LLMConfig(model="smollm2-135m-instruct", batch_size=a.batch_size, dtype="auto"), cfg.assets.cache_path)
    print(f"{len(recs)} scenes, ~{np.mean([len(llm.encode(llm.prompt(rationale_conversation(s['scene_text'], 5)))) for s in recs]):.0f} prompt tokens, {llm.dtype}")
    t0 = time.time(); fast = [c.probs[0] for c in choice_distributions(llm, recs, None, "cloze")]; t_fast = time.time() - t0
    t0 = time.time(); slow = [naive_cloze(llm, s) for s in recs]; t_slow = time.time() - t0
    diff = max(float(np.abs(f - s).max()) for f, s in zip(fast, slow))
    print(f"cloze: batched {len(recs) / t_fast:.2f} scenes/s, naive {len(recs) / t_slow:.2f} scenes/s, ratio {t_slow / t_fast:.1f}x, max |dp| {diff:.1e}")
    assert diff < 5e-3
    convs = [rationale_conversation(s["scene_text"], 5) for s in recs[:4]]
    s = Sampling(temperature=1.0, top_p=0.9, seed=0)
    t0 = time.time(); write_rationales(llm, convs, 2, s, True, 16); t_f = time.time() - t0
    t0 = time.time(); write_rationales(RenderPerField(llm), convs, 2, s, True, 16); t_r = time.time() - t0
    n = 2 * len(convs)
    print(f"staged rationales: generate_fields {n / t_f:.2f}/s, re-rendered per field {n / t_r:.2f}/s, ratio {t_r / t_f:.1f}x")


if __name__ == "__main__":
    main()
