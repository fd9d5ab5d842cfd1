"""Bugs look like bugs: only a ConfigError (ours) or Lightning's MisconfigurationException becomes the one-line
refusal; any other exception, wherever it is raised, stays a traceback with exit status 1."""
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env

INJECT = {  # a bug of our own (the kinds train.py once turned into refusals), raised by the function named
    "ValueError('injected bug')": "runtime.experiment:task_class",  # building the task
    "RuntimeError('injected bug')": "runtime.training:run_identity",  # planning the run
    "TypeError('injected bug')": "runtime.training:check_devices",  # checking the machine
    "ImportError('injected bug')": "runtime.training:build_trainer",  # building the trainer
}


@pytest.mark.parametrize("error", INJECT)
def test_an_injected_bug_is_a_traceback_not_a_refusal(tmp_path, error):
    module, name = INJECT[error].split(":")
    code = (f"import {module} as m; m.{name} = lambda *a: (_ for _ in ()).throw({error}); import sys, train; "
            f"sys.exit(train.main(['trainer=cpu', 'trainer.max_steps=1', 'run_dir={tmp_path / 'run'}']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean_env())
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback (most recent call last)" in done.stderr and "error: " not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"{error.split('(')[0]}: injected bug"
    assert not (tmp_path / "run").exists()
