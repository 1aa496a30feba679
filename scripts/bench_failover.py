#!/usr/bin/env python3
"""Failover and rolling-restart figures of a running 3-node cluster (scripts/bench --nodes 3).

failover: --kills times, kill -9 the node leading a chosen shard while one writer sends an
event of that shard every 10 ms through another node; the time from the kill to the first
event of the shard answered `applied`. The node is started again and the cluster left to
settle (leadership handed home) before the next kill.

rolling restart: SIGTERM each node in turn (wait for it to exit, start it, wait for /healthz),
while one writer sends batches with an event of every shard through a node that is not being
restarted; the longest time between two consecutive batches whose events all applied.

Usage: bench_failover.py --config FILE --binary PATH --nodes 1=PID,2=PID,3=PID
           --urls URL,URL,URL [--kills 5] [--out FILE]
Prints a table and writes JSON. Ends only the processes it started.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from benchlib import call, wait_for as wait


def wait_for(what, predicate, seconds=60):
    return wait("bench_failover", what, predicate, seconds)


class Cluster:
    def __init__(self, args):
        self.config, self.binary = args.config, args.binary
        self.urls = args.urls.split(",")
        self.pids = {int(k): int(v) for k, v in (p.split("=") for p in args.nodes.split(","))}
        self.started = {}  # node id -> Popen, for the processes this script started
        self.log_dir = os.path.dirname(os.path.abspath(args.config))

    def url(self, node):
        return self.urls[node - 1]

    def leaders(self, via):
        status, view = call(self.url(via), "/v1/cluster")
        if status != 200:
            return {}
        return {s["id"]: s["leader"] for s in view["shards"] if s["leader"] is not None}

    def healthy(self, node):
        return call(self.url(node), "/healthz")[0] == 200

    def agreed(self):
        """Every shard has one leader, the one every node names."""
        views = [call(self.url(n), "/v1/cluster")[1] for n in self.pids]
        if any(v is None for v in views):
            return None
        leaders = {}
        for view in views:
            for shard in view["shards"]:
                leaders.setdefault(shard["id"], set()).add(shard["leader"])
        if any(len(l) != 1 or None in l for l in leaders.values()):
            return None
        return {s: next(iter(l)) for s, l in leaders.items()}

    def settle(self):
        """Waits until the nodes agree and leadership has stayed put for 4 s (a leader elected
        away from a shard's placed node hands leadership home 3 s after it wins)."""
        deadline = time.monotonic() + 120
        stable, last = 0, None
        while stable < 4:
            if time.monotonic() > deadline:
                sys.exit("bench_failover: the cluster did not settle within 120 s")
            now = self.agreed()
            stable = stable + 1 if now is not None and now == last else 0
            last = now
            time.sleep(1)

    def kill9(self, node):
        os.kill(self.pids[node], signal.SIGKILL)
        self.reap(node)

    def terminate(self, node):
        os.kill(self.pids[node], signal.SIGTERM)
        self.reap(node)

    def reap(self, node):
        process = self.started.pop(node, None)
        if process is not None:
            process.wait()
        else:
            wait_for(f"node {node} to exit", lambda: not alive(self.pids[node]))

    def start(self, node):
        log = open(os.path.join(self.log_dir, f"node-{node}.log"), "a")
        process = subprocess.Popen([self.binary, "--config", self.config, "--node", str(node)],
                                   stderr=log, env={**os.environ, "RUST_LOG": "warn"})
        self.started[node], self.pids[node] = process, process.pid
        wait_for(f"node {node} to be healthy", lambda: self.healthy(node))

    def stop_started(self):
        for process in self.started.values():
            process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            process.wait()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of the shell that started it counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def customers_by_shard(cluster, shards_wanted):
    """One customer (phone) per shard, made by sending it an event."""
    found, n = {}, 0
    while len(found) < shards_wanted and n < 10_000:
        phone = f"1390000{n:04d}"
        event = {"event_id": f"fo-seed-{n}", "type": "points_earn",
                 "identities": {"phone": phone}, "points": 1}
        status, answer = call(cluster.url(1), "/v1/events", [event])
        if status == 200 and answer["results"][0]["status"] in ("applied", "duplicate"):
            oneid = answer["results"][0]["oneid"]
            shard = int(oneid[1:5], 16)
            found.setdefault(shard, phone)
        n += 1
    return found


def earn(phone, tag):
    return {"event_id": tag, "type": "points_earn", "identities": {"phone": phone}, "points": 1}


def failover(cluster, customers, kills):
    times = []
    shards = sorted(customers)
    for k in range(kills):
        shard = shards[k % len(shards)]
        leader = cluster.leaders(1)[shard]
        via = next(n for n in sorted(cluster.pids) if n != leader)
        cluster.kill9(leader)
        killed = time.monotonic()
        n = 0
        while True:
            status, answer = call(cluster.url(via), "/v1/events",
                                  [earn(customers[shard], f"fo-{k}-{n}")])
            n += 1
            if status == 200 and answer["results"][0]["status"] == "applied":
                times.append(time.monotonic() - killed)
                break
            if time.monotonic() - killed > 60:
                sys.exit(f"bench_failover: shard {shard} took no write within 60 s")
            time.sleep(0.01)
        cluster.start(leader)
        cluster.settle()
    return times


def rolling_restart(cluster, customers):
    phones = [customers[s] for s in sorted(customers)]
    longest, n = 0.0, 0
    for node in sorted(cluster.pids):
        via = next(m for m in sorted(cluster.pids) if m != node)
        last_ok = time.monotonic()
        restarting = True
        done = {"stopped": False}

        def restart():
            cluster.terminate(node)
            done["stopped"] = True

        worker = threading.Thread(target=restart)
        worker.start()
        # Writes while the node stops, then while it starts and catches up (4 s more).
        until = None
        while restarting:
            batch = [earn(p, f"rr-{n}-{i}") for i, p in enumerate(phones)]
            n += 1
            status, answer = call(cluster.url(via), "/v1/events", batch)
            now = time.monotonic()
            if status == 200 and answer["applied"] == len(batch):
                longest = max(longest, now - last_ok)
                last_ok = now
            if done["stopped"] and until is None:
                worker.join()
                cluster.start(node)
                until = time.monotonic() + 4
            if until is not None and time.monotonic() >= until:
                restarting = False
        longest = max(longest, time.monotonic() - last_ok)
        cluster.settle()
    return longest


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--binary", required=True)
    parser.add_argument("--nodes", required=True)
    parser.add_argument("--urls", required=True)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    cluster = Cluster(args)
    try:
        cluster.settle()
        n_shards = len(cluster.leaders(1))
        customers = customers_by_shard(cluster, n_shards)
        times = failover(cluster, customers, args.kills)
        stall = rolling_restart(cluster, customers)
    finally:
        cluster.stop_started()
    result = {
        "failover_kills": len(times),
        "failover_seconds": times,
        "failover_min_seconds": min(times),
        "failover_median_seconds": statistics.median(times),
        "failover_max_seconds": max(times),
        "rolling_restart_longest_stall_seconds": stall,
    }
    print(f"failover, {len(times)} kills of a shard's leader: min {min(times):.2f} s, "
          f"median {statistics.median(times):.2f} s, max {max(times):.2f} s (target <= 3 s)")
    print(f"rolling restart of all 3 nodes: longest write stall {stall:.2f} s (target <= 2 s)")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
