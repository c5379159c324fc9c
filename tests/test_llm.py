"""Stage 03 (LLM backends), local transformers backend: real SmolLM2-135M-Instruct from the assets cache.

Prefix-reuse letter scoring against naive full passes, seeded generation, stop_regex, letter-token checks,
zero/NaN letter mass, and the documented prompt templates.
"""
import logging, re

import numpy as np
import pytest

from usermirror_nb.config import LLMConfig
from usermirror_nb.llm import (BEHAVIOR_CONTEXT, LLMError, Sampling, TransformersLLM, letter_token_ids, render_prompt,
                               resolve_template)

SYSTEM = "You simulate a user of a recommender system. Explain how the user decides, then end with Behavior: [letter]."


def scene_user(n_hist: int = 7) -> str:
    "A deterministic scene-like user turn (~300 tokens with the SmolLM2 chat template)."
    genres = ["Drama", "Comedy", "Thriller", "Action", "Romance", "Sci-Fi", "Crime"]
    hist = "\n".join(f"- Movie number {i} ({1980 + i}) — genres: {genres[i % 7]}, {genres[(i + 3) % 7]} — rated {1 + i % 5}/5"
                     for i in range(n_hist))
    expo = "\n".join(f"[{L}] Candidate film {L} ({1990 + j}) — genres: {genres[j]}" for j, L in enumerate("ABCDE"))
    return (f"## User profile\nA 31-year-old woman whose occupation is writer.\n\n## History (oldest first)\n{hist}\n\n"
            f"## Exposure list\n{expo}\n\nWhich item does the user choose?")


CONV = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": scene_user()}]
CONTS = [  # five assistant turns of different lengths, each ending with the letter context
    BEHAVIOR_CONTEXT,
    "Stimulus: boredom.\nBehavior: [",
    "Stimulus: a rainy Sunday and curiosity.\nKnowledge: she rated dramas highly; candidate B is a thriller.\n"
    "Evaluation: logical.\nBehavior: [",
    "Stimulus: the weekend.\nKnowledge: quality, novelty.\nEvaluation: intuitive.\nBehavior: [",
    "Stimulus: a friend's recommendation and an empty evening after a long week of work.\n"
    "Knowledge: personal relevance (she liked the crime films in her history), social proof, past experience "
    "with the director, and the novelty of a film she has not seen.\nEvaluation: habitual — she picks what resembles "
    "her favourites.\nBehavior: [",
]


@pytest.fixture(scope="module")
def smol():
    llm = TransformersLLM(LLMConfig(model="smollm2-135m-instruct", dtype="float32", batch_size=2))   # loaded from the assets cache
    yield llm
    llm.close()


def test_prefix_reuse_equals_full_passes(smol):
    n_prefix = len(smol.encode(smol.prompt(CONV)))
    assert 250 <= n_prefix <= 400, n_prefix
    conv2 = [CONV[0], {"role": "user", "content": scene_user(3)}]
    before = dict(smol.stats)
    reuse = smol.choice_probs([CONV, conv2], [CONTS, CONTS[:2]], k=5)       # batch_size 2: three batches for CONV
    full = smol.choice_probs_full([CONV, conv2], [CONTS, CONTS[:2]], k=5)
    assert smol.stats["prefix_reuse"] == before["prefix_reuse"] + 2 and smol.stats["boundary_fallbacks"] == before["boundary_fallbacks"]
    for r, f, m in zip(reuse, full, (5, 2)):
        assert r.probs.shape == (m, 5) and r.probs.dtype == np.float64
        np.testing.assert_allclose(r.probs, f.probs, atol=1e-4, rtol=0)
        np.testing.assert_allclose(r.letter_mass, f.letter_mass, atol=1e-4, rtol=0)
        np.testing.assert_allclose(r.probs.sum(1), 1.0, atol=1e-12)
        assert ((r.letter_mass > 0) & (r.letter_mass <= 1)).all()
    # direct mode: one continuation per conversation -> full passes batched across conversations, same numbers
    direct = smol.choice_probs([CONV, conv2], [[CONTS[4]], [CONTS[1]]], k=5)
    np.testing.assert_allclose(direct[0].probs[0], reuse[0].probs[4], atol=1e-4, rtol=0)
    np.testing.assert_allclose(direct[1].probs[0], reuse[1].probs[1], atol=1e-4, rtol=0)
    # continuations of different lengths give different distributions (the right row was read)
    assert np.abs(reuse[0].probs[0] - reuse[0].probs[4]).max() > 1e-3


