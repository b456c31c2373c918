"""The SBL count network (config.model = "sbl_count"): physics proposes, the network decides.

The front end (`pipeline._frontend`) gives each scene coded SBL's drop path: for k = 1..K_max,
a complete answer with k sources (positions, powers) and the weakest source's likelihood gain and
power-to-noise ratio at each stage. SBL's own count thresholds those gains with one hand-tuned
rule; this network reads the whole path (gains, their margins over that rule, the ratios, the
noise estimates and the powers) and gives K logits, and a second head the probability q_k that
the k-source answer localizes every source when K = k (trained on that label). K_hat maximises
log P(K = k) + alpha log q_k (alpha = config.count_for_success): with alpha 0 the most probable
count, with alpha 1 the most probable success, which declines to call a crowded low-SNR scene
crowded when its sources would be lost anyway and a single source would not.

The covariance follows the count, so count and set agree by construction:
- at inference, SBL's K_hat strongest peaks are refined again with exactly K_hat sources active
  (as SBL's own row does after its count), and R_pred = sum_k p_k a(p_k) a(p_k)^H at trace N;
- in training, R_pred = sum_k P(K = k) R_k, R_k the stage-k answer's covariance at trace N, a
  mixture that is Hermitian PSD with trace N and carries the covariance loss's gradient to the
  K logits; in eval mode with a cached front end (validation), the stage K_hat answer.
R_blend = (1 - beta) R_pred + beta R_samp (Fix 2), and MUSIC on it with K_hat gives back the
positions R_pred was built from (tests/pipeline_tests/test_sbl_net.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from pipeline._config import ExperimentConfig
from pipeline._frontend import FrontEnd, front_end, refined_sources
from pipeline._metrics import Localization
from pipeline._model import ModelOutput
from pipeline._physics import Deployment
from pipeline._sbl import SblSettings

_TINY = 1e-12


def path_features(front: FrontEnd) -> torch.Tensor:
    """(B, 5 K_max) float32 features of the drop path, each of order one."""
    settings = SblSettings()
    gain, ratio = front.gain.float(), front.ratio.float()
    rule = settings.count_threshold + settings.count_slope * ratio
    power = front.power[:, -1].float()  # the K_max-source stage, strongest first by SBL order
    share = power / power.sum(-1, keepdim=True).clamp_min(_TINY)
    share = share.sort(dim=-1, descending=True).values
    return torch.cat([
        torch.asinh(gain / 4.0) / 2.0,  # the weakest gain per stage, log-like beyond ~4 nats
        torch.asinh((gain - rule) / 4.0) / 2.0,  # its margin over SBL's count rule
        ratio,
        torch.log10(front.noise.float().clamp_min(_TINY)) / 2.0,
        torch.log10(share.clamp_min(1e-4)) / 2.0,
    ], dim=1)


class SblCountNet(nn.Module):
    """Front end (no weights) -> MLP on the path's features -> K logits; see the module docstring."""

    def __init__(self, config: ExperimentConfig, deployment: Deployment) -> None:
        super().__init__()
        self.config = config
        self.deployment = deployment
        k_max = config.max_sources
        layers: list[nn.Module] = []
        width_in = 5 * k_max
        for _ in range(config.model_depth):
            layers += [nn.Linear(width_in, config.model_width), nn.GELU(),
                       nn.Dropout(config.dropout)]
            width_in = config.model_width
        self.trunk = nn.Sequential(*layers)
        self.count = nn.Linear(width_in, k_max)  # K logits
        self.locate = nn.Linear(width_in, k_max)  # P(the k-source answer localizes | K = k)

    def decide(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """K logits, locate logits and the decision scores log P(K = k) + alpha log q_k, alpha =
        config.count_for_success: 0 picks the most probable K, 1 the most probable success."""
        hidden = self.trunk(features)
        logits, locate = self.count(hidden), self.locate(hidden)
        score = (F.log_softmax(logits.float(), -1)
                 + self.config.count_for_success * F.logsigmoid(locate.float()))
        return logits, locate, score

    def _factor(self, points: torch.Tensor, power: torch.Tensor, active: torch.Tensor
                ) -> torch.Tensor:
        """a(p_k) sqrt(w_k) with w = the active powers' shares: (..., N, K) complex64 whose
        F F^H has trace N."""
        weight = torch.where(active, power.clamp_min(0.0), 0.0)
        weight = weight / weight.sum(-1, keepdim=True).clamp_min(_TINY)
        steering = self.deployment.steering(points[..., 0], points[..., 1],
                                            1.0 / points[..., 2].clamp_min(1e-6))
        return (steering * weight.sqrt()[..., None].to(steering.dtype)).transpose(-2, -1)

    def forward(self, measurements: torch.Tensor, fields: torch.Tensor,
                frontend: torch.Tensor | None = None) -> ModelOutput:
        """measurements (B, L, M); fields unused (R_samp is formed by the loss); frontend: the
        packed front end of these scenes (`cached_front_end`), or None to compute it here."""
        k_max = self.config.max_sources
        powers = None
        if frontend is None:
            front, powers = front_end(measurements, self.deployment, self.config,
                                      keep_powers=True)
        else:
            front = FrontEnd.unpack(frontend.to(measurements.device), k_max)
        if not self.training:
            return self.answer(measurements, front, powers)
        logits, locate, score = self.decide(path_features(front))
        # sum_k P(k) R_k: column j of stage k scaled by sqrt(P(k)), smoothly (no sqrt of 0)
        root = torch.exp(0.5 * F.log_softmax(logits.float(), dim=-1))  # (B, K)
        stages = self._factor(front.points, front.power, front.active)  # (B, K, N, K)
        factor = (stages * root[:, :, None, None]).permute(0, 2, 1, 3).flatten(2)
        output = self._output(factor, front.points[:, -1], front.active[:, -1], logits)
        return replace(output, locate_logits=locate, k_score=score)

    def answer(self, measurements: torch.Tensor, front: FrontEnd, powers: list | None
               ) -> ModelOutput:
        """The eval-mode output from the scenes' front end: K_hat, then, with SBL's powers
        (`front_end(..., keep_powers=True)`), SBL's K_hat peaks refined again with K_hat active
        and, with config.range_for_success, each range chosen for the success box
        (`pipeline._range_decision`); without them (a cached front end), the path's stage
        K_hat."""
        logits, locate, score = self.decide(path_features(front))
        k_hat = score.argmax(-1) + 1
        if powers is not None:
            points, power, active = refined_sources(
                measurements, k_hat, powers, self.deployment, self.config,
                for_success=self.config.range_for_success)
        else:
            points, power, active = front.stage(k_hat)
        return replace(self.output(points, power, active, logits), locate_logits=locate,
                       k_score=score)

    def output(self, points: torch.Tensor, power: torch.Tensor, active: torch.Tensor,
               logits: torch.Tensor) -> ModelOutput:
        """The answer with these sources (points (B, K, 3), power and active (B, K)): R_pred's
        factor built from exactly them, and their positions, active first, strongest first."""
        order = torch.where(active, power, -1.0).argsort(dim=-1, descending=True)
        points = points.gather(1, order[..., None].expand_as(points))
        power, active = power.gather(1, order), active.gather(1, order)
        return self._output(self._factor(points, power, active), points, active, logits)

    def localization(self, output: ModelOutput) -> Localization:
        """The positions of an `output` as a Localization (MUSIC's seeds, the tests' check)."""
        mask = output.weight > 0
        return Localization(output.azimuth_rad, output.elevation_rad, output.range_m, mask,
                            mask.float())

    @staticmethod
    def _output(factor: torch.Tensor, points: torch.Tensor, active: torch.Tensor,
                logits: torch.Tensor) -> ModelOutput:
        zero = torch.zeros((), device=points.device)
        return ModelOutput(
            factor=factor, k_logits=logits,
            azimuth_rad=torch.where(active, points[..., 0], zero),
            elevation_rad=torch.where(active, points[..., 1], zero),
            range_m=torch.where(active, 1.0 / points[..., 2].clamp_min(1e-6), zero),
            weight=active.float(),
        )
