"""The attention-guided seed scorer.

Definition (what `score_from_captures` computes). During the first `k` denoising steps the
capture hook records, on the chosen layers, ``group_mass[b, i, j]``: the attention mass that
queries of token group i put on keys of group j, averaged over the queries of group i and over
heads (rows sum to 1; groups 0 text, 1 A, 2 A', 3 B, 4 B'). A seed's score is

    score = mean over captured (step, layer) of  Σ_j  w_j · group_mass[B', j]

with weights ``w`` over key groups. The default, ``"context"``, is w = (0, 1, 1, 1, 0): the
fraction of the B' panel's attention routed to the three context panels (A, A', B) rather than to
itself or the text. The rationale: a seed whose B' tokens draw on the exemplar pair and the query
is following the in-context example; one that attends mostly to itself is hallucinating from
its own noise. Other presets: ``"exemplar"`` (A and A' only, the demonstration of the relation),
``"query"`` (B only), and ``"self"`` (negative weight on B'→B', preferring less self-attention).
Higher is better. Which layers and steps are captured is part of `ScorerConfig`.

``"focus"`` = (0, -1, -1, -1, 0) is the opposite of ``"context"``: it prefers seeds whose B'
tokens, early on, attend *less* to the context panels and more to their own panel. Measured on
the bundled pico-tiny (README, "Seed selection"): the context score is anti-correlated with
quality within episodes (Spearman -0.56 on mask families, -0.26 on image families, train split),
and the focus score, chosen on the train split, beats a random seed on the held-out families
(+0.20 dB PSNR [95% CI +0.08, +0.32] on image families; +0.013 IoU [-0.016, +0.041] on masks),
where the context score loses (-0.15 dB). pico-tiny's pico.json therefore uses "focus"; the
library default stays "context" until it is measured at FLUX scale.

``signal="consensus"`` scores seeds by agreement instead of attention: after the scored steps,
each seed's current clean estimate of the B' panel, x̂0 = x_t − t·v, is compared with the mean
estimate of all the query's seeds, and the seed closest to it wins (score = −mean squared
distance). It needs no hooks (so it also works where attention cannot be captured) and prefers
the candidate nearest the model's consensus answer, which is the one a pixel metric rewards
when seeds disagree on details; with one seed it is constant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pico_jax.grid import GROUP_NAMES

BPRIME = GROUP_NAMES.index("B_out")
SIGNALS = ("attention", "consensus")

PRESETS: dict[str, tuple[float, ...]] = {
    "context": (0.0, 1.0, 1.0, 1.0, 0.0),
    "exemplar": (0.0, 1.0, 1.0, 0.0, 0.0),
    "query": (0.0, 0.0, 0.0, 1.0, 0.0),
    "self": (0.0, 0.0, 0.0, 0.0, -1.0),
    "focus": (0.0, -1.0, -1.0, -1.0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """Which attention the scorer reads and how it weighs it.

    layers: attention layers captured (double blocks first, then single; negative counts from
      the end); None = every layer.
    steps: with early selection, the number k of early denoising steps every seed runs and that
      are scored before the choice. Selection "full" scores every step of the full run instead
      (the full-run score), so the two modes may choose different seeds.
    weights: a preset name from PRESETS or a tuple of 5 per-group weights.
    signal: "attention" (the weighted attention mass above) or "consensus" (agreement of the
      seeds' clean estimates at the last scored step; `layers` and `weights` are then unused).
    """

    layers: tuple[int, ...] | None = None
    steps: int = 2
    weights: str | tuple[float, ...] = "context"
    signal: str = "attention"

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"scorer signal must be one of {SIGNALS} (got {self.signal!r})")

    def weight_vector(self) -> np.ndarray:
        w = PRESETS.get(self.weights) if isinstance(self.weights, str) else self.weights
        if w is None:
            raise ValueError(f"unknown scorer weights {self.weights!r}; presets: {sorted(PRESETS)}")
        if len(w) != len(GROUP_NAMES):
            raise ValueError(f"scorer weights need {len(GROUP_NAMES)} entries ({GROUP_NAMES}), got {len(w)}")
        return np.asarray(w, np.float32)

    def layer_list(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(range(num_layers))
        bad = [l for l in self.layers if not -num_layers <= l < num_layers]
        if bad:  # `l % num_layers` alone would silently wrap e.g. layer 60 of 57 onto layer 3
            raise ValueError(f"scorer layers {bad} out of range for a model with {num_layers} attention layers")
        return tuple(l % num_layers for l in self.layers)


def score_from_group_mass(group_mass: jax.Array, captured: jax.Array, weights) -> jax.Array:
    """group_mass (..., L, B, G, G) stacked over steps/layers, captured (..., L) bool → (B,) scores.

    Averages the weighted B' row over every captured (step, layer); leading axes are steps."""
    row = group_mass[..., BPRIME, :]  # (..., L, B, G)
    per = jnp.einsum("...lbg,g->...lb", row, jnp.asarray(weights, jnp.float32))
    w = captured.astype(jnp.float32)[..., None]  # (..., L, 1)
    total = jnp.sum(per * w, axis=tuple(range(per.ndim - 1)))
    return total / jnp.maximum(jnp.sum(w), 1.0)


def consensus_scores(x0_hat: jax.Array) -> jax.Array:
    """x0_hat (S, B, n, C): each seed's clean estimate of the B' tokens → (S, B) scores, the
    negative mean squared distance to the mean estimate over the S seeds (higher is better)."""
    x = x0_hat.astype(jnp.float32)
    return -jnp.mean(jnp.square(x - x.mean(0, keepdims=True)), axis=(2, 3))


def choose(scores: jax.Array, m: int) -> jax.Array:
    """Indices (m, B) of the m best seeds per query, best first; scores (S, B)."""
    return jnp.argsort(-scores, axis=0)[:m]


def scorer_from_name(base: ScorerConfig, name: str) -> ScorerConfig:
    """`base` scoring with `name`: 'consensus', or an attention preset of PRESETS."""
    if name == "consensus":
        return dataclasses.replace(base, signal="consensus")
    if name not in PRESETS:
        raise ValueError(f"unknown scorer {name!r}; choose consensus or an attention preset ({', '.join(sorted(PRESETS))})")
    return dataclasses.replace(base, signal="attention", weights=name)
