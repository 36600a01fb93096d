"""Elastic membership's parts, without a training run: options, the admission of joiners, membership epochs on
torch's rendezvous, the choice of the donor, the state hand-over and the classification of losses."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from mp_launch import free_port, run_gloo_world

from lightning_decent import DecentralizedStrategy
from lightning_decent.comm.collectives import BoundedCollectives, CollectiveTimeoutError
from lightning_decent.comm.p2p import PeerTimeoutError
from lightning_decent.membership import ElasticOptions, elastic_options, is_membership_loss
from lightning_decent.membership.handover import donor_of, receive_state, send_state
from lightning_decent.membership.rendezvous import Membership, MembershipError, joiner_key, launch_key
from lightning_decent.membership.store import parse_address
from lightning_decent.topology import get_topology


def test_elastic_is_off_by_default_and_takes_true_a_dict_or_options() -> None:
    assert DecentralizedStrategy().elastic is None
    assert DecentralizedStrategy(elastic=True).elastic == ElasticOptions()
    assert DecentralizedStrategy(elastic={"min_ranks": 3}).elastic.min_ranks == 3
    assert elastic_options({"enabled": False, "min_ranks": 3}) is None  # Hydra: strategy.elastic.enabled=false


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"min_rank": 3}, r"does not take option\(s\) \['min_rank'\]; its options are: enabled, min_ranks"),
        ({"min_ranks": 0}, "min_ranks must be >= 1"),
        ({"min_ranks": 4, "max_ranks": 2}, "max_ranks=2 is below elastic.min_ranks=4"),
        ({"heartbeat": float("inf")}, "heartbeat must be a positive, finite number"),
        ({"store": "localhost"}, "is not 'host:port'"),
    ],
)
def test_bad_elastic_options_are_refused_naming_the_fix(value: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecentralizedStrategy(elastic=value)


def test_store_addresses_parse_as_host_and_port() -> None:
    assert parse_address("10.0.0.1:29400") == ("10.0.0.1", 29400)


def test_lost_peers_and_collectives_are_membership_losses_other_errors_are_not() -> None:
    assert is_membership_loss(PeerTimeoutError("rank 1: lost rank 2"))
    assert is_membership_loss(CollectiveTimeoutError("rank 1: rank 2 died"))
    assert is_membership_loss(RuntimeError("[pair.cc:545] Read error: Connection reset by peer"))
    assert not is_membership_loss(RuntimeError("size mismatch for weight"))
    assert not is_membership_loss(ValueError("connection reset"))


def test_a_joiner_gets_its_state_from_an_old_in_neighbour_or_the_lowest_old_member() -> None:
    ring = get_topology("ring", 6)
    assert donor_of(5, [5], ring, step=0) in {0, 4}
    assert donor_of(5, [5], ring, step=0) == min(r for r, _ in ring.in_neighbors(5) if r != 5)
    assert donor_of(5, [4, 5], ring, step=0) == 0  # its other neighbour joins too
    star = get_topology("star", 4)
    assert donor_of(0, [0, 1, 2], star, step=0) == 3
    with pytest.raises(ValueError, match="joiners only"):
        donor_of(0, [0, 1], get_topology("ring", 2), step=0)


def test_launched_ranks_sort_before_joiners_so_the_lowest_survivor_becomes_rank_0() -> None:
    keys = sorted([joiner_key(), launch_key(3), launch_key(1), launch_key(12)])
    assert keys[:3] == [launch_key(1), launch_key(3), launch_key(12)] and keys[3].startswith("j")


def _membership(
    store: dist.Store, key: str, joining: bool = False, min_ranks: int = 1, max_ranks: int = 1
) -> Membership:
    seconds = timedelta(seconds=1)
    return Membership(
        store,
        "test",
        key,
        min_ranks=min_ranks,
        max_ranks=max_ranks,
        heartbeat=seconds,
        last_call=seconds,
        join_timeout=timedelta(seconds=5),
        joining=joining,
    )


def test_one_member_forms_epoch_0_and_a_joiner_waits_until_it_is_admitted() -> None:
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    member = _membership(store, launch_key(0))
    epoch = member.next_epoch()
    assert (epoch.rank, epoch.members, epoch.joined) == (0, (launch_key(0),), ())
    assert member.tickets() == (0, 0)
    joiner_store = dist.TCPStore("127.0.0.1", port, is_master=False)  # another process's connection
    joiner = _membership(joiner_store, joiner_key(), joining=True)
    admitted = threading.Event()
    waiting = threading.Thread(target=lambda: (joiner.request_admission(), admitted.set()))
    waiting.start()
    while member.tickets() == (0, 0):
        pass
    assert not admitted.wait(0.5)  # it waits for the members
    requested, admitted_so_far = member.tickets()
    member.admit(admitted_so_far, requested)
    waiting.join(timeout=5)
    assert admitted.is_set() and member.tickets() == (1, 1)


def test_a_launched_rank_lost_while_the_job_starts_is_left_out_after_start_timeout_and_must_come_back_as_a_joiner():
    """Launched ranks 0 and 1 of 3 arrive, rank 2 never does (killed during its imports): after start_timeout the
    first epoch starts without it (at least min_ranks came); a launched rank 2 that comes later is refused naming
    the join command. With fewer than min_ranks present the start fails naming start_timeout."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    second = dist.TCPStore("127.0.0.1", port, is_master=False)
    start = timedelta(seconds=1)
    other = threading.Thread(target=lambda: _membership(second, launch_key(1)).await_launched(second, 1, 3, start))
    other.start()
    _membership(store, launch_key(0)).await_launched(store, 0, 3, start)  # returns after start_timeout
    other.join(timeout=10)
    late = dist.TCPStore("127.0.0.1", port, is_master=False)
    with pytest.raises(MembershipError, match=r"started without launched rank 2 .*LIGHTNING_DECENT_JOIN=1"):
        _membership(late, launch_key(2)).await_launched(late, 2, 3, start)
    alone = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    with pytest.raises(MembershipError, match=r"ranks \[1, 2\] did not start within 1s .*min_ranks=2"):
        _membership(alone, launch_key(0), min_ranks=2, max_ranks=3).await_launched(alone, 0, 3, start)


