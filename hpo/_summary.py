"""What `hpo status` and `hpo best` show: a study's state as one JSON-ready dict, and as text."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from hpo._attrs import (
    ATTR_BUDGET,
    ATTR_CLAIMED_UNIX,
    ATTR_CONFIG,
    ATTR_DEVICE,
    ATTR_HOST,
    ATTR_METRICS,
    ATTR_RESUMED_FROM,
    ATTR_RETRY_CHAIN,
    ATTR_RETRY_COUNT,
    ATTR_RETRY_OF,
    ATTR_WORKER_PID,
    failures,
)
from hpo._budget import count_trials
from hpo._studies import best_trial, direction_of, study_settings


def status_payload(study: optuna.Study, redacted_url: str) -> dict[str, Any]:
    """The study's counts against its budget, its best trial, its failures, what runs on each
    host, and its retries."""
    trials = study.get_trials(deepcopy=False)
    settings = study_settings(study)
    best = best_trial(trials, direction_of(study))
    # A trial whose claim is still being written (created, not yet tagged with its host and
    # worker: a moment, or a claim cut off by a lost store) runs nowhere yet.
    running = [running_summary(t) for t in trials
               if t.state == TrialState.RUNNING and ATTR_CLAIMED_UNIX in t.user_attrs]
    claiming = [t.number for t in trials
                if t.state == TrialState.RUNNING and ATTR_CLAIMED_UNIX not in t.user_attrs]
    hosts: dict[str, int] = {}
    for entry in running:
        hosts[entry["host"] or "?"] = hosts.get(entry["host"] or "?", 0) + 1
    return {
        "study": study.study_name,
        "storage": redacted_url,
        "settings": settings.to_attrs() if settings else None,
        "budget": study.user_attrs.get(ATTR_BUDGET),
        "counts": count_trials(trials).to_dict(),
        "best": trial_summary(best) if best else None,
        "failures": failures(trials),
        "running": running,
        "claiming": claiming,
        "hosts": hosts,
        "retries": [retry_summary(t) for t in trials if ATTR_RETRY_OF in t.user_attrs],
    }  # fmt: skip


def status_lines(payload: dict[str, Any], where: str) -> list[str]:
    """`status_payload` as the text `hpo status` prints; `where` describes the store."""
    settings, counts, best = payload["settings"], payload["counts"], payload["best"]
    lines = [f"study {payload['study']!r} in {where}"]
    if settings:
        lines.append(
            f"  preset {settings['preset']}, objective {settings['objective']} "
            f"({settings['direction']}), {settings['epochs']} epochs per trial"
        )
    of_budget = f"/{payload['budget']}" if payload["budget"] else ""
    lines.append(
        f"  {counts['finished']}{of_budget} finished: {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['failed']} failed; {counts['running']} running, "
        f"{counts['waiting']} waiting, {counts['requeued']} re-queued"
    )
    if best:
        lines.append(f"  best: trial {best['number']}, value {best['value']:.6g}")
        lines.append(f"  params: {format_params(best['params'])}")
    else:
        lines.append("  best: no complete trial yet")
    epochs = f"/{settings['epochs']}" if settings else ""
    for host in sorted(payload["hosts"]):
        lines.append(f"  running on {host}:")
        for entry in (e for e in payload["running"] if (e["host"] or "?") == host):
            retry = (
                f", retry {entry['retry_count']} resumed after epoch {entry['resumed_from_epoch']}"
                if entry["retry_count"]
                else ""
            )
            lines.append(f"    trial {entry['number']}: worker pid {entry['pid']}, epoch "
                         f"{entry['epoch']}{epochs}{retry}")  # fmt: skip
    if payload["claiming"]:
        lines.append(f"  being claimed: trial(s) {', '.join(map(str, payload['claiming']))}")
    for entry in payload["retries"][-5:]:
        lines.append(
            f"  trial {entry['number']} retries trial {entry['retry_of']} (retry "
            f"{entry['retry_count']}), resumed after epoch {entry['resumed_from_epoch']}: "
            f"{entry['state']}"
        )
    for failure in payload["failures"][-5:]:
        again = " (re-queued)" if failure["requeued"] else ""
        lines.append(f"  failed trial {failure['number']}{again}: {failure['reason']}")
    return lines


def best_payload(study: optuna.Study) -> dict[str, Any] | None:
    """What `hpo best` shows of the study's best trial (None: no complete trial yet)."""
    trial = best_trial(study.get_trials(deepcopy=False), direction_of(study))
    if trial is None:
        return None
    settings = study_settings(study)
    return {
        **trial_summary(trial),
        "objective": settings.objective if settings else None,
        "metrics": trial.user_attrs.get(ATTR_METRICS),
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "config": trial.user_attrs.get(ATTR_CONFIG),
        "study": study.study_name,
    }


def running_summary(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "host": attrs.get(ATTR_HOST),
        "pid": attrs.get(ATTR_WORKER_PID),
        "epoch": max(trial.intermediate_values, default=0),  # last epoch reported
        "retry_count": attrs.get(ATTR_RETRY_COUNT, 0),
        "resumed_from_epoch": attrs.get(ATTR_RESUMED_FROM),
        "device": attrs.get(ATTR_DEVICE),
    }


def retry_summary(trial: Any) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "retry_of": attrs.get(ATTR_RETRY_OF),
        "retry_count": attrs.get(ATTR_RETRY_COUNT, len(attrs.get(ATTR_RETRY_CHAIN, []))),
        "resumed_from_epoch": attrs.get(ATTR_RESUMED_FROM),
        "state": trial.state.name,
    }


def trial_summary(trial: Any) -> dict[str, Any]:
    return {"value": trial.value, "number": trial.number, "params": trial.params}


def fmt(value: float) -> str:
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={fmt(value)}" for name, value in params.items()) or "(none)"
