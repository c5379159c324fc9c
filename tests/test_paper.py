"""The executable-paper driver (usermirror_nb.paper) on tiny notebooks made here, run by the real papermill and kernel.

Results go to a temporary `results_root` (a temporary profile YAML), never into the repository's results/.
"""
import json, re, shutil, sys
from pathlib import Path

import nbformat
import pytest
import yaml

from usermirror_nb.config import STAGES, load_config
from usermirror_nb.paper import STAGE_NOTEBOOKS, main, run_paper

ROOT = Path(__file__).resolve().parents[1]
HEAD = "from usermirror_nb.config import load_config, record_stage, stage_not_implemented\ncfg = load_config(profile, overrides)\n"


@pytest.fixture
def env(tmp_path, monkeypatch):
    "A temporary profile (results under tmp_path) and an empty notebook folder."
    monkeypatch.setenv("USERMIRROR_ROOT", str(ROOT))
    prof = tmp_path / "tinyprof.yaml"
    prof.write_text(yaml.safe_dump({"results_root": str(tmp_path / "results"), "seed": 0,
                                    "domains": [{"name": "m", "source": "ml-100k", "positive_min": 4}]}))
    nbs = tmp_path / "nbs"; nbs.mkdir()
    return prof, nbs, tmp_path / "results" / "tinyprof"


def make_nb(folder: Path, name: str, body: str):
    "A notebook with papermill's `parameters` cell and one code cell."
    params = nbformat.v4.new_code_cell('profile = "quick"\noverrides = ""')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# {name}"), params, nbformat.v4.new_code_cell(body)])
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    nbformat.write(nb, folder / name)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_stage_table_matches_the_repository():
    assert [s for s, _ in STAGE_NOTEBOOKS] == STAGES
    for stage, nb in STAGE_NOTEBOOKS:
        cells = nbformat.read(ROOT / "nbs" / nb, as_version=4).cells
        src = "\n".join(c.source for c in cells)
        if "default_exp" in src:      # a built stage runs its stage function
            assert f"run_{stage}(cfg" in cells[-1].source, nb
            assert "**Not implemented yet**" not in src and "stage_not_implemented(" not in cells[-1].source, nb
        else:                         # a skeleton says so and records it
            assert f'stage_not_implemented(cfg, "{stage}", "issue #' in src and "**Not implemented yet**" in src, nb
        params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and 'profile = "quick"' in params[0].source, nb
        assert cells[-1].source.startswith("#| eval: false"), nb


