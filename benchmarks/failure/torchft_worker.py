"""One machine of a failure-schedule run of torchft 0.2.0: DDP (``--system torchft_ddp``: the Manager's
fault-tolerant all-reduce of the gradients every step, :func:`average_gradients`) or DiLoCo
(``--system torchft_diloco``), every machine its own replica group of one process, the Lighthouse elsewhere.

``python -m benchmarks.failure.torchft_worker --system ... --out DIR --machine M --address A --lighthouse URL``

The same digits workload as :mod:`benchmarks.failure.lightning_worker`; machine ``m`` trains on shard ``m`` of
``--machines`` (torchft's replica groups keep their shards; a lost group's shard is not seen while it is down).
The step counter is the Manager's, so a restarted replica that healed from a live one continues the others'
data order. Machine 0 evaluates the model every ``steps per epoch`` committed steps (DiLoCo: right after an outer
sync, where the model is the global one). A launched (not restarted) replica waits for ``DIR/go`` before it
creates its Manager, so that the first quorum has every replica.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.failure.events import EventLog
from lightning_decent.recipes.digits import DigitsDataModule, digits_cnn

TORCHFT_PORTS = 3  # store, manager, spare


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["torchft_ddp", "torchft_diloco"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--machine", type=int, required=True)
    parser.add_argument("--machines", type=int, default=8)
    parser.add_argument("--address", required=True, help="this machine's address")
    parser.add_argument("--port", type=int, default=29900)
    parser.add_argument("--lighthouse", required=True, help="http://host:port of the Lighthouse")
    parser.add_argument("--restarted", action="store_true", help="a restarted machine: do not wait for DIR/go")
    parser.add_argument("--min-replicas", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a collective waits")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    return parser.parse_args()


def shard(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This machine's training images and labels (shard ``machine`` of ``machines``) and the validation set."""
    data = DigitsDataModule()
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    images, labels = data.train_set.tensors
    return images[args.machine :: args.machines], labels[args.machine :: args.machines], *data.val_set.tensors


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    correct = (net(images).argmax(1) == labels).float().mean()
    net.train()
    return float(correct)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    log = EventLog(args.out / "events.jsonl", args.machine)
    log.write("start", system=args.system, restart=int(args.restarted))
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo
    from torchft.optim import OptimizerWrapper

    logging.getLogger("torchft").setLevel(logging.WARNING)
    images, labels, val_images, val_labels = shard(args)
    steps_per_epoch = math.ceil(len(labels) / args.batch)
    torch.manual_seed(0)
    net = digits_cnn(width=32, hidden=args.hidden)
    inner = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    while not args.restarted and not (args.out / "go").exists():
        time.sleep(0.1)
    store_port, manager_port = args.port, args.port + 1
    store = torch.distributed.TCPStore(args.address, store_port, is_master=True, wait_for_workers=False)

    def state_dict() -> dict[str, Any]:
        return {"model": net.state_dict(), "optimizer": inner.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        net.load_state_dict(state["model"])
        inner.load_state_dict(state["optimizer"])

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=args.timeout)),
        checkpoint_transport=transport(args.address, timedelta(seconds=args.timeout)),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=args.min_replicas,
        use_async_quorum=False,
        timeout=timedelta(seconds=args.timeout),
        quorum_timeout=timedelta(seconds=120),
        rank=0,
        world_size=1,
        store_addr=args.address,
        store_port=store_port,
        lighthouse_addr=args.lighthouse,
        replica_id=f"machine{args.machine}",
        port=manager_port,
        hostname=args.address,
        init_sync=False,
    )
    diloco = args.system == "torchft_diloco"
    optimizer: Any = inner if diloco else OptimizerWrapper(manager, inner)
    context: Any = None
    if diloco:
        outer = torch.optim.SGD(net.parameters(), lr=args.outer_lr, momentum=args.outer_momentum, nesterov=True)
        context = DiLoCo(manager, [net], inner, outer, sync_every=steps_per_epoch, pin_memory=False)
        context.__enter__()
    order = torch.Generator()
    try:
        while True:
            step = _step(manager, context, steps_per_epoch)
            epoch, index = divmod(step, steps_per_epoch)
            if epoch >= args.epochs:
                break
            order.manual_seed(epoch)
            batch = torch.randperm(len(labels), generator=order)[index * args.batch : (index + 1) * args.batch]
            optimizer.zero_grad()  # DDP: the step's quorum
            F.cross_entropy(net(images[batch]), labels[batch]).backward()
            if not diloco:
                average_gradients(manager, net)
            optimizer.step()  # DDP: commits if the quorum's all-reduce succeeded; DiLoCo: its hook syncs every H
            done = _step(manager, context, steps_per_epoch)
            log.step(done, manager.num_participants())
            if args.machine == 0 and done > step and done % steps_per_epoch == 0:
                acc = accuracy(net, val_images, val_labels)
                log.write("eval", acc=acc, epoch=done // steps_per_epoch, step=done, world=manager.num_participants())
    finally:
        if context is not None:
            context.__exit__(None, None, None)
        manager.shutdown(wait=False)
        del store


def transport(address: str, timeout: timedelta) -> Any:
    """torchft's HTTP checkpoint transport (its default), advertised at this machine's ``address``: 0.2.0 advertises
    ``socket.gethostname()``, which in a network namespace names the host's address, not this machine's, so a
    recovering replica's fetch is refused (``<urlopen error [Errno 111] Connection refused>``)."""
    from torchft.checkpointing import HTTPTransport

    class AddressedTransport(HTTPTransport):
        def address(self) -> str:
            return super().address().replace(f"//{socket.gethostname()}:", f"//{address}:", 1)

    return AddressedTransport(timeout=timeout, num_chunks=0)


def average_gradients(manager: Any, net: nn.Module) -> None:
    """The gradients averaged over the quorum with ``Manager.allreduce`` in one flat buffer (what torchft's
    ``DistributedDataParallel`` does through its communication hook, which in 0.2.0 fails with an
    ``AssertionError`` instead of reporting the error when a peer is lost: ``assert fut._fut`` in ``_comm_hook``).
    A failed all-reduce is reported to the Manager, and the step is not committed."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    manager.allreduce(flat).wait()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _step(manager: Any, diloco: Any, steps_per_epoch: int) -> int:
    """Training steps so far: the Manager's committed steps (DDP), or its committed outer syncs of one epoch of
    inner steps each plus DiLoCo's inner steps since the last one."""
    if diloco is None:
        return manager.current_step()
    return manager.current_step() * steps_per_epoch + diloco._local_step


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(format="%(asctime)s %(message)s")
    main()