def test_boundary_merge_falls_back_to_full_passes(smol, caplog):
    conts = ["\n\nBehavior: [", "Behavior: ["]     # "\n" (end of the ChatML prompt) + "\n\n" merge into one token
    pids, cids = smol.encode(smol.prompt(CONV)), smol.encode(conts[0])
    assert smol.encode(smol.prompt(CONV) + conts[0]) != pids + cids
    before = smol.stats["boundary_fallbacks"]
    with caplog.at_level(logging.WARNING, logger="usermirror_nb.llm"):
        got = smol.choice_probs([CONV], [conts], k=5)[0]
    assert smol.stats["boundary_fallbacks"] == before + 1
    assert "boundary" in caplog.text and "conversation 0" in caplog.text
    np.testing.assert_allclose(got.probs, smol.choice_probs_full([CONV], [conts], k=5)[0].probs, atol=1e-12)
    assert np.abs(got.probs[0] - got.probs[1]).max() > 1e-3


def test_generate_seeded_and_stop_regex(smol):
    conv = [{"role": "user", "content": "Tell me a short story about a cat."}]
    s = Sampling(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=3)
    smol.batch_size = 4                                        # 6 sequences -> 2 batches (seeds 3 and 4)
    try:
        a = smol.generate([conv, conv], n=3, sampling=s)
        assert smol.generate([conv, conv], n=3, sampling=s) == a                     # same call, same text
        assert smol.generate([conv, conv], n=3, sampling=Sampling(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=4)) != a
    finally: smol.batch_size = 2
    assert [len(x) for x in a] == [3, 3] and all(isinstance(t, str) and t for x in a for t in x)
    assert len(set(a[0] + a[1])) > 1                                             # the samples differ from each other
    assert not any("<|im_end|>" in t or "<|im_start|>" in t for x in a for t in x)
    # stop_regex: generation stops at the first match, the match is kept, nothing after it
    rx = r"[a-z]{3,}\s"
    free = smol.generate([conv], n=1, sampling=Sampling(temperature=1.0, max_new_tokens=24, seed=5))[0][0]
    stopped = smol.generate([conv], n=1, sampling=Sampling(temperature=1.0, max_new_tokens=24, seed=5, stop_regex=rx))[0][0]
    m = re.search(rx, stopped)
    assert m and m.end() == len(stopped), stopped
    assert free.startswith(stopped) and len(stopped) < len(free), (stopped, free)
    # an assistant prefix: the returned text is what follows it
    pre = smol.generate([CONV], n=2, sampling=Sampling(max_new_tokens=12, seed=1), assistant_prefix="Stimulus:")[0]
    assert len(pre) == 2 and not any(t.startswith("Stimulus:") for t in pre)
    # greedy is deterministic regardless of the seed
    g = [smol.generate([conv], sampling=Sampling(temperature=0, max_new_tokens=8, seed=sd))[0][0] for sd in (0, 1)]
    assert g[0] == g[1]


def test_letter_checks():
    from usermirror_nb.assets import model_path
    from transformers import AutoTokenizer
    smol_tok = AutoTokenizer.from_pretrained(model_path("smollm2-135m-instruct"), local_files_only=True)
    assert letter_token_ids(smol_tok, 26) == list(range(49, 75))
    with pytest.raises(ValueError, match="k=27"):
        letter_token_ids(smol_tok, 27)
    with pytest.raises(ValueError, match=r"letter 'A' \(k=5\) is not a single token after 'Behavior: '"):
        letter_token_ids(smol_tok, 5, context="Behavior: ")      # " A" merges with the space
    # a tiny BPE tokenizer that merges "[" with "B": B is not a single token after "Behavior: ["
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set("Behavior: [ABCDE]"))
    vocab = {c: i for i, c in enumerate(chars)} | {"[B": len(chars)}
    tiny = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[("[", "B")])))
    with pytest.raises(ValueError, match=r"letter 'B' \(k=5\) is not a single token"):
        letter_token_ids(tiny, 5)
    assert tiny("Behavior: [A", add_special_tokens=False)["input_ids"][-1] == vocab["A"]   # A alone is fine


