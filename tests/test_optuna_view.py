"""Optuna's view of a study and optuna-dashboard's are ppsearch's: the same trials, the same count,
the same front (a repeat never makes a second front point), readable parameters, and a study
listing that the configuration does not flood. The study is made by the real driver (trials
inline, bench/standin.py's body) with a sampler that repeats itself often."""
import io
import json
import sys
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard

from ppsearch import query
from ppsearch.cli import main
from ppsearch.config import load_study
from ppsearch.runners import InlineRunner
from ppsearch.search import Driver

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
from standin import standin_trial  # noqa: E402


def _dashboard(storage, path):
    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(storage))
    status = {}
    environ = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.setdefault("code", code)))
    assert status["code"].startswith("200"), body[:300]
    return json.loads(body)


def test_optuna_and_the_dashboard_see_the_study_ppsearch_sees(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    config = load_study("toy", [f"storage={storage}", f"checkpoint_dir={tmp_path / 'ck'}", "n_trials=9",
                                "sampler=random", "search_space.patch_shapes=[8x8,4x4,2x2]",
                                "search_space.boundary_step=0.25", "search_space.boundary_min=0.25",
                                "search_space.boundary_max=0.75", "trainer.steps=1", "warm_start.steps=0"])
    Driver(config, log=lambda line: None, runner=InlineRunner(standin_trial, 2)).run()
    study = optuna.load_study(study_name="toy", storage=storage)
    ours = query.trials(config)
    front = sorted(query.front(config).trial)
    assert (ours.state == "PRUNED").any()  # the small space made repeats
    # the same trials and the same count everywhere
    assert len(ours) == len(study.trials) and sorted(ours.trial) == [t.number for t in study.trials]
    assert sorted(t.number for t in study.best_trials) == front
    listing = _dashboard(storage, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in listing] == ["toy"]
    assert len(json.dumps(listing)) < 2000  # a short listing: the configuration lives elsewhere
    detail = _dashboard(storage, f"/api/studies/{listing[0]['study_id']}")
    assert len(detail["trials"]) == len(ours)
    assert sorted(t["number"] for t in detail["best_trials"]) == front
    # no repeat is a front point, and schedules on the front are distinct
    schedules = ours.set_index("trial").loc[front].schedule
    assert schedules.is_unique
    # parameters read as what they are: times as floats, shapes as text
    params = [p for t in study.trials for p in t.params.items()]
    assert all(isinstance(v, float) for k, v in params if k.startswith("boundary_"))
    assert all(v in ("8x8", "4x4", "2x2") for k, v in params if k.startswith("patch_"))
    main(["status", f"storage={storage}"])
    assert capsys.readouterr().out.splitlines()[0].endswith(f": {len(study.trials)} trials, "
                                                          f"{(ours.state == 'COMPLETE').sum()} COMPLETE, 0 FAIL, "
                                                          f"0 RUNNING, {(ours.state == 'PRUNED').sum()} PRUNED")
