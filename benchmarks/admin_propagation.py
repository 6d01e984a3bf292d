"""How fast an admin change reaches every data-plane process of --workers 2.

    .venv/bin/python benchmarks/admin_propagation.py [--rounds 10]

Adds a worker with POST /workers and removes it with DELETE, again and
again, and reads the log (--log-level debug) for when the control plane
registered it and when each data-plane process did the same. Reports, per
round: control plane ready -> last process routing to it; DELETE sent ->
last process dropped it. Log timestamps have millisecond resolution.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from helpers import GatewayProcess, request, wait_for  # noqa: E402

from smg.testing import FakeWorker  # noqa: E402


def stamp(line: str) -> float:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    a = FakeWorker("127.0.0.1", 0).start()
    b = FakeWorker("127.0.0.1", 0).start()
    g = GatewayProcess(["--workers", str(args.processes), "--log-level", "debug", "--worker-urls", a.url])
    added = re.compile(r".*Registered worker: %s.*" % re.escape(b.url))
    removed = re.compile(r".*\[DEBUG\].*Removed worker: %s.*" % re.escape(b.url))
    adds, removes = [], []
    try:
        g.wait_live()
        g.wait_ready_workers(1)
        for i in range(args.rounds):
            wid = g.post("/workers", {"url": b.url}).json()["worker_id"]
            wait_for(lambda: len(added.findall(g.logs())) >= (args.processes + 1) * (i + 1))
            lines = added.findall(g.logs())[-(args.processes + 1):]
            control = [stamp(line) for line in lines if "[INFO]" in line][0]
            adds.append(max(stamp(line) for line in lines if "[DEBUG]" in line) - control)
            sent = time.time()
            request(g.port, "DELETE", f"/workers/{wid}")
            wait_for(lambda: len(removed.findall(g.logs())) >= args.processes * (i + 1))
            removes.append(max(stamp(line) for line in removed.findall(g.logs())[-args.processes:]) - sent)
            wait_for(lambda: all(w["url"] != b.url for w in g.workers()))
    finally:
        g.stop()
        a.stop()
        b.stop()
    print(f"{args.processes} data-plane processes, {args.rounds} rounds")
    print("added: control plane ready -> every process has it, ms:", [round(x * 1000, 1) for x in sorted(adds)])
    print("removed: DELETE sent -> every process dropped it, ms:", [round(x * 1000, 1) for x in sorted(removes)])


if __name__ == "__main__":
    main()
