"""The benchmark suite: `python -m bench NAME [OPTIONS]`; each benchmark registered with a target.

Benchmarks live in subpackages by kind: `pipeline` (the model's arithmetic: generation, training
steps, localizing, SBL), `service` (what `hpo run` and its store cost, and how it holds up),
`studies` (what a study finds: pruning, early epochs), and `gpu/` (the shell scripts run on a lent
GPU machine). Each module has `main(argv)`; `bench/_harness.py` holds what they share. The
registry below is the one list of them, so `python -m bench` can show every target without
importing torch or Optuna.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str  # `python -m bench NAME`, the module's file name
    kind: str  # its subpackage: pipeline, service or studies
    target: str  # what it is meant to show, and the figure that must hold (BENCHMARKS.md)

    @property
    def module(self) -> str:
        return f"bench.{self.kind}.{self.name}"


_ALL = (
    Benchmark("generation", "pipeline",
              ">= 5,600 `full` scenes/s on the 2-core CPU (20x the original's 280/s); 10,000 "
              "scenes in < 1 s on a GPU (issue 7)"),
    Benchmark("train_throughput", "pipeline",
              "the real training step on `full` at >= 355 scenes/s on the 2-core CPU (5x the "
              "original's 71/s, issue 7); with --compile, whether torch.compile of the trunk "
              "pays"),
    Benchmark("trial_profile", "pipeline",
              "where one trial's time goes (data, forward, loss, backward, optimizer, "
              "validation, storage); the store's share stays about 1 % of a `quick` trial"),
    Benchmark("localize", "pipeline",
              "one `full` scene localized (MDL + MUSIC + refinement) in <= 85 ms on one thread "
              "(100x the original's 8.5 s), as accurate as the original's grid (issue 7)"),
    Benchmark("sbl", "pipeline",
              "coded SBL's seconds per `medium` scene on one thread, batched and one at a "
              "time (issue 16: 0.10 s with its own count, batch of 64)"),
    Benchmark("sbl_count", "pipeline",
              "the SBL count network's inference (front end, network, refinement, MUSIC on "
              "R_blend) per `medium` scene on one thread: <= 150 ms (issue 16)"),
    Benchmark("sbl_check", "pipeline",
              "coded SBL given the true K: success >= 0.85 on `medium` test scenes at >= 10 dB, "
              "over >= 500 scenes (issue 16)"),
    Benchmark("sbl_ceiling", "pipeline",
              "given the true K, how many scenes coded SBL loses in its search (the truth's "
              "local optimum is likelier) and how many in the likelihood itself: what any "
              "search over SBL's likelihood can still add (issue 16); no figure to hold"),
    Benchmark("range_choice", "pipeline",
              "each range chosen for the success box (the learned row's last step) against "
              "the likelihood's peak, on SBL's answers: scenes won and lost on training or "
              "validation scenes, and the step's cost per scene (issue 16)"),
    Benchmark("sbl_count_curve", "pipeline",
              "whether the SBL count network is short of training scenes or of inputs: its "
              "held-out success against N, and with the whole front end as input (issue 16); "
              "no figure to hold"),
    Benchmark("sbl_tune", "pipeline",
              "coded SBL's grid, iterations and count rule chosen on validation scenes, never "
              "test scenes (issue 16); a sweep, no figure to hold"),
    Benchmark("overhead", "service",
              "the service's own share (hpo's processes + PostgreSQL) of the cores <= 2 % with "
              "8 workers on PostgreSQL (issue 7; met with `medium` trials)"),
    Benchmark("memory", "service",
              "a worker's RSS after 49 finished trials within 10 % of its RSS after 5 "
              "(issue 7)"),
    Benchmark("reliability", "service",
              "0 trials lost and 0 budget overshoot when a worker or a node is killed (-9) or "
              "PostgreSQL restarts mid-trial; killed trials resume from their checkpoint "
              "(issue 4)"),
    Benchmark("store_traffic", "service",
              "what one trial costs the study store (statements, commits, worker and "
              "PostgreSQL CPU, by phase), fresh and late in a study: the source of overhead's "
              "per-trial cost"),
    Benchmark("load", "service",
              "N nodes x W workers on one PostgreSQL study: every node exits 0, the budget is "
              "exact, 0 trials failed by the service, peak connections within 3 x (W + 1) x N "
              "(issue 18)"),
    Benchmark("pruning", "studies",
              ">= 3x fewer epochs than --pruner none for an equal best objective, the best "
              "also scored on held-out test scenes (issue 7; not met on `quick`)"),
    Benchmark("replay_pruning", "studies",
              "whether a learning-curve pruning rule, replayed offline over a --pruner none "
              "study, reaches 3x fewer epochs at that study's best before a real run is spent "
              "on it"),
    Benchmark("early_epochs", "studies",
              "how well epochs 1-3 rank random configs by their final composite (Spearman): "
              "the most any pruner can go on"),
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _ALL}

__all__ = ["BENCHMARKS", "Benchmark"]
