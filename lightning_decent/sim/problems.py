"""Test problems for the simulator: n local objectives ``f_i``, evaluated for all nodes in one batched call.

Every problem stores its data with the node as the leading dimension and computes the losses of
``k`` nodes at ``k`` parameter vectors (``[k, m]``) with batched matrix products, so the ``n``
nodes of a simulation cost one kernel per layer. Gradients come from autograd on the stacked
parameters: node ``i``'s loss depends only on row ``i``. The global objective is the plain average
``f(x) = (1/n) sum_i f_i(x)``.

The same :meth:`Problem.local_losses` call with ``nodes=[rank]`` is one node's loss in real
multi-process training, which is how the simulator and the strategy are compared.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightning_decent._extras import require
from lightning_decent.data import partition_indices


class Problem(ABC):
    """``n`` local objectives over ``dim`` parameters.

    Attributes:
        name: short name used in tables.
        n: number of nodes.
        dim: number of parameters of one model.
        optimum: the minimiser of ``f`` when it is known (convex problems), else ``None``.
    """

    name: str
    n: int
    dim: int
    optimum: torch.Tensor | None = None

    def initial_params(self) -> torch.Tensor:
        """The common starting point ``x^0`` (float64, ``[dim]``); zeros unless the model needs a random init."""
        return torch.zeros(self.dim, dtype=torch.float64)

    @abstractmethod
    def local_losses(
        self, params: torch.Tensor, nodes: torch.Tensor | None = None, batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``f_i(x_i)`` for each row: ``params`` is ``[k, dim]`` for the nodes ``nodes`` (all ``n`` when
        ``None``); ``batch`` (``[k, b]`` sample indices into each node's data) selects a mini-batch."""

    def sample_batch(self, generator: torch.Generator) -> torch.Tensor | None:
        """Per-node mini-batch indices for one step, or ``None`` for the full local data (exact gradients)."""
        return None

    def global_loss(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x) = (1/n) sum_i f_i(x)`` at one model ``x`` (``[dim]``)."""
        return self.local_losses(x.expand(self.n, -1)).mean()

    def accuracy(self, x: torch.Tensor) -> float | None:
        """Held-out accuracy of model ``x`` for classification problems, else ``None``."""
        return None

    def optimum_loss(self) -> float | None:
        """``f(x*)`` when the optimum is known."""
        return None if self.optimum is None else float(self.global_loss(self.optimum))

    def to(self, dtype: torch.dtype) -> Problem:
        """Cast the problem's floating-point data to ``dtype`` (in place; returns ``self``)."""
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(self, key, value.to(dtype))
        return self


def _rows(tensor: torch.Tensor, nodes: torch.Tensor | None) -> torch.Tensor:
    return tensor if nodes is None else tensor[nodes]