def test_a_joiner_that_is_never_admitted_fails_with_an_error_that_says_why() -> None:
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    joiner = Membership(
        store,
        "test",
        joiner_key(),
        min_ranks=1,
        max_ranks=2,
        heartbeat=timedelta(seconds=1),
        last_call=timedelta(seconds=1),
        join_timeout=timedelta(seconds=1),
        joining=True,
    )
    with pytest.raises(MembershipError, match="was not admitted within 1s: no member of the run reached the start"):
        joiner.request_admission()


def _hand_over(rank: int, queue: object) -> None:
    if rank == 0:
        state = {"state_dict": {"w": torch.arange(1000.0)}, "loops": {"epoch": 3}, "note": "donor"}
        queue.put(("sent", send_state(state, joiner=1)))
    else:
        state, size = receive_state(donor=0)
        queue.put(("received", (size, state["loops"], state["note"], float(state["state_dict"]["w"].sum()))))


def _long_named_collective(rank: int, queue: object) -> None:
    collectives = BoundedCollectives(rank, 2, timedelta(seconds=20))
    name = "agreement on the gossip step after a membership change (a name over 48 bytes)"
    queue.put(collectives.all_gather_object(rank, name))


@pytest.mark.slow
def test_the_handover_delivers_the_donors_checkpoint_and_counts_its_bytes() -> None:
    items = dict(run_gloo_world(_hand_over, 2, messages=2))
    size, loops, note, total = items["received"]
    assert size == items["sent"] > 4000
    assert (loops, note, total) == ({"epoch": 3}, "donor", float(sum(range(1000))))


@pytest.mark.slow
def test_a_collective_whose_name_is_longer_than_the_roll_call_field_runs() -> None:
    # The roll call sends 48 bytes of the name; it compared them with the whole name and so reported every rank
    # "elsewhere" for a long one.
    assert run_gloo_world(_long_named_collective, 2, messages=2) == [[0, 1], [0, 1]]


class _Gathered:
    """Collectives whose all-gather returns this rank's entry and the others' given ones."""

    world_size = 3

    def __init__(self, others: list) -> None:
        self.others = others

    def all_gather_object(self, obj: object, what: str) -> list:
        return [obj, *self.others]


def test_after_a_change_the_members_continue_from_the_fewest_steps_of_the_epoch_and_pad_it() -> None:
    from lightning_decent.uneven import EpochAlignment

    ahead = EpochAlignment(0)
    ahead.agreement.start_epoch(1, [10, 10, 10])
    ahead.agreement.steps_taken = ahead.agreement.real_steps = 7  # it noticed the loss one step later
    assert ahead.realign(gossip_step=27, collectives=_Gathered([(6, 20), None])) == 26  # base 20 + 6
    assert (ahead.agreement.steps_taken, ahead.agreement.realigned) == (6, True)
    for _ in range(3):  # its 3 remaining real steps, then one empty step ends the epoch with the others
        ahead.agreement.end_step(real=True)
    assert ahead.agreement.wants_empty_step()
    ahead.agreement.end_step(real=False)
    assert not ahead.agreement.wants_empty_step()
    joiner = EpochAlignment(3)
    assert joiner.realign(gossip_step=0, collectives=_Gathered([(6, 20)]), joining=True) == 0


def test_elastic_with_lightnings_own_launcher_is_refused_naming_how_to_launch() -> None:
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match=r"needs every rank started as its own process.*devices=1, num_nodes=N"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=DecentralizedStrategy(elastic=True), logger=False)
