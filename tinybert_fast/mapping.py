"""Layer mappings: which teacher layers each student layer learns from.

M student layers, N teacher layers.  TinyBERT's uniform mapping g(m) = k*m with k = N/M pairs
(0-based indices throughout this module):

    attention: student layer i (0 <= i < M)  <->  teacher layer i*k + k - 1
    hidden:    student state j (0 <= j <= M) <->  teacher state j*k   (state 0 = embeddings)

TinyBERT4 <- BERT-base: attention teacher layers 2, 5, 8, 11 (3, 6, 9, 12 counted from 1);
hidden teacher states 0, 3, 6, 9, 12.

Strategies (`layer_map(strategy, ...)`):
    uniform   g(m) = k*m (TinyBERT; N % M == 0)
    top       g(m) = m + N - M  (the last M teacher layers)
    bottom    g(m) = m          (the first M teacher layers)
    last      alias of top
    mean      student layer m matches the average of its group of k teacher layers
              (attention: scores of layers (m-1)k+1..mk averaged; hidden: those layers' outputs)
    random    M distinct teacher layers drawn with `seed`, kept in order
    list      an explicit list of M teacher layers g(1..M), counted from 1 as in the paper
The embedding state always maps to the teacher's embedding state.
"""

from __future__ import annotations

import dataclasses
import random

STRATEGIES = ("uniform", "top", "last", "bottom", "mean", "random", "list")


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """attention[i]: teacher layers (0-based) whose scores student layer i matches (averaged when
    more than one).  hidden[j]: teacher hidden-state indices (0 = embeddings) student state j
    matches (averaged when more than one)."""
    attention: tuple[tuple[int, ...], ...]
    hidden: tuple[tuple[int, ...], ...]

    @property
    def teacher_attention_layers(self) -> list[int]:
        """Every teacher layer whose scores are needed, sorted."""
        return sorted({t for group in self.attention for t in group})

    @property
    def teacher_hidden_states(self) -> list[int]:
        """Every teacher hidden-state index needed, sorted."""
        return sorted({t for group in self.hidden for t in group})


def _groups_from_layers(layers_1based: list[int]) -> LayerMap:
    """Single-layer groups from g(1..M) (1-based teacher layers)."""
    return LayerMap(attention=tuple((g - 1,) for g in layers_1based),
                    hidden=((0,),) + tuple((g,) for g in layers_1based))


def layer_map(strategy: str, n_student: int, n_teacher: int, *, seed: int = 0,
              layers: list[int] | None = None) -> LayerMap:
    """Build the mapping of M = n_student onto N = n_teacher layers (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"mapping strategy must be one of {STRATEGIES}; got {strategy!r}")
    M, N = int(n_student), int(n_teacher)
    if M < 1 or N < 1:
        raise ValueError(f"layer counts must be >= 1; got student {M}, teacher {N}")
    if M > N:
        raise ValueError(f"the student has more layers ({M}) than the teacher ({N}); a mapping "
                         f"needs n_student <= n_teacher")
    if strategy == "list":
        if layers is None or len(layers) != M:
            raise ValueError(f"mapping 'list' needs one teacher layer (1..{N}) per student layer: "
                             f"{M} values; got {layers}")
        bad = [g for g in layers if not 1 <= int(g) <= N]
        if bad:
            raise ValueError(f"mapping layers must be teacher layers 1..{N} (counted from 1); "
                             f"got {bad}")
        return _groups_from_layers([int(g) for g in layers])
    if layers is not None:
        raise ValueError(f"layers= is only used with mapping 'list'; got strategy {strategy!r}")
    if strategy in ("uniform", "mean"):
        if N % M:
            raise ValueError(f"mapping {strategy!r} needs the teacher's layer count ({N}) to be a "
                             f"multiple of the student's ({M}); use 'list', 'top' or 'bottom'")
        k = N // M
        if strategy == "uniform":
            return _groups_from_layers([k * m for m in range(1, M + 1)])
        return LayerMap(
            attention=tuple(tuple(range(i * k, i * k + k)) for i in range(M)),
            hidden=((0,),) + tuple(tuple(range((m - 1) * k + 1, m * k + 1))
                                   for m in range(1, M + 1)))
    if strategy in ("top", "last"):
        return _groups_from_layers([m + N - M for m in range(1, M + 1)])
    if strategy == "bottom":
        return _groups_from_layers(list(range(1, M + 1)))
    chosen = sorted(random.Random(seed).sample(range(1, N + 1), M))
    return _groups_from_layers(chosen)
