"""The benchmarks' --quick modes, as CI runs them: each script works and prints its result line
last. Their timings are not checked (bench/ measures, tests do not)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "bench"


def _quick(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_training_benchmark():
    assert _quick("training.py").startswith("result: batch 4 4x4@0.5,2x2: packed speed-up ")


def test_orchestration_benchmark(postgres_url):  # the fixture skips where no PostgreSQL server can start
    last = _quick("orchestration.py")
    assert last.startswith("result: scaling efficiency ") and "FAILED" not in last, last
    assert re.search(r"full disk: (skipped|(rode it out|stopped \d+ time\(s\), relaunched), \d+ checks passed); "
                     r"soak: all \d+ checks passed$", last), last


def test_sampling_benchmark():
    assert _quick("sampling.py").startswith("result: 4x4@0.5,2x2: speed-up ")


def test_embedded_budgets_benchmark():
    assert _quick("embedded.py").startswith("result: eval ")


def test_search_efficiency_benchmark():
    assert _quick("search_efficiency.py").startswith("result: study default tpe reaches ")


def test_proxy_fidelity_benchmark():
    assert _quick("proxy_fidelity.py").startswith("result: Kendall tau ")


@pytest.mark.parametrize("proxy", ["warm", "rung0"])
def test_proxy_fidelity_of_the_cheaper_proxies(proxy):
    assert _quick("proxy_fidelity.py", "--proxy", proxy).startswith("result: Kendall tau ")


def test_fidelity_benchmark():
    assert _quick("fidelity.py").startswith("result: ")


def test_positions_benchmark():
    assert _quick("positions.py").startswith("result: lowest PPF-2 + PPF-3 FID after fine-tuning: ")


def test_trial_cost_benchmark():
    assert _quick("trial_cost.py").startswith("result: trial ")
