"""Client tasks are listed in one place (``simulations.core.tasks``), not registered by import side
effects: a fresh process that imports only ``simulations.core.client_app`` sees every task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedagg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import json, sys
from simulations.core.client_app import BATCHED_TASKS, TASKS
print(json.dumps({"tasks": TASKS.names(), "batched": sorted(BATCHED_TASKS),
                  "docs": {n: TASKS.entry(n).doc for n in TASKS.names()}}))
"""


def test_importing_client_app_alone_lists_every_task() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    got = json.loads(out.stdout)
    assert got["tasks"] == ["fedins", "fisher", "train"]
    assert got["batched"] == ["fedins", "train"]
    assert all(got["docs"][n] for n in got["tasks"])  # every task says what it does


def test_register_tasks_fills_a_fresh_registry_and_refuses_a_second_registration() -> None:
    from fedagg.registry import Registry
    from simulations.core.tasks import fedins, merging, register_tasks, train

    tasks: Registry = Registry("client task")
    batched: dict = {}
    register_tasks(tasks, batched)
    assert {n: tasks.entry(n).factory for n in tasks.names()} == {
        "fedins": fedins.fedins_task, "fisher": merging.fisher_task, "train": train.train_task}
    assert batched == {"train": train.batched_train, "fedins": fedins.batched_fedins}
    with pytest.raises(ValueError, match="'train' is registered twice"):
        register_tasks(tasks, batched)
    with pytest.raises(ConfigError, match="task: .*nope.*fedins, fisher, train"):
        tasks.entry("nope", field="task")
