"""Membership changes in the simulator: members leave and join between steps, with the algorithms' own code.

A change before step ``k`` runs what an elastic run does on its ranks:

1. ``algorithm.cancel_pending`` on the old members (exchanges in flight are dropped);
2. every stacked tensor keeps the rows of the survivors, in their order, and gains one row per joiner, a
   copy of the row of the member that hands it over (parameters, gradients, the local optimizer's state,
   ``bucket_state_dict`` (``bucket.state``, the outer optimizer's state) and ``bucket.workspace``), as a
   real joiner loads that member's state;
3. the topology is built again for the new ``n`` (the same family: ``get_topology(name, n')``) with the
   algorithm's ``prepare_topology``, and a new communicator on it;
4. ``algorithm.change_membership`` on every member, with ``joined`` marking the new rows.

A change ``during_exchange`` models a rank killed in the middle of a step, as a real run meets it: the
members have taken step ``step - 1``'s local update, its exchange (``after_step``) fails on every one of them
(:class:`LostExchange`, as a real exchange fails when a neighbour's connection closes) and is dropped, and the
change runs inside that step, with that step's index (the strategy's ``_survive``). Without it, a change
happens cleanly between two steps, as joins at an epoch's start do.

Data: the problem's ``n`` local objectives are data shards. A survivor keeps its shard, a lost node's
shard is no longer trained on, and a joiner takes the shard it is given (default: the lowest one no
member holds), so a problem built for ``n`` nodes holds at most ``n`` members at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_decent.algorithms import Algorithm, Bucket
from lightning_decent.comm import SimulatedCommunicator
from lightning_decent.topology import Topology, get_topology

#: Keys of a change given as ``(step, {...})``.
CHANGE_KEYS = ("leave", "join_from", "shards", "during_exchange")


@dataclass(frozen=True)
class MembershipChange:
    """Members leave and join before optimizer step ``step`` (after ``step`` steps ran).

    Args:
        step: the change happens between steps ``step - 1`` and ``step``.
        leave: rows (members ``0..n-1`` in their order before the change) that leave.
        join_from: for every joiner, the row of the surviving member whose state it receives.
        shards: the data shard of every joiner (default: the lowest shards no member holds).
        during_exchange: the members were in step ``step - 1``'s exchange when the change came (a member
            was lost in it): that exchange is dropped and the change runs with the index ``step - 1``.
    """

    step: int
    leave: tuple[int, ...] = ()
    join_from: tuple[int, ...] = ()
    shards: tuple[int, ...] | None = None
    during_exchange: bool = False

    @property
    def algorithm_step(self) -> int:
        """The step index the algorithm's ``change_membership`` sees (the strategy's gossip step then)."""
        return self.step - 1 if self.during_exchange else self.step

    def rows(self, n: int) -> list[int]:
        """The old row each new row is a copy of: the survivors in their order, then every joiner's source.

        Raises:
            ValueError: naming the fix, for rows outside ``0..n-1``, a repeated leave, a joiner copying a
                member that leaves, or no member left.
        """
        where = f"membership change at step {self.step} (n={n} members)"
        for name, rows in (("leave", self.leave), ("join_from", self.join_from)):
            bad = [r for r in rows if not 0 <= r < n]
            if bad:
                raise ValueError(f"{where}: {name}={list(rows)} names rows {bad}; members are rows 0..{n - 1}.")
        if len(set(self.leave)) != len(self.leave):
            raise ValueError(f"{where}: leave={list(self.leave)} names a member twice.")
        gone = sorted(set(self.join_from) & set(self.leave))
        if gone:
            raise ValueError(
                f"{where}: joiners copy rows {gone}, which leave in the same change; name a surviving member in "
                f"join_from."
            )
        rows = [i for i in range(n) if i not in self.leave] + list(self.join_from)
        if not rows:
            raise ValueError(f"{where}: every member leaves; keep at least one (or join one in the same change).")
        return rows

    def joined(self, n: int) -> torch.Tensor:
        """``[n', 1]`` booleans: True on the joiners' rows (the last ``len(join_from)``)."""
        mask = torch.zeros(n - len(self.leave) + len(self.join_from), 1, dtype=torch.bool)
        mask[mask.shape[0] - len(self.join_from) :] = True
        return mask

    def next_shards(self, shards: torch.Tensor, capacity: int) -> torch.Tensor:
        """The data shard of every member after the change (``shards``: before it; ``capacity``: the problem's n).

        Raises:
            ValueError: if a given shard is held by a survivor or does not exist, or none is free.
        """
        kept = [int(shards[i]) for i in range(len(shards)) if i not in self.leave]
        free = [s for s in range(capacity) if s not in kept]
        if self.shards is None:
            if len(free) < len(self.join_from):
                raise ValueError(
                    f"membership change at step {self.step}: {len(self.join_from)} joiner(s) need a data shard, but "
                    f"only {len(free)} of the problem's {capacity} are free. Build the problem with more nodes and "
                    f"start with fewer (simulate(..., nodes=[...]))."
                )
            return torch.tensor(kept + free[: len(self.join_from)])
        if len(self.shards) != len(self.join_from) or len(set(self.shards)) != len(self.shards):
            raise ValueError(
                f"membership change at step {self.step}: shards={list(self.shards)} must name one distinct shard per "
                f"joiner (join_from={list(self.join_from)})."
            )
        taken = [s for s in self.shards if s not in free]
        if taken:
            raise ValueError(
                f"membership change at step {self.step}: shards {taken} are held by a member or outside "
                f"0..{capacity - 1}; free shards: {free}."
            )
        return torch.tensor(kept + list(self.shards))


#: A schedule as :func:`membership_schedule` accepts it.
Schedule = str | Sequence[MembershipChange | tuple[int, Mapping[str, Any]]] | None


def membership_schedule(schedule: Schedule, steps: int) -> dict[int, MembershipChange]:
    """The changes of a run by step, from ``[(step, {"leave": [3]}), (step2, {"join_from": [0]})]``,
    :class:`MembershipChange` objects, or the command line's text (:func:`parse_membership`).

    Raises:
        ValueError: naming the fix, for unknown keys, two changes at one step, or a step outside ``0..steps-1``.
    """
    if schedule is None:
        return {}
    if isinstance(schedule, str):
        schedule = parse_membership(schedule)
    changes: dict[int, MembershipChange] = {}
    for entry in schedule:
        change = entry if isinstance(entry, MembershipChange) else _from_mapping(*entry)
        if not 0 <= change.step < steps:
            raise ValueError(
                f"membership change at step {change.step} never happens in a run of {steps} steps; use a step "
                f"in 0..{steps - 1}."
            )
        if change.step in changes:
            raise ValueError(f"two membership changes at step {change.step}; merge them into one.")
        changes[change.step] = change
    return changes


def _from_mapping(step: int, change: Mapping[str, Any]) -> MembershipChange:
    unknown = sorted(set(change) - set(CHANGE_KEYS))
    if unknown:
        valid = ", ".join(CHANGE_KEYS)
        raise ValueError(f"membership change at step {step}: unknown key(s) {unknown}; valid: {valid}.")
    shards, during = change.get("shards"), change.get("during_exchange", False)
    if isinstance(during, list | tuple):  # the command line's ``during_exchange=1``
        during = bool(during and during[0])
    if during and step < 1:
        raise ValueError(f"membership change at step {step}: during_exchange needs a step before it; use step >= 1.")
    return MembershipChange(
        step=int(step),
        leave=tuple(int(i) for i in change.get("leave", ())),
        join_from=tuple(int(i) for i in change.get("join_from", ())),
        shards=None if shards is None else tuple(int(s) for s in shards),
        during_exchange=bool(during),
    )


def parse_membership(text: str) -> list[MembershipChange]:
    """Changes separated by ``;``, each ``STEP:key=rows`` with rows joined by ``+``, e.g.
    ``"100:leave=3;200:join_from=0"``, ``"50:leave=1+2:join_from=0"`` or ``"50:leave=3:during_exchange=1"``.

    Raises:
        ValueError: naming the format, for text that does not parse.
    """
    changes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        step, *items = part.split(":")
        try:
            fields = {}
            for item in items:
                key, sep, rows = item.partition("=")
                if not sep:
                    raise ValueError(item)
                fields[key.strip()] = [int(r) for r in rows.split("+") if r.strip()]
            changes.append(_from_mapping(int(step), fields))
        except ValueError as error:
            if "membership change" in str(error):
                raise
            raise ValueError(
                f"Cannot parse membership change {part!r}: write STEP:leave=ROWS:join_from=ROWS with rows joined by "
                f"'+' and changes by ';', e.g. '100:leave=3;200:join_from=0'."
            ) from None
    return changes


def select_rows(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` with every per-node tensor (at least 2-D with ``n`` rows: parameters, states, per-node
    scalars ``[n, 1]``) replaced by its rows ``rows``, through dicts and lists; anything else as it is
    (step counters, the ``[F]`` fragment markers)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, n) for key, item in value.items()}
    if isinstance(value, list):
        return [select_rows(item, rows, n) for item in value]
    return value


@dataclass
class Members:
    """The simulated members' stacked state: row ``i`` is member ``i``, holding data shard ``shards[i]``
    (``shards`` is ``None`` when the members are the problem's nodes ``0..n-1`` in order)."""

    params: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    bucket: Bucket
    graph: Topology
    comm: SimulatedCommunicator
    shards: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.params.shape[0]


def build_members(
    algorithm: Algorithm,
    topology: str | Topology,
    params: torch.Tensor,
    optimizer: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    shards: torch.Tensor | None,
) -> Members:
    """Members with parameters ``params`` (``[n, dim]``): the graph for ``n`` prepared by the algorithm, its
    communicator, the local optimizer and the algorithm's freshly initialised state."""
    graph = algorithm.prepare_topology(get_topology(topology, params.shape[0]))
    parameter = torch.nn.Parameter(params)
    local = optimizer(parameter)
    algorithm.check_optimizer(local)
    parameter.grad = torch.zeros_like(parameter)
    bucket = Bucket(parameter.data, parameter.grad if algorithm.transforms_gradients else None)
    algorithm.init_state(bucket)
    return Members(parameter, local, bucket, graph, SimulatedCommunicator(graph), shards)


def change_members(
    members: Members,
    change: MembershipChange,
    algorithm: Algorithm,
    topology: str,
    optimizer: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    capacity: int,
) -> Members:
    """Run ``change`` on ``members`` (see the module docstring) and return the new members.

    Args:
        topology: the family's name, built again for the new ``n``.
        optimizer: builds the local optimizer over new parameters (its state is then copied row by row).
        capacity: the problem's number of data shards.
    """
    n = members.n
    rows = torch.tensor(change.rows(n))
    shards = members.shards if members.shards is not None else torch.arange(n)
    next_shards = change.next_shards(shards, capacity)
    algorithm.cancel_pending([members.bucket])
    bucket_state = select_rows(algorithm.bucket_state_dict(members.bucket), rows, n)
    optimizer_state = select_rows(members.optimizer.state_dict(), rows, n)
    new = build_members(algorithm, topology, members.params.data[rows], optimizer, next_shards)
    new.optimizer.load_state_dict(optimizer_state)
    algorithm.load_bucket_state_dict(new.bucket, bucket_state)
    with torch.no_grad():
        for key, buffer in members.bucket.workspace.items():
            if key in new.bucket.workspace and buffer.dim() >= 2 and buffer.shape[0] == n:
                new.bucket.workspace[key].copy_(buffer[rows])
    new.comm.stats = members.comm.stats  # one count of the whole run's traffic
    joined = change.joined(n).to(new.params.device)
    algorithm.change_membership([new.bucket], new.comm, change.algorithm_step, joined)
    return new


class MemberLostError(RuntimeError):
    """A simulated exchange that a lost member interrupted."""


class LostExchange:
    """The communicator of a step whose exchange a lost member interrupts: every call raises
    :class:`MemberLostError`; attributes (``n``, ``stats``) read through to ``comm``."""

    def __init__(self, comm: SimulatedCommunicator, step: int) -> None:
        self._comm, self._step = comm, step

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._comm, name)
        if not callable(value):
            return value

        def lost(*args: Any, **kwargs: Any) -> Any:
            raise MemberLostError(f"a member was lost during the exchange of step {self._step} ({name})")

        return lost