def test_run_paper_statuses_summary_and_no_writes_to_sources(env):
    prof, nbs, out = env
    make_nb(nbs, "00_config.ipynb", HEAD + "import sys\np = cfg.stage_dir('config') / 'x.json'\np.write_text('{}')\n"
                                          "record_stage(cfg, 'config', 'done', p, 0.0, {'n': 1}, note=sys.prefix)")
    make_nb(nbs, "01_assets.ipynb", HEAD + "stage_not_implemented(cfg, 'assets', 'issue #1')")
    make_nb(nbs, "02_scenes.ipynb", HEAD + "raise ValueError('scenes exploded')")
    before = snapshot(nbs)

    s = run_paper(prof, "", stages="config,assets,scenes,llm", nbs_dir=nbs)

    st = {r["stage"]: r for r in s["stages"]}
    assert [r["stage"] for r in s["stages"]] == ["config", "assets", "scenes", "llm"]
    assert [r["status"] for r in s["stages"]] == ["done", "not implemented", "failed", "skipped"]
    assert st["config"]["artifact"] == str(out / "config" / "x.json") and st["config"]["counts"] == {"n": 1}
    assert Path(st["config"]["note"]).resolve() == Path(sys.prefix).resolve()  # the kernel is this venv's python
    assert st["assets"]["note"] == "issue #1" and st["assets"]["artifact"] is None
    assert "ValueError: scenes exploded" in st["scenes"]["note"]
    assert st["llm"]["note"] == "an earlier stage failed" and st["llm"]["seconds"] is None
    assert all(st[k]["seconds"] > 0 for k in ("config", "assets", "scenes"))
    assert (s["ran"], s["not_implemented"], s["failed"], s["skipped"]) == (["config"], ["assets"], ["scenes"], ["llm"])
    assert s["line"] == "ran: config; not implemented yet: assets; failed: scenes; skipped: llm"
    assert s["config_hash"] == load_config(prof).hash() and s["profile"] == "tinyprof"

    # summary files
    assert json.loads((out / "run_summary.json").read_text()) == s
    md = (out / "RUN_SUMMARY.md").read_text()
    assert "| stage | notebook | status | seconds | artifact | note |" in md
    assert re.search(r"\| scenes \| 02_scenes.ipynb \| failed \| [0-9.]+ \|  \| ValueError: scenes exploded", md)
    assert md.rstrip().endswith(s["line"])
    # executed copies go to results/<profile>/notebooks/, with the injected parameters; sources untouched
    assert sorted(p.name for p in (out / "notebooks").iterdir()) == ["00_config.ipynb", "01_assets.ipynb", "02_scenes.ipynb"]
    ran = nbformat.read(out / "notebooks" / "00_config.ipynb", as_version=4)
    inj = [c for c in ran.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(inj) == 1 and str(prof.resolve()) in inj[0].source
    assert snapshot(nbs) == before
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["assets.json", "config.json"]


def test_missing_record_stale_record_and_foreign_config_fail(env):
    prof, nbs, out = env
    make_nb(nbs, "00_config.ipynb", "x = 1  # runs fine, records nothing")
    stale = out / "stages" / "config.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"stage": "config", "status": "done", "config_hash": load_config(prof).hash()}))
    s = run_paper(str(prof), stages=["config"], nbs_dir=nbs)
    assert [r["status"] for r in s["stages"]] == ["failed"]
    assert "wrote no stage record" in s["stages"][0]["note"]   # the stale record was removed, not trusted
    assert not stale.exists()

    # a notebook that ignores its parameters (records for another config) fails too; main() exits 1
    make_nb(nbs, "00_config.ipynb", HEAD.replace("load_config(profile, overrides)", "load_config(profile, 'seed=99')")
            + "record_stage(cfg, 'config', 'done')")
    assert main(["--profile", str(prof), "--stages", "config", "--nbs-dir", str(nbs)]) == 1
    rec = json.loads((out / "run_summary.json").read_text())["stages"][0]
    assert rec["status"] == "failed" and "not this run's" in rec["note"]


def test_missing_notebook_fails_and_main_exit_codes(env):
    prof, nbs, out = env
    make_nb(nbs, "00_config.ipynb", HEAD + "record_stage(cfg, 'config', 'done')")
    s = run_paper(prof, stages="config,assets", nbs_dir=nbs)           # 01_assets.ipynb does not exist
    assert [r["status"] for r in s["stages"]] == ["done", "failed"] and "not found" in s["stages"][1]["note"]
    assert main(["--profile", str(prof), "--stages", "config", "--nbs-dir", str(nbs)]) == 0
    assert main(["--profile", str(prof), "--overrides", "scenes.k=40", "--nbs-dir", str(nbs)]) == 2   # refused up front
    assert main(["--profile", str(prof), "--stages", "config,nope", "--nbs-dir", str(nbs)]) == 2


def test_environment_yml_installs_torch_first_with_the_settings_pin():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    reqs = (ROOT / "settings.ini").read_text().split("requirements = ", 1)[1].split()
    assert pip[0] == next(r for r in reqs if r.startswith("torch==")) == "torch==2.13.0"
    assert pip[-1] == "-e .[dev]"
    assert "console_scripts = usermirror-paper=usermirror_nb.paper:main" in (ROOT / "settings.ini").read_text()


def test_the_paper_runs_export_cells_and_the_stage_not_the_demos(env):
    "paper_notebook: demo cells (neither exported nor after `parameters`) are dropped unless --demos; export cells run."
    prof, nbs, out = env
    params = nbformat.v4.new_code_cell('profile = "quick"\noverrides = ""'); params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("#| export\ndef stage_value(): return 7"),
        nbformat.v4.new_code_cell("raise RuntimeError('a demo ran')"),           # a demo: the paper must not run it
        params,
        nbformat.v4.new_code_cell("#| eval: false\n" + HEAD + "p = cfg.stage_dir('config') / 'x.json'\n"
                                  "p.write_text(str(stage_value()))\nrecord_stage(cfg, 'config', 'done', p, 0.0)")])
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    nbformat.write(nb, nbs / "00_config.ipynb")
    s = run_paper(prof, "", stages="config", nbs_dir=nbs)
    assert s["ran"] == ["config"] and (out / "config" / "x.json").read_text() == "7"
    ran = nbformat.read(out / "notebooks" / "00_config.ipynb", as_version=4)
    assert not any("a demo ran" in c.source for c in ran.cells)
    s = run_paper(prof, "", stages="config", nbs_dir=nbs, demos=True)
    assert s["failed"] == ["config"] and "RuntimeError: a demo ran" in s["stages"][0]["note"]
    assert main(["--profile", str(prof), "--stages", "config", "--nbs-dir", str(nbs), "--demos"]) == 1