class Quadratic(Problem):
    """A deterministic heterogeneous quadratic in ``d = 2`` with a closed-form optimum, the tests' reference
    problem::

    f_i(x) = 1/2 (x - c_i)^T H_i (x - c_i),  H_i = diag(1 + i/(n-1), 2 - i/(n-1)),
    c_i = (i - (n-1)/2, (-1)^i),  x^0 = 0.
    """

    name = "quadratic"

    def __init__(self, n: int = 8) -> None:
        if n < 2:
            raise ValueError(f"quadratic needs n >= 2 nodes; got n={n}.")
        self.n, self.dim = n, 2
        i = torch.arange(n, dtype=torch.float64)
        self.curvature = torch.stack([1 + i / (n - 1), 2 - i / (n - 1)], dim=1)
        self.centers = torch.stack([i - (n - 1) / 2, (-1.0) ** i], dim=1)
        self.optimum = (self.curvature * self.centers).sum(0) / self.curvature.sum(0)

    def local_losses(
        self, params: torch.Tensor, nodes: torch.Tensor | None = None, batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        diff = params - _rows(self.centers, nodes)
        return 0.5 * (_rows(self.curvature, nodes) * diff * diff).sum(-1)


class _LinearModelProblem(Problem):
    """Shared data generation: per-node features ``A_i`` (``[s, dim]``, standard normal) and a
    per-node teacher ``w_i = w* + h zeta_i`` with ``||w*|| ~ scale`` and ``||zeta_i|| ~ 1``: the
    heterogeneity ``h`` moves every node's own optimum away from the global one."""

    def __init__(self, n: int, dim: int, samples: int, heterogeneity: float, seed: int, scale: float) -> None:
        if n < 1 or dim < 1 or samples < 1:
            raise ValueError(f"{self.name} needs n, dim, samples >= 1; got n={n}, dim={dim}, samples={samples}.")
        if heterogeneity < 0:
            raise ValueError(f"heterogeneity must be >= 0; got {heterogeneity}.")
        self.n, self.dim = n, dim
        gen = torch.Generator().manual_seed(seed)
        shared = scale * torch.randn(dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        spread = torch.randn(n, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        self.teachers = shared + heterogeneity * spread
        self.features = torch.randn(n, samples, dim, generator=gen, dtype=torch.float64)

    def _scores(self, params: torch.Tensor, nodes: torch.Tensor | None) -> torch.Tensor:
        """``A_i x_i`` for every node: one batched product ``x_i^T A_i^T``, ``[k, s]`` (as a row vector
        times the transposed view, twice as fast forward and backward as ``einsum`` at 4,096 nodes)."""
        return torch.bmm(params.unsqueeze(1), _rows(self.features, nodes).transpose(1, 2)).squeeze(1)

    def _curvature(self, scores: torch.Tensor) -> torch.Tensor:
        """Second derivative of the per-sample loss with respect to its score ``a^T x`` (``[n, s]``)."""
        raise NotImplementedError

    def _solve_newton(self, ridge: float = 0.0, iterations: int = 50) -> torch.Tensor:
        """The minimiser of the (strongly convex) global objective by Newton's method in float64, with
        the Hessian ``1/(ns) sum A_i^T diag(curvature) A_i + ridge I`` formed explicitly (``dim x dim``)."""
        x = torch.zeros(self.dim, dtype=torch.float64)
        samples = self.features.shape[1]
        for _ in range(iterations):
            grad = torch.func.grad(self.global_loss)(x)
            if grad.norm() < 1e-14:
                break
            weights = self._curvature(self._scores(x.expand(self.n, -1), None)) / (self.n * samples)
            hessian = torch.einsum("nsd,ns,nse->de", self.features, weights, self.features)
            x = x - torch.linalg.solve(hessian + ridge * torch.eye(self.dim, dtype=torch.float64), grad)
        return x


class LeastSquares(_LinearModelProblem):
    """Heterogeneous least squares, ``f_i(x) = 1/(2s) ||A_i x - A_i w_i||^2`` (no label noise), so node
    ``i`` alone would fit its own teacher ``w_i`` and the global optimum is a weighted compromise."""

    name = "least_squares"

    def __init__(self, n: int = 32, dim: int = 100, samples: int = 32, heterogeneity: float = 1.0, seed: int = 0):
        super().__init__(n, dim, samples, heterogeneity, seed, scale=1.0)
        self.targets = torch.einsum("nsd,nd->ns", self.features, self.teachers)
        self.optimum = self._solve_newton(iterations=3)

    def _curvature(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(scores)

    def local_losses(
        self, params: torch.Tensor, nodes: torch.Tensor | None = None, batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        residual = self._scores(params, nodes) - _rows(self.targets, nodes)
        return 0.5 * (residual * residual).mean(-1)


class Logistic(_LinearModelProblem):
    """Heterogeneous L2-regularised logistic regression: labels ``y ~ Bernoulli(sigmoid(A_i w_i))``
    in {-1, +1} from each node's own teacher, ``f_i(x) = mean log(1 + exp(-y a^T x)) + l2/2 ||x||^2``.

    ``heterogeneity = 0`` gives iid nodes: every node holds the same samples (node 0's), so every
    ``f_i = f`` and ``grad f_i(x*) = 0``. (With a shared teacher but separately drawn samples, each node's
    finite sample would still pull its own optimum away from ``x*``.)"""

    name = "logistic"

    def __init__(
        self,
        n: int = 32,
        dim: int = 100,
        samples: int = 32,
        heterogeneity: float = 1.0,
        seed: int = 0,
        l2: float = 1e-2,
    ) -> None:
        if l2 <= 0:
            raise ValueError(f"logistic needs l2 > 0 (a unique optimum); got l2={l2}.")
        super().__init__(n, dim, samples, heterogeneity, seed, scale=3.0)
        self.l2 = l2
        logits = torch.einsum("nsd,nd->ns", self.features, self.teachers)
        coin = torch.rand(logits.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        self.labels = torch.where(coin < torch.sigmoid(logits), 1.0, -1.0).to(torch.float64)
        if heterogeneity == 0:
            self.features = self.features[:1].expand_as(self.features).clone()
            self.labels = self.labels[:1].expand_as(self.labels).clone()
        self.optimum = self._solve_newton(ridge=l2)

    def _curvature(self, scores: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(scores)
        return p * (1 - p)

    def local_losses(
        self, params: torch.Tensor, nodes: torch.Tensor | None = None, batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        margins = _rows(self.labels, nodes) * self._scores(params, nodes)
        return F.softplus(-margins).mean(-1) + 0.5 * self.l2 * (params * params).sum(-1)


class Digits(Problem):
    """A one-hidden-layer MLP (64 -> hidden -> 10, ReLU) on scikit-learn's 8x8 digits, the training
    images split over the nodes by a Dirichlet(``alpha``) label distribution
    (:func:`~lightning_decent.data.partition_indices`; ``alpha = 0.1``: very non-iid, ``100``: nearly
    iid). Accuracy is measured on a fixed held-out set of 360 images.

    The ``n`` per-node MLPs run as batched matrix products over zero-padded local data sets; losses
    are averaged over each node's own samples (or a mini-batch of ``batch_size`` drawn with
    replacement from them; ``batch_size = 0`` uses the full local data).
    """

    name = "digits"

    def __init__(
        self,
        n: int = 16,
        alpha: float = 0.1,
        hidden: int = 32,
        batch_size: int = 32,
        seed: int = 0,
        test_size: int = 360,
    ) -> None:
        data = require("sklearn.datasets", "app", "the simulator's digits problem").load_digits()
        images = torch.tensor(data.data, dtype=torch.float64) / 16.0
        labels = torch.tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        test, train = order[:test_size], order[test_size:]
        self.test_images, self.test_labels = images[test], labels[test]
        parts = partition_indices(labels[train], n, "dirichlet", alpha=alpha, seed=seed)
        longest = max(len(p) for p in parts)
        self.images = torch.zeros(n, longest, 64, dtype=torch.float64)
        self.labels = torch.zeros(n, longest, dtype=torch.long)
        self.mask = torch.zeros(n, longest, dtype=torch.float64)
        for node, part in enumerate(parts):
            idx = train[torch.from_numpy(part)]
            self.images[node, : len(part)] = images[idx]
            self.labels[node, : len(part)] = labels[idx]
            self.mask[node, : len(part)] = 1.0
        self.counts = torch.tensor([len(p) for p in parts])
        self.n, self.hidden, self.batch_size, self.seed = n, hidden, batch_size, seed
        self.shapes = [(64, hidden), (hidden,), (hidden, 10), (10,)]
        self.dim = sum(math.prod(s) for s in self.shapes)

    def initial_params(self) -> torch.Tensor:
        """PyTorch's ``nn.Linear`` initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, seeded."""
        gen = torch.Generator().manual_seed(self.seed)
        fan_ins = [64, 64, self.hidden, self.hidden]
        return torch.cat(
            [
                (2 * torch.rand(math.prod(s), generator=gen, dtype=torch.float64) - 1) / math.sqrt(f)
                for s, f in zip(self.shapes, fan_ins)
            ]
        )

    def _logits(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Batched MLP: ``params`` ``[k, dim]``, ``images`` ``[k, s, 64]`` -> logits ``[k, s, 10]``."""
        k = params.shape[0]
        w1, b1, w2, b2 = (chunk.reshape(k, *s) for chunk, s in zip(self._split(params), self.shapes))
        hidden = torch.relu(torch.baddbmm(b1.unsqueeze(1), images, w1))
        return torch.baddbmm(b2.unsqueeze(1), hidden, w2)

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(params, [math.prod(s) for s in self.shapes], dim=-1)

    def local_losses(
        self, params: torch.Tensor, nodes: torch.Tensor | None = None, batch: torch.Tensor | None = None
    ) -> torch.Tensor:
        images, labels, mask = (_rows(t, nodes) for t in (self.images, self.labels, self.mask))
        if batch is not None:
            rows = torch.arange(len(images)).unsqueeze(1)
            images, labels, mask = images[rows, batch], labels[rows, batch], torch.ones(batch.shape, dtype=params.dtype)
        logits = self._logits(params, images.to(params.dtype))
        losses = F.cross_entropy(logits.reshape(-1, 10), labels.reshape(-1), reduction="none").view(labels.shape)
        return (losses * mask).sum(-1) / mask.sum(-1)

    def sample_batch(self, generator: torch.Generator) -> torch.Tensor | None:
        if self.batch_size == 0:
            return None
        uniform = torch.rand(self.n, self.batch_size, generator=generator, dtype=torch.float64)
        return (uniform * self.counts.unsqueeze(1)).long()

    def accuracy(self, x: torch.Tensor) -> float:
        logits = self._logits(x.unsqueeze(0), self.test_images.unsqueeze(0).to(x.dtype))[0]
        return float((logits.argmax(-1) == self.test_labels).double().mean())


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "quadratic": Quadratic,
    "least_squares": LeastSquares,
    "logistic": Logistic,
    "digits": Digits,
}


def get_problem(name: str, **options: object) -> Problem:
    """Build a registered problem, e.g. ``get_problem("logistic", n=32, dim=100, heterogeneity=1.0)``."""
    key = name.strip().replace("-", "_").lower()
    if key not in PROBLEMS:
        raise ValueError(f"Unknown problem {name!r}; valid names: {', '.join(PROBLEMS)}.")
    return PROBLEMS[key](**options)
