"""Edge cases of usermirror_nb.config: profile validation, overrides, atomic artifacts, stage records."""
import json
from pathlib import Path

import pytest
import yaml

from usermirror_nb.config import (STAGES, Config, ConfigError, DomainConfig, ScenesConfig, atomic_path, config_from_dict,
                                  load_config, parse_overrides, project_root, record_stage, stage_not_implemented, write_json)

ML = {"name": "movielens", "source": "ml-100k", "positive_min": 4}


def write_profile(tmp_path, data, name="tiny.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def base(tmp_path, **extra) -> dict:
    return {"results_root": str(tmp_path / "results"), "domains": [dict(ML)], **extra}


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_shipped_profiles_validate(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert cfg.source == str(project_root() / "configs" / f"{profile}.yaml")
    assert [d.name for d in cfg.domains] == ["movielens", "books"]
    assert 2 <= cfg.scenes.k <= 26


def test_unknown_top_level_key_names_file_and_key(tmp_path):
    p = write_profile(tmp_path, base(tmp_path, scenez={"k": 4}))
    with pytest.raises(ConfigError) as e: load_config(p)
    assert str(p) in str(e.value) and "scenez" in str(e.value)


def test_unknown_section_key_names_file_section_and_key(tmp_path):
    p = write_profile(tmp_path, base(tmp_path, scenes={"k": 4, "histroy_len": 3}))
    with pytest.raises(ConfigError) as e: load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "scenes" in msg and "histroy_len" in msg
    assert "history_len" in msg  # the known keys are listed, so the typo is easy to spot


def test_unknown_domain_key_names_the_entry(tmp_path):
    p = write_profile(tmp_path, base(tmp_path, domains=[{**ML, "positve_min": 3}]))
    with pytest.raises(ConfigError, match=r"domains\[0\].*positve_min"): load_config(p)


@pytest.mark.parametrize("k", [27, 1, 100])
def test_k_out_of_range_is_a_clear_error(tmp_path, k):
    with pytest.raises(ConfigError, match="2 to 26"): ScenesConfig(k=k)
    p = write_profile(tmp_path, base(tmp_path, scenes={"k": k}))
    with pytest.raises(ConfigError) as e: load_config(p)
    assert "scenes.k" in str(e.value) and "2 to 26" in str(e.value) and str(p) in str(e.value)


def test_k_via_override_is_validated_too():
    with pytest.raises(ConfigError, match="2 to 26"): load_config("quick", "scenes.k=27")
    assert load_config("quick", "scenes.k=26").scenes.k == 26


def test_parse_overrides():
    assert parse_overrides("") == {} and parse_overrides(None) == {}
    assert parse_overrides("seed=3, scenes.k=4 scenes.style=evidence assets.try_network=false") == {
        "seed": 3, "scenes.k": 4, "scenes.style": "evidence", "assets.try_network": False}
    assert parse_overrides({"seed": 1}) == {"seed": 1}
    assert parse_overrides("description=a=b") == {"description": "a=b"}  # only the first '=' splits
    with pytest.raises(ConfigError, match="key=value"): parse_overrides("seed")


def test_overrides_apply_to_nested_keys_and_list_entries(tmp_path):
    p = write_profile(tmp_path, base(tmp_path))
    cfg = load_config(p, "seed=5 scenes.k=4 assets.try_network=false")
    assert (cfg.seed, cfg.scenes.k, cfg.assets.try_network) == (5, 4, False)
    assert yaml.safe_load(p.read_text()) == base(tmp_path)  # the profile file itself is untouched
    with pytest.raises(ConfigError, match="kk"): load_config(p, "scenes.kk=3")
    with pytest.raises(ConfigError, match="seed must be an int"): load_config(p, "seed=abc")


def test_override_of_a_list_entry(tmp_path):
    cfg = load_config(write_profile(tmp_path, base(tmp_path)), "domains.0.positive_min=5")
    assert cfg.domains[0].positive_min == 5 and cfg.domains[0].name == "movielens"


def test_bad_yaml_and_missing_profile(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"): load_config(p)
    with pytest.raises(ConfigError, match="no file"): load_config(tmp_path / "absent.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"): load_config(p)


def test_domains_required_and_unique(tmp_path):
    with pytest.raises(ConfigError, match="at least one"): load_config(write_profile(tmp_path, base(tmp_path, domains=[])))
    with pytest.raises(ConfigError, match="unique"): load_config(write_profile(tmp_path, base(tmp_path, domains=[ML, ML])))


def test_files_source_requires_the_three_files(tmp_path):
    for missing in ("users_file", "items_file", "interactions_file"):
        files = {"users_file": "u.csv", "items_file": "i.csv", "interactions_file": "x.csv"}
        files.pop(missing)
        with pytest.raises(ConfigError, match=missing): DomainConfig(name="mine", source="files", positive_min=1, **files)
    p = write_profile(tmp_path, base(tmp_path, domains=[{"name": "mine", "source": "files", "positive_min": 1, "users_file": "u.csv"}]))
    with pytest.raises(ConfigError) as e: load_config(p)
    assert str(p) in str(e.value) and "items_file" in str(e.value)
    d = DomainConfig(name="mine", source="files", positive_min=1, users_file="u.csv", items_file="i.csv",
                     interactions_file="x.csv", columns={"users": {"uid": "user_id"}})
    assert d.columns["users"] == {"uid": "user_id"}
    with pytest.raises(ConfigError, match="source must be one of"): DomainConfig(name="x", source="ml-1m", positive_min=1)
    with pytest.raises(ConfigError, match="columns keys"): DomainConfig(name="x", source="ml-100k", positive_min=1, columns={"user": {}})


def test_results_dir_and_hash(tmp_path):
    cfg = load_config(write_profile(tmp_path, base(tmp_path)))
    assert cfg.profile == "tiny" and cfg.results_dir == tmp_path / "results" / "tiny"
    assert cfg.stage_dir("scenes").is_dir()
    assert cfg.hash() == load_config(write_profile(tmp_path, base(tmp_path))).hash()
    assert cfg.hash() != load_config(write_profile(tmp_path, base(tmp_path)), "seed=1").hash()


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    dest = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as t:
            t.write_text("half written")
            raise RuntimeError("boom")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind
    with atomic_path(dest) as t: t.write_text('{"v": 2}')
    assert json.loads(dest.read_text()) == {"v": 2}


def test_atomic_path_keeps_old_folder_on_failure(tmp_path):
    dest = tmp_path / "art"
    with atomic_path(dest, is_dir=True) as t:
        t.mkdir(exist_ok=True); (t / "x.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest, is_dir=True) as t:
            t.mkdir(exist_ok=True); (t / "x.txt").write_text("new"); raise KeyboardInterrupt
    assert (dest / "x.txt").read_text() == "old"
    with atomic_path(dest, is_dir=True) as t:
        t.mkdir(exist_ok=True); (t / "y.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["y.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_record_stage(tmp_path):
    cfg = load_config(write_profile(tmp_path, base(tmp_path)))
    p = record_stage(cfg, "scenes", "done", tmp_path / "scenes", 1.5, {"scenes": 10}, note="ok")
    assert p == cfg.results_dir / "stages" / "scenes.json"
    rec = json.loads(p.read_text())
    assert {k: rec[k] for k in ("stage", "status", "seconds", "counts", "note", "config_hash", "profile")} == dict(
        stage="scenes", status="done", seconds=1.5, counts={"scenes": 10}, note="ok", config_hash=cfg.hash(), profile="tiny")
    assert rec["artifact"] == str(tmp_path / "scenes")
    rec = json.loads(stage_not_implemented(cfg, "report", "issue #5").read_text())
    assert (rec["status"], rec["artifact"], rec["note"]) == ("not implemented", None, "issue #5")
    with pytest.raises(ConfigError, match="unknown stage"): record_stage(cfg, "scene", "done")
    with pytest.raises(ConfigError, match="status must be"): record_stage(cfg, "scenes", "ok")
    assert STAGES[0] == "config" and STAGES[-1] == "report"
