"""Is the SBL count network short of training scenes or of inputs? Its learning curve, and richer inputs.

On the front end of the preset's training scenes (`with_front_end`, read from or written to the
cache, `$RIS_HPO_CACHE`), the count decision is trained on the first N scenes and scored on the
last --held-out ones, for each N of --sizes, count_for_success alpha of --alphas and --seeds
seeds. Training is the count network's own k term (cross-entropy on K, plus the locate head's
BCE on whether the true-K stage localizes every source), --steps-per-scene x N / 64 steps of
AdamW at the preset's lr, batch 64 (at least 400 steps). Success counts the drop path's stage
answer: K_hat = K and every source of stage K inside the success box (the `located` label).
Against it, SBL's own count rule on the same path and a perfect count (the `located` share).

`--rich` also trains a plain MLP (two hidden layers, --width) on the whole front end beside the
path features (every stage's positions, power shares and noise), on the largest N.

`--prior` trains the same MLP on the path features plus the scene generator's own prior, which
SBL's likelihood does not know: two sources are never within `min_separation_deg` in both angles,
and their powers lie within `power_range_db` of each other. Per stage, the closest pair's
separation (the larger of its two angle gaps, over min_separation_deg, log) and the power spread
(dB, over 10). It first prints how often the true-K stage and the stage one above it break each.

    python -m bench sbl_count_curve [--preset medium] [--sizes 750 1500 3000] [--held-out 1000]
                                    [--alphas 0 0.5 1] [--seeds 3] [--rich] [--prior]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench import _harness as harness
from pipeline import build_model, load_split, replace
from pipeline._frontend import FrontEnd, rule_count, with_front_end
from pipeline._sbl_net import path_features


def _train(net_out, parameters, inputs, n_sources, located, n_train, lr, steps) -> None:
    """AdamW on the k term of the count network: CE on K + the locate head's BCE."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        batch = torch.randint(0, n_train, (64,))
        logits, locate = net_out(inputs[batch])
        k = n_sources[batch] - 1
        loss = F.cross_entropy(logits, k) + F.binary_cross_entropy_with_logits(
            locate.gather(1, k[:, None]).squeeze(1), located[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def prior_cues(front: FrontEnd, min_separation_deg: float) -> torch.Tensor:
    """(B, 2 K_max): per stage, log(closest pair's separation / min_separation_deg) (3 for one
    source) and the active powers' spread in dB / 10."""
    points, active, power = front.points.double(), front.active, front.power.double()
    k_max = front.k_max
    pair = active[..., :, None] & active[..., None, :] & ~torch.eye(k_max, dtype=torch.bool)
    gap = (points[..., :, None, :2] - points[..., None, :, :2]).abs().amax(-1)  # (B, K, K, K)
    closest = torch.where(pair, gap, math.inf).flatten(-2).amin(-1)  # (B, K) rad
    separation = torch.where(
        closest.isfinite(),
        torch.log(torch.rad2deg(closest).clamp_min(0.05) / min_separation_deg), 3.0)
    strongest = torch.where(active, power, 0.0).amax(-1)
    weakest = torch.where(active, power, math.inf).amin(-1)
    spread = 10.0 * torch.log10(strongest.clamp_min(1e-30) / weakest.clamp_min(1e-30))
    return torch.cat([separation, spread.clamp(0.0, 40.0) / 10.0], dim=1).float()


def _mlp_runs(inputs, k_true, located, n_train, held, args, lr, k_max, success) -> list:
    """Per seed, a plain two-layer MLP's success at each alpha of --alphas."""
    steps = max(400, int(args.steps_per_scene * n_train / 64))
    runs = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(inputs.shape[1], args.width), nn.GELU(),
                            nn.Linear(args.width, args.width), nn.GELU(),
                            nn.Linear(args.width, 2 * k_max))
        _train(lambda x, m=net: m(x).split(k_max, dim=-1), net.parameters(), inputs,
               k_true, located, n_train, lr, steps)
        with torch.no_grad():
            logits, locate = net(inputs[held]).split(k_max, dim=-1)
        runs.append([success((F.log_softmax(logits, -1) + a * F.logsigmoid(locate))
                             .argmax(-1) + 1) for a in args.alphas])
    return runs


def main(argv: list[str]) -> None:
    parser = harness.parser(__name__, __doc__)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--sizes", type=int, nargs="+", default=[750, 1500, 3000])
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps-per-scene", type=float, default=6.0)
    parser.add_argument("--rich", action="store_true")
    parser.add_argument("--prior", action="store_true")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    config, deployment = harness.cpu_system(args)
    if max(args.sizes) + args.held_out > config.n_train:
        parser.error(f"--sizes and --held-out need {max(args.sizes) + args.held_out} scenes, but "
                     f"{args.preset} has n_train {config.n_train}")
    scenes = with_front_end(load_split(config, deployment, "train", config.n_train), deployment,
                            config, "train")
    front = FrontEnd.unpack(scenes.frontend, config.max_sources)
    features, k_true, located = path_features(front), scenes.n_sources, scenes.located
    held = torch.arange(config.n_train - args.held_out, config.n_train)

    def success(k_hat: torch.Tensor) -> float:
        return float(((k_hat == k_true[held]) & (located[held] > 0.5)).float().mean())

    rule = rule_count(front)[held]
    base = {"rule: success": success(rule),
            "rule: k_accuracy": float((rule == k_true[held]).float().mean()),
            "perfect count: success": float(located[held].mean())}
    harness.note(f"held-out {args.held_out} scenes: SBL's rule {base['rule: success']:.3f}, "
                 f"a perfect count {base['perfect count: success']:.3f}")
    harness.emit({"preset": args.preset, "held_out": args.held_out, **base})
    for n_train in args.sizes:
        steps = max(400, int(args.steps_per_scene * n_train / 64))
        for alpha in args.alphas:
            runs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = build_model(replace(config, count_for_success=alpha), deployment)
                _train(lambda x, m=model: m.decide(x)[:2], model.parameters(), features,
                       k_true, located, n_train, config.lr, steps)
                model.eval()
                with torch.no_grad():
                    k_hat = model.decide(features[held])[2].argmax(-1) + 1
                runs.append((success(k_hat), float((k_hat == k_true[held]).float().mean())))
            harness.note(f"N {n_train}, alpha {alpha:g}: success "
                         + " ".join(f"{s:.3f}" for s, _ in runs) + ", K accuracy "
                         + " ".join(f"{a:.3f}" for _, a in runs))
            harness.emit({"inputs": "path features", "n_train": n_train, "alpha": alpha,
                          "steps": steps, "success": [s for s, _ in runs],
                          "k_accuracy": [a for _, a in runs]})
    n_train, k_max = max(args.sizes), config.max_sources
    inputs = {}
    if args.rich:
        shares = front.power / front.power.sum(-1, keepdim=True).clamp_min(1e-12)
        points = front.points.clone()
        points[..., 2] = points[..., 2] / 2.0  # 1/r in 1/m, to order one
        inputs["whole front end"] = torch.cat(
            [features, points.flatten(1), torch.log10(shares.clamp_min(1e-4)).flatten(1) / 2.0,
             torch.log10(front.noise.clamp_min(1e-12)) / 2.0], dim=1)
    if args.prior:
        cues = prior_cues(front, config.min_separation_deg)
        rows, stage = torch.arange(len(k_true)), k_true - 1
        above = stage < k_max - 1
        one_up = (stage + 1).clamp(max=k_max - 1)
        broken = {
            "true-K stage: closer than the minimum separation":
                float((cues[rows, stage] < 0).float().mean()),
            "true-K stage: powers spread beyond power_range_db":
                float((cues[rows, k_max + stage] > config.power_range_db / 10.0).float().mean()),
            "stage K+1 (scenes with K < K_max): closer than the minimum separation":
                float((cues[rows, one_up][above] < 0).float().mean()),
            "stage K+1 (scenes with K < K_max): powers spread beyond power_range_db":
                float((cues[rows, k_max + one_up][above] > config.power_range_db / 10.0)
                      .float().mean())}
        for name, share in broken.items():
            harness.note(f"{name}: {share:.3f} of the training split's scenes")
        harness.emit({"prior broken": broken})
        inputs["path features + prior"] = torch.cat([features, cues], dim=1)
    if not inputs:
        return
    for name, x in {"path features": features, **inputs}.items():
        runs = _mlp_runs(x, k_true, located, n_train, held, args, config.lr, k_max, success)
        harness.note(f"MLP on {name} ({x.shape[1]} inputs), N {n_train}: success by alpha "
                     + "; ".join(" ".join(f"{v:.3f}" for v in row) for row in runs))
        harness.emit({"inputs": name, "mlp": True, "n_inputs": x.shape[1],
                      "n_train": n_train, "alphas": args.alphas, "success": runs})
