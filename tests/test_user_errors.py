"""Every mistake a careless user makes is one line and a non-zero exit, never a traceback, and
no command ever shows a credential of the storage URL, whatever form it takes."""
import subprocess
import sys

import pytest


from test_query import run_cli
from test_store import CREDENTIAL_FORMS

UNREACHABLE = [url.replace("@db", "@127.0.0.1:1").replace("host=/run/pg", "host=127.0.0.1&port=1")
               for url in CREDENTIAL_FORMS if url.startswith("postgresql")]
COMMANDS = [["status"], ["front"], ["show", "0"], ["plot", "--out", "x.png"], ["export", "--trial", "0"],
            ["launch", "--cfg", "job"], ["launch"]]


def _ppsearch(*words, cwd=None):
    return subprocess.run([sys.executable, "-m", "ppsearch.cli", *words], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("url", UNREACHABLE)
def test_no_command_shows_a_credential(url, tmp_path, capsys, monkeypatch):
    """In this process (main() as the console script calls it): any exception but the one-line
    exit is a traceback the user would see, and fails the test."""
    monkeypatch.chdir(tmp_path)
    for words in COMMANDS:
        code, out, err = run_cli(capsys, *words, f"storage='{url}'", f"checkpoint_dir={tmp_path}")
        assert "s3cret" not in out + err, (words, (out + err)[-500:])
        if words != ["launch", "--cfg", "job"]:
            assert code == 2 and len(err.strip().splitlines()) == 1, (words, err)


def test_a_huge_schedule_text_is_not_echoed_in_full(tmp_path):
    schedule = ",".join(["4x4@0.5"] * 12500) + ",2x2"  # 100,000 characters
    done = _ppsearch("flops", "--model", "T/2", "--input-size", "16", "--schedule", schedule)
    assert done.returncode == 2 and len(done.stderr) < 1000 and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("words, message", [
    (["eval", "--schedule", "2x2", "--num-samples", "-5"], "eval.num_samples is -5"),
    (["launch", "search_space.boundary_step=0"], "search_space.boundary_step is 0.0"),
    (["launch", "n_trials=0"], "n_trials is 0"),
    (["launch", "trainer.steps=-1"], "trainer.steps is -1"),
    (["flops", "--model", "XL/3", "--schedule", "2x2"], "unknown model 'XL/3'"),
    (["flops", "--model", "DiT-XL/2", "--schedule", "8x8@0.5,2x2", "--steps", "1"], "cannot cover 2 stages"),
])
def test_mistakes_found_before_any_compute(words, message, tmp_path):
    done = _ppsearch(*words, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