def test_zero_and_nan_letter_mass_raise(smol):
    convs = [CONV, [CONV[0], {"role": "user", "content": scene_user(3)}]]
    conts = [CONTS[1:3], CONTS[2:4]]         # two continuations each: the prefix-reuse path
    letters = smol.letter_ids(5)
    calls = {"n": 0}

    def poison(kind, from_call):
        def hook(module, inputs, output):
            calls["n"] += 1
            if calls["n"] >= from_call:
                output = output.clone()
                if kind == "zero": output[..., letters] = -float("inf")
                else: output[...] = float("nan")
                return output
        return hook

    # reuse path: lm_head runs twice per conversation here (prefix, one batch) -> poisoning from the 4th call hits conversation 1
    for kind in ("zero", "nan"):
        calls["n"] = 0
        h = smol.model.lm_head.register_forward_hook(poison(kind, 4))
        try:
            with pytest.raises(LLMError, match=r"conversation 1, continuation 0: .*zero or not finite"):
                smol.choice_probs(convs, conts, k=5)
        finally: h.remove()
    # full passes (batched across conversations): every call poisoned -> the first conversation is named
    calls["n"] = 0
    h = smol.model.lm_head.register_forward_hook(poison("zero", 1))
    try:
        with pytest.raises(LLMError, match="conversation 0, continuation 0"):
            smol.choice_probs_full(convs, conts, k=5)
    finally: h.remove()
    ok = smol.choice_probs(convs, conts, k=5)     # the hooks are gone: finite again
    assert all(np.isfinite(c.probs).all() for c in ok)


def test_inputs_validated(smol):
    with pytest.raises(ValueError, match="continuation 1"):
        smol.choice_probs([CONV], [["Behavior: [", "Behavior: A"]], k=5)
    with pytest.raises(ValueError, match="conversation 0, message 1"):
        smol.generate([[CONV[0], {"role": "robot", "content": "x"}]])
    with pytest.raises(ValueError, match="k=1"):
        smol.choice_probs([CONV], [[BEHAVIOR_CONTEXT]], k=1)


def test_templates_render_as_documented(smol):
    conv = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "USER"}, {"role": "assistant", "content": "OLD"},
            {"role": "user", "content": "AGAIN"}]
    assert render_prompt(None, conv, "Stimulus:", "plain") == "SYS\n\nUSER\n\nAnswer:\nOLD\n\nAGAIN\n\nAnswer:\nStimulus:"
    assert render_prompt(None, conv[:2]) == "SYS\n\nUSER\n\nAnswer:\n"                  # auto without tokenizer = plain
    assert render_prompt(smol.tok, conv[:2], "P") == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nUSER<|im_end|>\n"
                                                      "<|im_start|>assistant\nP")
    assert render_prompt(smol.tok, conv[:2], "P", "plain") == "SYS\n\nUSER\n\nAnswer:\nP"  # SmolLM2 adds no BOS
    # a tokenizer without chat template that adds BOS (as Gemma's): plain, with BOS written out
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<bos>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    base = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>")
    assert resolve_template(base, "auto") == "plain"
    assert render_prompt(base, conv[:2], "S") == "<bos>SYS\n\nUSER\n\nAnswer:\nS"
    with pytest.raises(ValueError, match="use template 'plain'"):
        render_prompt(base, conv[:2], template="chat")
    # the backend feeds exactly that text: prompt + continuation tokenise independently for ChatML
    p = smol.prompt(conv[:2])
    assert smol.encode(p + CONTS[2]) == smol.encode(p) + smol.encode(CONTS[2])


def test_generation_batches_span_prompts(smol):
    conv = [{"role": "user", "content": "Name a colour."}]
    out = smol.generate([conv, [{"role": "user", "content": "Name an animal, please, in one word."}]], n=3,
                        sampling=Sampling(max_new_tokens=4, seed=0))      # batch_size 2, n 3: a prompt spans two batches
    assert [len(x) for x in out] == [3, 3]


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_vllm_backend_without_vllm_or_gpu_fails_clearly():
    import importlib.util
    from usermirror_nb.llm import make_llm
    if importlib.util.find_spec("vllm") is not None and _cuda():
        pytest.skip("vllm and a GPU are present: see test_vllm_backend_matches_transformers")
    with pytest.raises(LLMError, match="backend 'vllm' needs"):
        make_llm(LLMConfig(backend="vllm"))


@pytest.mark.gpu
def test_transformers_on_cuda_prefix_reuse_and_generation():
    llm = TransformersLLM(LLMConfig(model="smollm2-135m-instruct", device="cuda", batch_size=2))
    assert llm.device.startswith("cuda")
    r, f = llm.choice_probs([CONV], [CONTS], k=5)[0], llm.choice_probs_full([CONV], [CONTS], k=5)[0]
    np.testing.assert_allclose(r.probs, f.probs, atol=1e-4, rtol=0)
    s = Sampling(max_new_tokens=12, seed=2)
    assert llm.generate([CONV], n=3, sampling=s) == llm.generate([CONV], n=3, sampling=s)