def test_a_planted_key_never_reaches_the_results_or_the_log(env, monkeypatch):
    "A stage that prints the key, writes it into a results file and raises with it: every file and the streamed log hold `<secret $NAME>`."
    import io, logging
    prof, nbs, out = env
    key = "sk-planted-" + "9f8e7d6c5b4a" * 3
    monkeypatch.setenv("UM_PLANTED_KEY", key)
    p = yaml.safe_load(prof.read_text())
    p["models"] = {"teacher": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "served", "api_key_env": "UM_PLANTED_KEY"}}
    prof.write_text(yaml.safe_dump(p))
    make_nb(nbs, "00_config.ipynb", HEAD + "import os\nk = os.environ['UM_PLANTED_KEY']\nprint('server said: bad key', k)\n"
            "(cfg.results_dir / 'echo.jsonl').write_text('{\"request\": \"Bearer ' + k + '\"}')\n"
            "raise RuntimeError('401 for key ' + k)")
    stream = io.StringIO(); h = logging.StreamHandler(stream)
    log = logging.getLogger("papermill"); log.addHandler(h); monkeypatch.setattr(log, "level", logging.INFO)
    try: s = run_paper(str(prof), stages="config", nbs_dir=nbs)
    finally: log.removeHandler(h)
    assert s["stages"][0]["status"] == "failed" and "<secret $UM_PLANTED_KEY>" in s["stages"][0]["note"]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert {"echo.jsonl", "00_config.ipynb", "run_summary.json", "RUN_SUMMARY.md"} <= {f.name for f in files}
    for f in files: assert key.encode() not in f.read_bytes(), f
    assert "<secret $UM_PLANTED_KEY>" in (out / "echo.jsonl").read_text()
    assert key not in stream.getvalue() and "server said: bad key <secret $UM_PLANTED_KEY>" in stream.getvalue()


def test_ctrl_c_marks_the_stage_interrupted_and_the_summary_never_shows_the_old_run(env):
    "A finished run, then a rerun interrupted during its second stage: interrupted + not run, that stage's record gone."
    import _thread, signal, threading
    prof, nbs, out = env
    rec = lambda st: HEAD + f"record_stage(cfg, '{st}', 'done')"
    make_nb(nbs, "00_config.ipynb", rec("config"))
    make_nb(nbs, "01_assets.ipynb", rec("assets"))
    make_nb(nbs, "02_scenes.ipynb", rec("scenes"))
    assert run_paper(prof, stages="config,assets,scenes", nbs_dir=nbs)["ran"] == ["config", "assets", "scenes"]
    make_nb(nbs, "01_assets.ipynb", HEAD + "import time\n(cfg.results_dir / 'started').write_text('x')\ntime.sleep(60)\n" + rec("assets"))
    def ctrl_c():                      # Ctrl-C once the assets notebook is running; again if the first one was swallowed
        for _ in range(600):           # (a SIGINT landing inside the kernel client's event-loop plumbing can be lost)
            summary = out / "run_summary.json"
            if summary.exists() and '"interrupted"' in summary.read_text(): return
            if (out / "started").exists(): _thread.interrupt_main(); threading.Event().wait(3.0)
            else: threading.Event().wait(0.1)
    # Ctrl-C in a terminal reaches Python's default SIGINT handler; an earlier test in this process (a library that
    # installs its own handler) may have replaced it, and then interrupt_main() raises nothing: put the default back
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_paper(prof, stages="config,assets,scenes", nbs_dir=nbs)
    finally:
        signal.signal(signal.SIGINT, previous)
    s = json.loads((out / "run_summary.json").read_text())
    assert [(r["stage"], r["status"]) for r in s["stages"]] == [("config", "done"), ("assets", "interrupted"), ("scenes", "not run")]
    assert s["interrupted"] == "assets" and "interrupted: assets" in s["line"] and "not run: scenes" in s["line"]
    assert "| assets | 01_assets.ipynb | interrupted |" in (out / "RUN_SUMMARY.md").read_text()
    assert not (out / "stages" / "assets.json").exists() and not (out / "stages" / "scenes.json").exists()


def test_rerunning_a_stage_marks_the_later_records_stale(env):
    prof, nbs, out = env
    for st, name in (("config", "00_config.ipynb"), ("assets", "01_assets.ipynb"), ("scenes", "02_scenes.ipynb")):
        make_nb(nbs, name, HEAD + f"record_stage(cfg, '{st}', 'done')")
    run_paper(prof, stages="config,assets,scenes", nbs_dir=nbs)
    s = run_paper(prof, stages="assets", nbs_dir=nbs)
    assert s["ran"] == ["assets"] and s["stale"] == ["scenes"]
    r = json.loads((out / "stages" / "scenes.json").read_text())
    assert r["status"] == "stale" and "assets was rerun" in r["note"]
    assert json.loads((out / "stages" / "config.json").read_text())["status"] == "done"     # upstream records stay
