"""Two-level (hierarchical) topologies: exact averaging inside a machine, gossip between machines.

``n = M x L`` ranks on ``M`` machines of ``L`` ranks, machine ``m`` holding the consecutive ranks
``mL .. mL + L - 1`` (the order of torchrun and Lightning: ``rank = node_rank x L + local_rank``).
With ``W_M(k)`` a doubly stochastic mixing matrix over the machines, one round is::

    W(k) = W_M(k) (x) 11^T/L,    x_(m,l) <- sum_m' W_M(k)[m, m'] (1/L) sum_l' x_(m',l')

every rank takes its machine's average, and the machine averages gossip over ``W_M``. ``W(k)`` is
doubly stochastic (a Kronecker product of two doubly stochastic matrices), symmetric when ``W_M`` is,
and one period averages exactly when one period of ``W_M`` does. Algorithms and the simulator use it
as any other topology; :class:`~lightning_decent.comm.HierarchicalCommunicator` realises it with
``1/L`` of the model per rank on the inter-machine link (docs/topologies.md).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lightning_decent.topology.base import Topology


class HierarchicalTopology(Topology):
    """``W(k) = W_M(k) (x) 11^T/L``; keeps the machine-level topology and ``L`` for the communicator.

    Args:
        machines: the topology between the ``M`` machines.
        local_world_size: ``L``, the ranks per machine.
    """

    def __init__(self, machines: Topology, local_world_size: int) -> None:
        if isinstance(local_world_size, bool) or not isinstance(local_world_size, (int, np.integer)):
            raise ValueError(f"local_world_size must be a positive integer; got {local_world_size!r}.")
        if local_world_size < 1:
            raise ValueError(f"local_world_size must be a positive integer; got {local_world_size!r}.")
        local = sp.csr_array(np.full((local_world_size, local_world_size), 1.0 / local_world_size))
        phases = [sp.kron(machines.sparse(k), local, format="csr") for k in range(machines.period)]
        super().__init__(phases, name="hierarchical")
        self.machines = machines
        self.local_world_size = int(local_world_size)
        #: Whether the caller checked that ranks ``mL .. mL + L - 1`` share a machine (elastic runs compare the
        #: members' machines); otherwise the communicator checks the launcher's ``LOCAL_RANK`` layout.
        self.layout_checked = False

    @property
    def num_machines(self) -> int:
        return self.machines.n

    def __repr__(self) -> str:
        return (
            f"HierarchicalTopology(machines={self.machines.name!r} x {self.num_machines}, "
            f"local_world_size={self.local_world_size}, period={self.period})"
        )
