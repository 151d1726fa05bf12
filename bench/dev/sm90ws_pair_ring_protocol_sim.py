"""Randomised schedules of the mbarrier protocol of the sm90_ws BSA forward (pair tiles, one K ring and
one V ring shared by both consumers; csrc/bsa_fwd_sm90_ws.cu, csrc/NOTES.md v10 and v12: v10 had 3 + 3
stages, v12 has K 2 / V 4, the defaults here; ``--k-stages/--v-stages`` model others).

A model, not the kernel: a K producer and a V producer (warps 0 and 1) walk the ring positions of
``PairSched`` (tile k of consumer c at 2k + c while both lists have tiles, then the longer list's
rest), two consumers take their own tiles in the kernel's overlapped order (wait K_k and V_{k-1},
read K_k, release it, read V_{k-1}, release it; V of the last tile at the end). Barriers follow the
PTX parity semantics (``try_wait.parity(P)`` is true once the current phase's parity differs from
P), TMA loads land at random later times. Checks that no schedule deadlocks and that each
consumer reads each of its tiles after it landed and before the slot is refilled.

``--design shared`` models one full barrier per stage with the parity of the ring position: a
consumer whose slot's previous fill belonged to the other consumer and has not landed sees a
barrier two phases behind, whose parity equals the one it waits for, and reads a tile still
loading (the phase aliasing found on the device in session 10). ``--design per_consumer`` (the
kernel): full barriers per (stage, consumer), one parity bit per stage and consumer flipping with
the consumer's own tiles.

    python bench/dev/sm90ws_pair_ring_protocol_sim.py [--design per_consumer|shared] [--schedules 4000]
        [--k-stages 2 --v-stages 4]
"""

from __future__ import annotations

import argparse
import random
import sys


class Bar:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _chk(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def arrive(self):
        assert self.pending > 0
        self.pending -= 1
        self._chk()

    def expect_tx(self, b):
        self.tx += b
        self.arrive()

    def complete_tx(self, b):
        self.tx -= b
        assert self.tx >= 0
        self._chk()

    def try_wait(self, par):
        return (self.phase & 1) != par


def positions(n0, n1):
    """ring order: list of (consumer, tile) as PairSched lays them out"""
    m = [(n0 + 1) // 2, (n1 + 1) // 2]
    mn, longer = min(m), (0 if m[0] >= m[1] else 1)
    order = []
    for k in range(mn):
        order += [(0, k), (1, k)]
    order += [(longer, k) for k in range(mn, m[longer])]
    return order


def run(n0, n1, stages, seed, design):
    """stages: {'K': ring stages of K, 'V': of V}"""
    rnd = random.Random(seed)
    order = positions(n0, n1)
    pos_of = {ck: p for p, ck in enumerate(order)}
    nb = 2 if design == "per_consumer" else 1
    full = {kind: [[Bar(1) for _ in range(nb)] for _ in range(stages[kind])] for kind in "KV"}
    empty = {kind: [Bar(1) for _ in range(stages[kind])] for kind in "KV"}  # the owner's arrives, as one
    smem = {kind: [None] * stages[kind] for kind in "KV"}
    inflight = []

    def producer(kind):
        for p, (c, _) in enumerate(order):
            ns = stages[kind]
            s = p % ns
            if p >= ns:
                while not empty[kind][s].try_wait(((p // ns) & 1) ^ 1):
                    yield
            full[kind][s][c if nb == 2 else 0].expect_tx(1)
            smem[kind][s] = ("loading", p)
            inflight.append((kind, s, p, c if nb == 2 else 0))
            yield

    def consumer(c):
        tiles = [k for (cc, k) in order if cc == c]
        ph = {kind: [0] * stages[kind] for kind in "KV"}

        def wait(kind, p):
            s = p % stages[kind]
            if nb == 2:
                par = ph[kind][s]
                ph[kind][s] ^= 1
            else:
                par = (p // stages[kind]) & 1
            while not full[kind][s][c if nb == 2 else 0].try_wait(par):
                yield

        def read(kind, p):
            s = p % stages[kind]
            assert smem[kind][s] == ("ready", p), (c, kind, p, smem[kind][s])

        prev = None
        for k in tiles:
            p = pos_of[(c, k)]
            yield from wait("K", p)
            if prev is not None:
                yield from wait("V", prev)
            read("K", p)
            yield
            read("K", p)
            empty["K"][p % stages["K"]].arrive()
            if prev is not None:
                read("V", prev)
                yield
                read("V", prev)
                empty["V"][prev % stages["V"]].arrive()
            prev = p
            yield
        if prev is not None:
            yield from wait("V", prev)
            read("V", prev)
            empty["V"][prev % stages["V"]].arrive()

    actors = [producer("K"), producer("V"), consumer(0), consumer(1)]
    live = list(range(len(actors)))
    steps = 0
    while live or inflight:
        steps += 1
        if steps > 200000:
            raise AssertionError("deadlock")
        if inflight and (not live or rnd.random() < 0.3):
            kind, s, p, b = inflight.pop(rnd.randrange(len(inflight)))
            smem[kind][s] = ("ready", p)
            full[kind][s][b].complete_tx(1)
            continue
        i = rnd.choice(live)
        try:
            next(actors[i])
        except StopIteration:
            live.remove(i)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--design", choices=("per_consumer", "shared"), default="per_consumer")
    ap.add_argument("--schedules", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k-stages", type=int, default=2, help="K ring stages (the kernel: 2)")
    ap.add_argument("--v-stages", type=int, default=4, help="V ring stages (the kernel: 4)")
    a = ap.parse_args(argv)
    rnd = random.Random(a.seed)
    fails = 0
    for i in range(a.schedules):
        n0, n1 = rnd.randint(0, 13), rnd.randint(0, 13)
        try:
            run(n0, n1, {"K": a.k_stages, "V": a.v_stages}, rnd.randrange(1 << 30), a.design)
        except AssertionError as e:
            fails += 1
            if fails <= 3:
                print(f"schedule {i} (lists {n0}, {n1}): {e}")
    print(f"{a.design}, K {a.k_stages} / V {a.v_stages} stages: {a.schedules - fails} of {a.schedules} schedules clean")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
