"""The two-level suite of the emulated-cluster benchmark: M machines of L ranks each.

Every machine is one network namespace holding its L ranks (they talk over the namespace's
loopback, unshaped); the machines are joined through shaped veth links, so a machine's L ranks share
one link, as they share a machine's NIC. Compared in one run (this machine is shared and noisy):

* ``lightning_local``: compute only (one device per rank, no communication);
* ``comm:one_peer_exponential`` / ``comm:hierarchical[:process_group]``: one blocking round of flat
  one-peer gossip over all ranks, and of hierarchical gossip (machine average, one-peer exponential
  between machines), its machine stage through shared memory (the default on CPU) or the gloo group;
* ``machine:shared_memory`` / ``machine:process_group``: that machine stage alone (reduce-scatter and
  all-gather of the model inside each machine, nothing across machines);
* ``lightning_ddp``: Lightning's DDPStrategy (a ring all-reduce over all ranks);
* ``decent_dp:alternating-exp-ring``: decent-dp's two-level topology (if installed; M a power of 2);
* ``ours:one_peer_exponential:overlap`` and ``ours:hierarchical:overlap``: the strategy, flat and
  hierarchical, both overlapping the network with the next step's computation;
* time to accuracy on digits: DDP, flat one-peer and hierarchical gossip (``--suites ...,accuracy``).

Bounds: a link of ``B`` bytes/s moves a model of ``M`` bytes in ``M/B``. A hierarchical round puts one
model on every machine link and direction (``L`` shards of ``M/L``): ``M/B``. A ring all-reduce over
``n = ML`` ranks puts ``2 (n-1)/n M`` on the links between consecutive machines. decent-dp's AER
averages ``2L`` ranks across two machines with one all-reduce, ``2 (2L-1)/(2L) M`` per crossing.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks.cluster.report import Goal, _ms, _ratio, _timing_of, table, timings

#: Goals of the two-level cluster on 2 machines x 4 ranks (ratios of mean steps measured in the same run).
VERSUS_DDP = 0.6
VERSUS_AER = 0.7

HIERARCHICAL = "ours:hierarchical:overlap"
FLAT = "ours:one_peer_exponential:overlap"
AER = "decent_dp:alternating-exp-ring"
ACCURACY_RUNS = ("accuracy:one_peer_exponential:overlap", "accuracy:hierarchical:overlap")
#: The communication rounds measured alone, with their labels and whether the link bound applies.
ROUNDS = {
    "comm:one_peer_exponential": ("flat one-peer exponential over all ranks", False),
    "comm:hierarchical": ("hierarchical: machine average (shared memory), one-peer between machines", True),
    "comm:hierarchical:process_group": ("hierarchical, machine average through the gloo group (loopback TCP)", True),
    "machine:shared_memory": ("machine average alone: reduce-scatter + all-gather, shared memory", False),
    "machine:process_group": ("machine average alone: reduce-scatter + all-gather, gloo group", False),
}


def two_level_cases(machines: int) -> list[str]:
    """The step and round cases of one two-level cluster (AER only where decent-dp supports it)."""
    cases = ["lightning_local", *ROUNDS, "lightning_ddp", FLAT, HIERARCHICAL]
    if machines >= 2 and machines & (machines - 1) == 0:
        cases.append(AER)
    return cases


def accuracy_cases() -> list[str]:
    return ["accuracy:ddp", *ACCURACY_RUNS]


def step_report(
    results: dict[str, list[dict[str, Any]]], machines: int, local: int, model_bytes: int, bandwidth: float
) -> tuple[str, list[Goal]]:
    """The rounds and training steps of one ``machines x local`` cluster, and the goals they decide."""
    t = timings(results)
    link = model_bytes / bandwidth
    med = partial(_timing_of, t, median=True)  # rounds: the median of isolated rounds
    step = partial(_timing_of, t)  # training: the mean step, i.e. the throughput
    text = table(
        f"Two-level cluster {machines} x {local}: one communication round (median), M/B = {link * 1000:.0f} ms",
        ["round", "median ms", "link bound ms"],
        [[label, _ms(med(name)), _ms(link) if bounded else "-"] for name, (label, bounded) in ROUNDS.items()],
    )
    compute, ddp, aer = step("lightning_local"), step("lightning_ddp"), step(AER)
    skipped = results[AER][0].get("skipped") if results.get(AER) else None
    machine = med("machine:shared_memory") or 0.0  # the machine stage, not overlapped, on the same cores
    floor = (link if compute is None else max(compute, link)) + machine
    rows = []
    for name, label in [
        ("lightning_local", "compute only: plain Lightning, one device per rank"),
        ("lightning_ddp", "Lightning DDPStrategy (AllReduce over all ranks)"),
        (AER, "decent-dp alternating exponential ring"),
        (FLAT, "ours, flat one_peer_exponential, overlap"),
        (HIERARCHICAL, "ours, hierarchical (one-peer between machines), overlap"),
    ]:
        if name == AER and skipped:
            rows.append([label, "skipped", "-", "-", "-", skipped])
            continue
        mean = step(name)
        rows.append([label, _ms(mean), *(_ratio(_div(mean, b)) for b in (ddp, aer, floor)), ""])
    text += "\n" + table(
        f"Two-level cluster {machines} x {local} ({machines * local} ranks): mean training step. Floor of an "
        f"overlapped hierarchical step: max(compute, M/B) + the machine stage alone (shared memory, not "
        f"overlapped) = {floor * 1000:.0f} ms",
        ["run", "mean ms", "x Lightning DDP", "x decent-dp AER", "x floor", "note"],
        rows,
    )
    aer_note = skipped or ("" if aer is not None else "decent-dp AER not run (M not a power of 2)")
    floor_note = f"floor here {_ratio(_div(floor, ddp))}x DDP, {_ratio(_div(floor, aer))}x AER"
    goals = [
        Goal(
            f"{machines}x{local}: hierarchical step / Lightning DDP",
            _div(step(HIERARCHICAL), ddp),
            VERSUS_DDP,
            floor_note,
        ),
        Goal(
            f"{machines}x{local}: hierarchical step / decent-dp AER",
            _div(step(HIERARCHICAL), aer),
            VERSUS_AER,
            aer_note or floor_note,
        ),
    ]
    return text, goals


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b
