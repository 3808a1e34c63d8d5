"""netem in user space, for kernels built without it: delay, jitter and loss on every packet of a netfilter queue.

``tc qdisc ... netem`` is the tool (benchmarks/netns.py uses it where the kernel has ``sch_netem``), but some
kernels are built without it (CONFIG_NET_SCH_NETEM unset: ``tc`` answers "Specified qdisc kind is unknown"). Such
a kernel may still have iptables' NFQUEUE target, which hands each packet to a user-space program for a verdict.
This is that program, on the NetfilterQueue library (PyPI ``NetfilterQueue``, over libnetfilter_queue): it holds
every packet of its queue for ``delay ± jitter`` ms (uniform, as netem's default; a later packet may overtake an
earlier one, as with netem) and drops ``loss`` percent of them at random. It asks the kernel for the packets'
metadata only (``COPY_META``: a verdict needs the packet's id, never its bytes), keeps each ``Packet`` past its
callback in a heap ordered by release time, and accepts it when due; the library documents such deferred
verdicts (``retain()`` is only for reading a payload later, which we never do). It runs in the network namespace
whose iptables rules send packets to its queue (`Network.impair` starts it there):

    ip netns exec NS python -m benchmarks.netem_queue --queue 0 --delay-ms 40 --jitter-ms 10 --loss 5

It prints "ready" once bound, then runs until SIGTERM. The rules should carry ``--queue-bypass``, so packets pass
untouched while no program listens. Being a process on a busy machine, it adds its own scheduling delay (well
under a millisecond on an idle core, more on a loaded one) to what is asked.

Loss is decided here too, not by an iptables rule (``-m statistic --mode random --probability P -j DROP`` ahead
of the NFQUEUE rule, which this kernel would take). Both drop each packet independently with the same probability,
as netem does, so neither is more faithful; this is simpler: the whole impairment is this one process, so stopping
it gives a clean link back (``--queue-bypass``) with no DROP rules to track, order and delete, ``--seed`` makes the
losses reproducible (the kernel's draw cannot be seeded), and the command line and ``Impairment`` stay one
description of the link. What it costs, queuing the few packets it then drops, is nothing at these rates.
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: benchmarks/netns.py imports Impairment where the library may be missing
    from netfilterqueue import Packet

QUEUE_MAXLEN = 8192  # packets held at once; beyond it the kernel drops (counted as loss, as a full link would)
RCVBUF = 8 << 20  # bytes of queued packets' metadata the socket holds before the kernel drops


@dataclass(frozen=True)
class Impairment:
    """What each packet crossing the link suffers, in each direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # the delay is uniform in delay ± jitter (never below 0)
    loss_pct: float = 0.0  # share of packets dropped, 0..100

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss_pct <= 100:
            raise ValueError(f"delay and jitter must be >= 0 and loss in [0, 100], got {self}")

    @property
    def none(self) -> bool:
        return self.delay_ms == self.jitter_ms == self.loss_pct == 0

    def hold_s(self, rng: random.Random) -> float | None:
        """How long to hold one packet, in seconds; None: drop it."""
        if self.loss_pct and rng.random() * 100 < self.loss_pct:
            return None
        return max(0.0, self.delay_ms + rng.uniform(-self.jitter_ms, self.jitter_ms)) / 1000


def run(number: int, impairment: Impairment, seed: int | None = None) -> None:
    """Bind netfilter queue ``number``, print "ready", then hold, release and drop its packets until SIGTERM."""
    from netfilterqueue import COPY_META, NetfilterQueue

    rng = random.Random(seed)
    held: list[tuple[float, int, Packet]] = []  # (release time, packet id: unique, breaks ties, packet)
    stopping = False

    def release_due() -> None:
        now = time.monotonic()
        while held and held[0][0] <= now:
            heapq.heappop(held)[2].accept()

    def arrived(packet: Packet) -> None:
        hold = impairment.hold_s(rng)
        if hold is None:
            packet.drop()
        elif hold == 0:
            packet.accept()
        else:
            heapq.heappush(held, (time.monotonic() + hold, packet.id, packet))
        release_due()  # also while a burst keeps the socket busy

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    queue = NetfilterQueue()
    queue.bind(number, arrived, max_len=QUEUE_MAXLEN, mode=COPY_META, sock_len=RCVBUF)
    print("ready", flush=True)
    try:
        while not stopping:
            timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
            readable, _, _ = select.select([queue.get_fd()], [], [], timeout)
            if readable:
                queue.run(block=False)  # every packet waiting now, through ``arrived``
            release_due()
        for _, _, packet in held:  # let what is held go on leaving: the link is being restored, not cut
            packet.accept()
    finally:
        queue.unbind()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queue", type=int, required=True, help="the netfilter queue number the iptables rules use")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="percent of packets dropped")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    run(args.queue, Impairment(args.delay_ms, args.jitter_ms, args.loss), args.seed)
    sys.exit(0)


if __name__ == "__main__":
    main()
