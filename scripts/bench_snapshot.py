#!/usr/bin/env python3
"""A snapshot's transfer and install on a 3-node cluster (scripts/bench --nodes 3).

Starts its own cluster (1 shard, replication 3, log_retain_entries 1000), loads --profiles
profiles (one order each, through `oneid bench --scenario profiles`), kills node 3 with -9,
writes 2000 single-event requests through node 1 (past the 1000 retained entries and the 64
compacted at once), then starts node 3 again: it is behind the leader's compacted log, so it
catches up by snapshot. Samples every 0.2 s, from the restart until node 3 installed the
snapshot and agrees with the leader: the RSS of the holder (node 1) and the receiver (node 3),
and what node 3's /v1/cluster says of the snapshot coming in.

Usage: bench_snapshot.py --binary PATH --cli PATH --dir DIR [--profiles 1000000] [--out FILE]
Prints a summary and writes JSON. Ends only the processes it started.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from benchlib import call, wait_for as wait


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def wait_for(what, predicate, seconds):
    return wait("bench_snapshot", what, predicate, seconds)


class Cluster:
    def __init__(self, binary, directory):
        self.binary, self.dir = binary, directory
        os.makedirs(directory, exist_ok=True)
        self.config = os.path.join(directory, "cluster.toml")
        self.urls, self.processes = {}, {}
        secret = os.urandom(16).hex()
        text = (f'[cluster]\nshards = 1\nreplication = 3\nlog_retain_entries = 1000\n'
                f'secret = "{secret}"\n\n')
        for node in (1, 2, 3):
            api = free_port()
            self.urls[node] = f"http://127.0.0.1:{api}"
            text += (f'[[nodes]]\nid = {node}\napi = "127.0.0.1:{api}"\n'
                     f'peer = "127.0.0.1:{free_port()}"\ndata = "{directory}/data-{node}"\n\n')
        with open(self.config, "w") as out:
            out.write(text)

    def start(self, node):
        log = open(os.path.join(self.dir, f"node-{node}.log"), "a")
        env = {**os.environ, "RUST_LOG": os.environ.get("ONEID_BENCH_LOG", "warn,oneid_node::snapshots=info,oneid_node::replica=info")}
        self.processes[node] = subprocess.Popen(
            [self.binary, "--config", self.config, "--node", str(node)], stderr=log, env=env)

    def healthy(self, node):
        return call(self.urls[node], "/healthz")[0] == 200

    def kill9(self, node):
        self.processes[node].send_signal(signal.SIGKILL)
        self.processes.pop(node).wait()

    def stop(self):
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            process.wait()

    def shard(self, node):
        status, view = call(self.urls[node], "/v1/cluster")
        return (view["shards"][0], view.get("snapshots", [])) if status == 200 else (None, [])

    def installed(self, node):
        status, text = call(self.urls[node], "/metrics")
        if status != 200:
            return 0
        found = re.search(r"^oneid_snapshots_installed_total (\d+)", text, re.M)
        return int(found.group(1)) if found else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--cli", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--out")
    args = parser.parse_args()
    cluster = Cluster(os.path.abspath(args.binary), os.path.abspath(args.dir))
    try:
        for node in (1, 2, 3):
            cluster.start(node)
        for node in (1, 2, 3):
            wait_for(f"node {node} to be healthy", lambda: cluster.healthy(node), 60)
        loaded_at = time.monotonic()
        subprocess.run([args.cli, "--server", cluster.urls[1], "bench", "--scenario", "profiles",
                        "--profiles", str(args.profiles), "--sample-every", str(args.profiles),
                        "--out", os.path.join(args.dir, "profiles.json")],
                       check=True, stdout=subprocess.DEVNULL)
        load_seconds = time.monotonic() - loaded_at
        cluster.kill9(3)
        for n in range(2000):
            event = {"event_id": f"snap-{n}", "type": "points_earn",
                     "identities": {"phone": f"15{n:09d}"}, "points": 1}
            status, _ = call(cluster.urls[1], "/v1/events", [event])
            if status != 200:
                sys.exit(f"bench_snapshot: a write through node 1 answered {status}")
        leader, _ = cluster.shard(1)
        if 3 not in leader["needs_snapshot"]:
            sys.exit(f"bench_snapshot: node 3 does not need a snapshot: {leader}")
        holder_pid = cluster.processes[1].pid
        restarted = time.monotonic()
        cluster.start(3)
        samples, seen_in, bytes_in = [], None, 0
        deadline = restarted + 600
        while True:
            now = time.monotonic()
            if now > deadline:
                sys.exit("bench_snapshot: node 3 did not catch up within 600 s")
            mine, snapshots = cluster.shard(3)
            coming = [s for s in snapshots if s["direction"] == "in"]
            if coming:
                seen_in = seen_in or now
                bytes_in = max(bytes_in, coming[0]["bytes"])
            samples.append({"seconds": round(now - restarted, 2),
                            "holder_rss_mib": rss_mib(holder_pid),
                            "receiver_rss_mib": rss_mib(cluster.processes[3].pid),
                            "receiving_bytes": coming[0]["bytes"] if coming else None})
            leader, _ = cluster.shard(1)
            if (cluster.installed(3) >= 1 and mine is not None and leader is not None
                    and mine["applied_index"] == leader["applied_index"]
                    and mine["digest"] == leader["digest"]):
                caught_up = now - restarted
                break
            time.sleep(0.2)
    finally:
        cluster.stop()
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(os.path.join(args.dir, "node-3.log")).read())
    staged = re.findall(r"snapshot received and staged.*?bytes=(\d+) seconds=([\d.]+)", log)
    staged_bytes, staged_seconds = (int(staged[-1][0]), float(staged[-1][1])) if staged else (None, None)
    installed = re.findall(r"snapshot installed \(seconds from the start of its fetch\).*?seconds=([\d.]+)", log)
    install_seconds = float(installed[-1]) - staged_seconds if installed and staged else None
    holder = [s["holder_rss_mib"] for s in samples if s["holder_rss_mib"]]
    receiver = [s["receiver_rss_mib"] for s in samples if s["receiver_rss_mib"]]
    result = {
        "profiles": args.profiles,
        "load_seconds": load_seconds,
        "snapshot_bytes": staged_bytes,
        "transfer_seconds": staged_seconds,
        "install_seconds": install_seconds,
        "restart_to_caught_up_seconds": caught_up,
        "holder_rss_mib": {"first": holder[0], "min": min(holder), "max": max(holder),
                           "last": holder[-1]},
        "receiver_rss_mib": {"min": min(receiver), "max": max(receiver), "last": receiver[-1]},
        "samples": samples,
    }
    mib = (staged_bytes or 0) / 1048576
    print(f"snapshot of a shard of {args.profiles} profiles ({mib:.0f} MiB of pairs): fetched, "
          f"staged, verified and made durable in {staged_seconds:.1f} s, installed in "
          f"{install_seconds:.3f} s more; node 3 caught up {caught_up:.1f} s after its restart "
          f"(which includes opening its own store after kill -9)")
    print(f"RSS during it: holder {min(holder):.0f}..{max(holder):.0f} MiB (at restart "
          f"{holder[0]:.0f}), receiver {min(receiver):.0f}..{max(receiver):.0f} MiB")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
