"""The store dies in the middle of a claim, at each step of it, while another node claims too:
the budget is still exact and nothing is left RUNNING once the nodes are done. The server is a
private throwaway cluster (the shared one on 5432 is never touched), killed as a crash would
(`pg_ctl -m immediate`), either staying down while the cut-off claim goes on (its undo cannot
reach the store) or coming straight back (the claim's writes land, but its lock is gone)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.trial import TrialState

from hpo._budget import CLAIM_STEPS, count_trials
from hpo._studies import StudySettings, create_or_load_study
from hpo.testing import environment
from storage import open_storage
from storage.testing import PrivateCluster

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

BUDGET = 40
DOWN_S = 1.0  # how long a "down" kill keeps the server away

# A node: claims through claim_trial with Reconnect, as the worker does, "trains" for a while and
# completes its trial. With a plan ("STEP:MODE,..."), before each claim after a completed trial it
# arms the next kill: when the claim reaches that step it says so on stdout and waits for the
# test to kill the server. At the end it prints the trials it completed.
_NODE = textwrap.dedent(
    """
    import sys, time, warnings
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState
    from hpo._budget import claim_trial
    from storage import Reconnect, open_storage, trial_id
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url, name, budget, train_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    plan = [tuple(kill.split(":")) for kill in sys.argv[5].split(",") if kill]
    retry = Reconnect(deadline_s=120)
    storage = open_storage(url, patience_s=60)
    study = retry(lambda: optuna.load_study(study_name=name, storage=storage), "loading")
    print("ready", flush=True)  # the test kills the server only once both nodes are here
    armed = [bool(plan)]

    def on_step(step):
        if armed[0] and plan and plan[0][0] == step:
            armed[0] = False
            print("kill", *plan.pop(0), flush=True)
            sys.stdin.readline()  # the server has been killed

    done, dropped = [], []
    while True:
        trial = retry(lambda: claim_trial(study, on_step=on_step), "claiming a trial")
        if trial is None:
            break
        time.sleep(train_s)
        try:
            retry(lambda: storage.set_trial_state_values(
                trial_id(trial), TrialState.COMPLETE, [float(trial.number)]), "completing")
        except UpdateFinishedTrialError:
            pass  # an attempt that committed before its connection died, or a voided claim
        # Read through the retry too: the killer may stop the server right now.
        state = retry(lambda: storage.get_trial(trial_id(trial)).state, "reading back")
        if state == TrialState.COMPLETE:
            done.append(trial.number)
        else:
            dropped.append(trial.number)
        armed[0] = True
    print("done", ",".join(map(str, done)), "dropped", ",".join(map(str, dropped)), flush=True)
    """
)


def _node(url: str, name: str, train_s: float, plan: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _NODE, url, name, str(BUDGET), str(train_s), plan],
        env=environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def test_a_store_killed_at_each_step_of_a_claim_costs_no_budget_and_leaves_nothing_running():
    cluster = PrivateCluster()
    nodes: list[subprocess.Popen[str]] = []
    try:
        name = "claims"
        settings = StudySettings(preset="smoke", objective="composite", direction="minimize",
                                 epochs=2)  # fmt: skip
        setup = open_storage(cluster.url, heartbeat=False)
        create_or_load_study(setup, name, settings, budget=BUDGET)
        setup.engine.dispose()
        plan = [(step, mode) for mode in ("down", "back") for step in CLAIM_STEPS]
        killer = _node(cluster.url, name, 0.02, ",".join(f"{s}:{m}" for s, m in plan))
        other = _node(cluster.url, name, 1.0, "")  # claims between the killer's cut-off claims
        nodes = [killer, other]
        # Opening the store is not what this test is about: a node still starting (slow on a
        # loaded machine) when the first kill comes would fail there, before any claim.
        for node in nodes:
            assert node.stdout.readline() == "ready\n"
        kills = []
        while (line := killer.stdout.readline()).startswith("kill "):
            _, step, mode = line.split()
            kills.append((step, mode))
            cluster.kill()
            if mode == "back":
                cluster.start()
            killer.stdin.write("go\n")
            killer.stdin.flush()
            if mode == "down":
                time.sleep(DOWN_S)  # the killer's claim goes on, and fails, meanwhile
                cluster.start()
        outputs = {"killer": (line, *killer.communicate(timeout=300))}
        outputs["other"] = other.communicate(timeout=300)
        for role, node in zip(("killer", "other"), nodes, strict=True):
            assert node.returncode == 0, f"{role}: {outputs[role][-1][-3000:]}"
        storage = optuna.storages.RDBStorage(cluster.url)
        trials = storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
        storage.engine.dispose()
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
        cluster.close()
    assert kills == plan  # the store died at every step, both ways
    done: list[int] = []
    for out in (outputs["killer"][0], outputs["other"][0]):
        fields = out.split()
        assert fields[0] == "done", out
        done += _numbers(fields[1])
    counts = count_trials(trials)
    # Exactly the budget, every finished trial completed by the node that claimed it, nothing
    # RUNNING, WAITING or half-claimed; the cut-off claims are void and counted nowhere.
    assert (counts.finished, counts.running, counts.waiting) == (BUDGET, 0, 0), counts
    complete = sorted(t.number for t in trials if t.state == TrialState.COMPLETE)
    assert sorted(done) == complete and len(complete) == BUDGET
    assert all(t.state == TrialState.COMPLETE or "void_reason" in t.user_attrs for t in trials)
    assert counts.void >= 3  # the claims cut off after creating their trial (asked, heartbeat,
    # checked) while the store stayed down could not undo themselves