@pytest.mark.gpu
def test_vllm_backend_matches_transformers():
    pytest.importorskip("vllm")
    from usermirror_nb.llm import make_llm
    v = make_llm(LLMConfig(backend="vllm", model="smollm2-135m-instruct"))
    t = TransformersLLM(LLMConfig(model="smollm2-135m-instruct", device="cuda"))
    out = v.generate([CONV], n=2, sampling=Sampling(max_new_tokens=16, seed=0, stop_regex=r"Behavior:\s*\[[A-Z]\]"))
    assert len(out) == 1 and len(out[0]) == 2 and all(isinstance(x, str) for x in out[0])
    vp, tp = v.choice_probs([CONV], [CONTS], k=5)[0], t.choice_probs([CONV], [CONTS], k=5)[0]
    np.testing.assert_allclose(vp.probs, tp.probs, atol=2e-3)             # the letters are in the top 20 here; GPU kernels differ
    np.testing.assert_allclose(vp.letter_mass, tp.letter_mass, atol=2e-3)
    v.close(); t.close()


LLAMA32_STYLE = (  # the shape of Llama-3.2-Instruct's template: a dated system header, no {% generation %} markers
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: 02 Dec 2026\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def test_an_assistant_loss_the_students_template_cannot_mark_stops_stage_03_before_any_model_loads(tmp_path):
    "#11.1: `loss_on: assistant` with a Llama-3.2-style template used to fail in stage 07, after hours of stages 04-06."
    from usermirror_nb.config import ConfigError, config_from_dict
    from usermirror_nb.finetune import load_tokenizer
    from usermirror_nb.llm import check_training_template, run_llm
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.chat_template = LLAMA32_STYLE
    folder = tmp_path / "llama32-style"; tok.save_pretrained(folder)          # a tokenizer only: no weights to load
    dom = [{"name": "movielens", "source": "ml-100k", "positive_min": 4}]
    cfg = config_from_dict({"profile": "t", "results_root": str(tmp_path / "results"), "domains": dom,
                            "models": {r: {"model": str(folder)} for r in ("teacher", "student", "predictor")},
                            "finetune": {"loss_on": "assistant"}})
    with pytest.raises(ConfigError, match=r"finetune.loss_on='assistant' with models.student.model .*llama32-style.*loss_on='letter'"):
        run_llm(cfg)
    assert not (cfg.results_dir / "llm" / "models.json").exists()
    ok = config_from_dict({"profile": "t", "domains": dom, "models": {"student": {"model": str(folder)}}, "finetune": {"loss_on": "letter"}})
    assert check_training_template(ok).startswith("not needed")


def test_close_frees_the_model_and_returns_cuda_memory(monkeypatch):
    "#11.7: a closed backend must not keep its weights alive, and on CUDA the cached blocks go back (the next role's model needs them)."
    import torch, weakref
    from usermirror_nb.llm import make_llm
    llm = make_llm(LLMConfig(model="smollm2-135m-instruct", batch_size=2))
    ref, emptied = weakref.ref(llm.model), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # after loading: the model stays on the CPU
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(ref() is None))
    llm.close()
    assert emptied == [True] and llm.model is None                          # collected before the cache is emptied


def test_a_template_that_stamps_today_gives_the_same_prompt_every_day(tmp_path):
    "#11.11: Llama-3.2's template writes strftime_now() into every prompt, so prompts (and cached results) changed daily."
    import datetime
    from usermirror_nb.assets import TEMPLATE_DATE
    from usermirror_nb.finetune import load_tokenizer
    from usermirror_nb.llm import render_prompt
    tok = load_tokenizer("smollm2-135m-instruct")
    tok.chat_template = "Today Date: {{ strftime_now('%d %b %Y') }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    folder = tmp_path / "dated"; tok.save_pretrained(folder)
    today = datetime.date.today().strftime("%d %b %Y")
    conv = [{"role": "user", "content": "Which film?"}]
    text = render_prompt(load_tokenizer(str(folder)), conv, template="chat")
    assert text.startswith(f"Today Date: {TEMPLATE_DATE}\n") and (today == TEMPLATE_DATE or today not in text)
