"""Embedding-to-embedding transformations: FCT forward h(old, side) -> new, FastFill's h plus an
uncertainty head, and the reverse psi: new -> old that makes one new-model pass give both query embeddings.

They run on stored vectors (no images), so transforming a whole gallery is cheap; that is the point of
FCT and FastFill. All MLPs use :class:`SingleSafeBatchNorm1d` so a batch of one works in training mode.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SingleSafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that accepts a batch of one in training mode.

    Batch statistics of one sample are undefined (torch raises). A one-item batch happens in practice
    (the last batch of an epoch, one-query fine-tuning), so it is normalised with the running
    statistics, exactly as in eval mode, without updating them; the affine parameters still train.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
        return super().forward(x)


def mlp_block(dim_in: int, dim_out: int) -> nn.Sequential:
    """Linear + BatchNorm + ReLU: the reference FCT building block (1x1 conv + BN + ReLU there)."""
    return nn.Sequential(nn.Linear(dim_in, dim_out, bias=False), SingleSafeBatchNorm1d(dim_out), nn.ReLU())


class ForwardTransformation(nn.Module):
    """FCT's h(phi_old(x), s(x)) -> new space.

    Two branches (old: old_dim -> hidden -> hidden; side: side_dim -> hidden -> hidden), concatenated,
    then a mixer 2*hidden -> mixer -> mixer -> new_dim (last layer linear). The reference sizes
    (FCT paper's reference code) are ``hidden_dim=256, mixer_dim=2048``; the defaults here (128, 512) train in
    seconds on a CPU for galleries of 10^4 items. Pass the reference sizes on a GPU cluster.

    Without side-information (``side_dim=None``) the side branch is fed the old embedding itself
    (``s = phi_old``, the reference's setting), rather than dropping the branch: the no-side-info and
    side-info variants then have the same architecture and capacity, so comparing them measures the
    information the side-info adds, and nothing extra has to be stored next to each old embedding.
    """

    def __init__(
        self, old_dim: int, new_dim: int, side_dim: int | None = None, hidden_dim: int = 128, mixer_dim: int = 512
    ) -> None:
        super().__init__()
        self.old_dim = old_dim
        self.new_dim = new_dim
        self.side_dim = side_dim
        self.old_branch = nn.Sequential(mlp_block(old_dim, hidden_dim), mlp_block(hidden_dim, hidden_dim))
        side_in = old_dim if side_dim is None else side_dim
        self.side_branch = nn.Sequential(mlp_block(side_in, hidden_dim), mlp_block(hidden_dim, hidden_dim))
        self.mixer = nn.Sequential(
            mlp_block(2 * hidden_dim, mixer_dim), mlp_block(mixer_dim, mixer_dim), nn.Linear(mixer_dim, new_dim)
        )

    @property
    def uses_side_info(self) -> bool:
        return self.side_dim is not None

    @property
    def dims(self) -> dict[str, int]:
        return {"old": self.old_dim, "side": self.side_dim or 0, "new": self.new_dim}

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_side_info and side is None:
            raise ValueError(f"this transformation was trained with side-information (dim {self.side_dim}); pass it")
        if not self.uses_side_info and side is not None:
            raise ValueError("this transformation was trained without side-information; do not pass any")
        side_input = old if side is None else side
        return self.mixer(torch.cat([self.old_branch(old), self.side_branch(side_input)], dim=1))


class FastFillTransformation(nn.Module):
    """FastFill: FCT's transformation h plus an uncertainty head s_i = w . h_i + b (a log-variance).

    ``forward`` returns ``(h, s)`` with ``s`` of shape (N,); a high ``s`` means the transformed
    embedding is likely far from the true new one, so the item should be backfilled early.
    """

    def __init__(
        self, old_dim: int, new_dim: int, side_dim: int | None = None, hidden_dim: int = 128, mixer_dim: int = 512
    ) -> None:
        super().__init__()
        self.transform = ForwardTransformation(old_dim, new_dim, side_dim, hidden_dim, mixer_dim)
        self.uncertainty = nn.Linear(new_dim, 1)

    @property
    def uses_side_info(self) -> bool:
        return self.transform.uses_side_info

    @property
    def dims(self) -> dict[str, int]:
        return self.transform.dims

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.transform(old, side)
        return h, self.uncertainty(h).squeeze(1)


class ReverseTransformation(nn.Module):
    """psi: new space -> old space, applied to queries so the old model can be retired during a rank-merge
    backfill. Light on purpose (one hidden layer): it runs on every query."""

    def __init__(self, new_dim: int, old_dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.new_dim = new_dim
        self.old_dim = old_dim
        self.net = nn.Sequential(mlp_block(new_dim, hidden_dim), nn.Linear(hidden_dim, old_dim))

    @property
    def dims(self) -> dict[str, int]:
        return {"new": self.new_dim, "old": self.old_dim}

    def forward(self, new: torch.Tensor) -> torch.Tensor:
        return self.net(new)


class LinearTransformation(nn.Module):
    """An affine map between two spaces, ``y = x W + b``, as fitted in closed form by :mod:`raybackfill.adapters`
    (Procrustes, ridge, low-rank): the one module the backfill, `transform` and the index run for such an adapter.

    ``rank`` stores the map as two factors (in -> rank -> out, the first without bias), cheaper at low rank.
    ``normalize_input`` L2-normalises each input row first (the fit was made on normalised rows). With
    ``side_dim`` the input is the concatenation of the (normalised) vector and its side-information. The names of
    the input and output spaces come from the subclass (:class:`LinearForward`, :class:`LinearReverse`), so
    ``dims`` reads like the other transformations' (``{"old": ..., "new": ...}``).
    """

    input_space = "in"
    output_space = "out"

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int | None = None,
        bias: bool = True,
        normalize_input: bool = False,
        side_dim: int | None = None,
    ) -> None:
        super().__init__()
        if rank is not None and not 1 <= rank <= min(in_dim + (side_dim or 0), out_dim):
            raise ValueError(f"rank must be in [1, {min(in_dim + (side_dim or 0), out_dim)}], got {rank}")
        self.in_dim, self.out_dim, self.rank, self.side_dim = in_dim, out_dim, rank, side_dim
        self.normalize_input = normalize_input
        width = in_dim + (side_dim or 0)
        if rank is None:
            self.net: nn.Module = nn.Linear(width, out_dim, bias=bias)
        else:
            self.net = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, out_dim, bias=bias))

    @property
    def uses_side_info(self) -> bool:
        return self.side_dim is not None

    @property
    def dims(self) -> dict[str, int]:
        dims = {self.input_space: self.in_dim, self.output_space: self.out_dim}
        return dims | ({"side": self.side_dim} if self.side_dim is not None else {})

    def load_map(self, weight: np.ndarray, bias: np.ndarray, left=None, right=None) -> LinearTransformation:
        """Set the parameters from a row-vector map ``x @ weight + bias`` (``weight`` (in, out)); a low-rank
        module takes the factors ``left`` (in, rank) and ``right`` (rank, out)."""
        with torch.no_grad():
            layers = [m for m in self.net.modules() if isinstance(m, nn.Linear)]  # in order: in -> (rank ->) out
            matrices = [weight] if len(layers) == 1 else [left, right]
            if any(m is None for m in matrices):
                raise ValueError("a low-rank module needs the map's factors (left, right)")
            for layer, matrix in zip(layers, matrices, strict=True):
                assert matrix is not None  # checked above
                layer.weight.copy_(torch.as_tensor(np.asarray(matrix).T, dtype=torch.float32))
            last = layers[-1]
            if last.bias is not None:
                last.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
            elif np.any(np.asarray(bias) != 0):
                raise ValueError("this module has no bias, but the map has one")
        return self

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if self.uses_side_info and side is None:
            raise ValueError(f"this adapter was fitted with side-information (dim {self.side_dim}); pass it")
        if not self.uses_side_info and side is not None:
            raise ValueError("this adapter was fitted without side-information; do not pass any")
        parts = [x] if side is None else [x, side]
        if self.normalize_input:
            parts = [F.normalize(p, dim=1) for p in parts]
        return self.net(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


class LinearForward(LinearTransformation):
    """A closed-form adapter old -> new (the backfill's instant phase runs it like FCT's h)."""

    input_space = "old"
    output_space = "new"

    def __init__(
        self,
        old_dim: int,
        new_dim: int,
        rank: int | None = None,
        bias: bool = True,
        normalize_input: bool = False,
        side_dim: int | None = None,
    ) -> None:
        super().__init__(old_dim, new_dim, rank, bias, normalize_input, side_dim)
        self.old_dim, self.new_dim = old_dim, new_dim  # named as the other transformations name them


class LinearReverse(LinearTransformation):
    """A closed-form adapter new -> old (psi: the old-space query from a new-model query)."""

    input_space = "new"
    output_space = "old"

    def __init__(
        self, new_dim: int, old_dim: int, rank: int | None = None, bias: bool = True, normalize_input: bool = False
    ) -> None:
        super().__init__(new_dim, old_dim, rank, bias, normalize_input)
        self.old_dim, self.new_dim = old_dim, new_dim  # named as the other transformations name them


def apply_transformation(
    module: nn.Module,
    vectors: np.ndarray,
    side: np.ndarray | None = None,
    *,
    chunk: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(h, s)`` of stored vectors: FCT h and psi give ``s = None``, FastFill its uncertainty head.

    The one implementation behind the backfill's instant phase, `raybackfill transform` and the demo. Eval mode
    (BatchNorm with its running statistics, so rows do not depend on their chunk), restored afterwards; ``chunk``
    rows per forward pass bound the activations' memory; ``side`` only for a transformation trained with it.
    """
    was_training = module.training
    module.eval()
    inputs = [vectors] if side is None else [vectors, side]
    h_parts, s_parts = [], []
    try:
        with torch.inference_mode():
            for start in range(0, max(len(vectors), 1), chunk):  # an empty input still gives an (0, d) output
                # A copy per chunk: Arrow's zero-copy arrays are read-only, which torch.from_numpy warns about.
                args = [torch.from_numpy(np.array(x[start : start + chunk], dtype=np.float32)) for x in inputs]
                out = module(*(a.to(device) for a in args))
                h, s = out if isinstance(out, tuple) else (out, None)
                h_parts.append(h.float().cpu())
                if s is not None:
                    s_parts.append(s.float().cpu())
    finally:
        module.train(was_training)
    return torch.cat(h_parts).numpy(), torch.cat(s_parts).numpy() if s_parts else None
