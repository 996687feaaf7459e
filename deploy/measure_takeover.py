#!/usr/bin/env python3
"""Measures how long a dead node's deliveries wait before another node takes them over.

Against a cluster started by `deploy/cluster.sh start` with
BATON_ALLOW_HTTP_ENDPOINTS=true BATON_ALLOW_PRIVATE_ENDPOINTS=true, this script runs a
rest-hook receiver on 127.0.0.1:PORT, subscribes it to every Task change, and writes a
Task every --interval seconds to a node that is not about to be killed. For each run it
waits until notifications flow, finds the node holding the matcher lease (its /readyz says
"matcher": true; fresh events are delivered by the node that matched them), kills it with
SIGKILL, and times the kill to the next notification the receiver gets. Then it starts the
node again (`cluster.sh start-node K`) and goes on to the next run.

--delay makes the receiver answer each POST that many seconds late, so that a delivery
attempt (and its claim) is nearly always in flight; --kill delivery then kills the node
holding the subscription's delivery claim (read from PostgreSQL, `subscription.lease_holder`)
instead of the matcher: the worst case. It is the default when --delay is set.

    deploy/measure_takeover.py --runs 5              # a receiver that answers at once
    deploy/measure_takeover.py --runs 5 --delay 1    # every kill lands mid-attempt
"""

import argparse
import http.server
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

arrivals = []  # (time, notification type, subscription reference) of each POST received
arrivals_lock = threading.Lock()


def make_receiver(delay):
    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            now = time.time()
            kind = subscription = "?"
            try:
                bundle = json.loads(body)
                status = bundle["entry"][0]["resource"]
                for p in status.get("parameter", []):
                    if p.get("name") == "type":
                        kind = p.get("valueCode", "?")
                    elif p.get("name") == "subscription":
                        subscription = p["valueReference"]["reference"]
            except (ValueError, KeyError, IndexError, TypeError):
                pass
            with arrivals_lock:
                arrivals.append((now, kind, subscription))
            if delay > 0:
                time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    return Receiver


def request(method, url, token, body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/fhir+json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read() or b"null")


def readyz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=os.path.join(ROOT, "target", "cluster"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--delay", type=float, default=0.0, help="receiver answers this late (s)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between Task writes")
    ap.add_argument("--port", type=int, default=9999, help="the receiver's port")
    ap.add_argument("--kill", choices=["matcher", "delivery"],
                    help="the node to kill: the matcher lease's holder (default without --delay) "
                    "or the subscription's delivery claim's (default with --delay)")
    ap.add_argument("--give-up", type=float, default=120.0, help="seconds to wait per run")
    args = ap.parse_args()
    kill = args.kill or ("delivery" if args.delay > 0 else "matcher")

    env_file = os.path.join(args.run_dir, "cluster.env")
    with open(env_file) as f:
        recorded = f.read()
    binary = re.search(r'BINARY="([^"]*)"', recorded).group(1)
    database_url = re.search(r'DATABASE_URL="([^"]*)"', recorded).group(1)
    nodes = {}
    for name in os.listdir(args.run_dir):
        m = re.fullmatch(r"node-(\d+)\.port", name)
        if m:
            with open(os.path.join(args.run_dir, name)) as f:
                nodes[int(m.group(1))] = int(f.read())
    if len(nodes) < 2:
        sys.exit("need a running cluster of at least 2 nodes (deploy/cluster.sh start)")
    secret_file = os.path.join(args.run_dir, "jwt-secret")
    env = dict(os.environ)
    if "BATON_JWT_SECRET" not in env:
        with open(secret_file) as f:
            env["BATON_JWT_SECRET"] = f.read().strip()
    token = subprocess.run(
        [binary, "token", "--role", "admin"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), make_receiver(args.delay))
    threading.Thread(target=server.serve_forever, daemon=True).start()

    first = min(nodes)
    base = f"http://127.0.0.1:{nodes[first]}/fhir"
    code = f"takeover-{int(time.time())}"
    _, sub = request("POST", f"{base}/Subscription", token, {
        "resourceType": "Subscription", "status": "requested", "reason": "takeover measurement",
        "criteria": f"{base}/SubscriptionTopic/task-changed",
        "_criteria": {"extension": [{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
            "valueString": f"code={code}"}]},
        "channel": {"type": "rest-hook", "endpoint": f"http://127.0.0.1:{args.port}/hook",
                    "payload": "application/fhir+json",
                    "_payload": {"extension": [{
                        "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content",
                        "valueCode": "id-only"}]}},
    })
    print(f"subscription {sub['id']} on code {code}; receiver delay {args.delay}s, "
          f"a Task every {args.interval}s; killing the {kill} node", flush=True)

    def query(sql):
        return subprocess.run(["psql", "-X", "-Atq", database_url, "-c", sql],
                              check=True, capture_output=True, text=True).stdout

    def backlog():
        # Events counted and not yet delivered: the last run's outage must be caught up.
        out = query("SELECT events_since_start - delivered_through FROM subscription "
                    f"WHERE id = '{sub['id']}'")
        return int(out.strip() or 0)

    def delivering():
        # The node holding the subscription's delivery claim, if any.
        out = query(f"SELECT lease_holder FROM subscription WHERE id = '{sub['id']}' "
                    "AND lease_until > now()")
        m = re.fullmatch(r"node-(\d+)", out.strip())
        return int(m.group(1)) if m else None

    mine = f"Subscription/{sub['id']}"

    def notified_after(since):
        # This subscription's event notifications (an earlier run's may share the port).
        with arrivals_lock:
            return [t for t, kind, ref in arrivals
                    if t > since and kind == "event-notification" and ref.endswith(mine)]

    victim = [None]  # the node about to be killed, never written to
    stop = threading.Event()

    def writer():
        turn = 0
        while not stop.is_set():
            targets = [k for k in sorted(nodes) if k != victim[0]]
            k = targets[turn % len(targets)]
            turn += 1
            try:
                request("POST", f"http://127.0.0.1:{nodes[k]}/fhir/Task", token, {
                    "resourceType": "Task", "status": "requested", "intent": "order",
                    "code": {"coding": [{"system": "urn:takeover", "code": code}]}})
            except (urllib.error.URLError, OSError):
                pass  # a node restarting; the next write goes elsewhere
            stop.wait(args.interval)

    threading.Thread(target=writer, daemon=True).start()

    def flowing():
        # Notifications arrived lately.
        return bool(notified_after(time.time() - 1 - 2 * args.delay))

    results = []
    for run in range(1, args.runs + 1):
        deadline = time.time() + args.give_up
        while True:
            states = {k: readyz(p) for k, p in nodes.items()}
            holders = [k for k, s in states.items() if s and s.get("matcher")]
            if all(states.values()) and len(holders) == 1 and flowing() and backlog() < 20:
                break
            if time.time() > deadline:
                sys.exit(f"run {run}: no steady flow with one matcher: {holders}")
            time.sleep(0.2)
        if kill == "matcher":
            k = holders[0]
            victim[0] = k
            time.sleep(1.0 + (run % 5) * 0.37)  # spread the kill over the renewal cycle
        else:
            time.sleep(1.0 + (run % 5) * 0.37)
            while (k := delivering()) is None:
                if time.time() > deadline:
                    sys.exit(f"run {run}: no node holds the delivery claim")
                time.sleep(0.05)
            victim[0] = k
        with open(os.path.join(args.run_dir, f"node-{k}.pid")) as f:
            pid = int(f.read())
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        taken = None
        while time.time() < killed + args.give_up:
            after = notified_after(killed)
            if after:
                taken = min(after) - killed
                break
            time.sleep(0.05)
        if taken is None:
            sys.exit(f"run {run}: nothing arrived within {args.give_up}s of killing node-{k}")
        new = [j for j, p in nodes.items() if j != k and (readyz(p) or {}).get("matcher")]
        results.append(taken)
        print(f"run {run}: killed node-{k} ({kill}{', also matcher' if kill == 'delivery' and k in holders else ''}); "
              f"next notification after {taken:.2f} s; "
              f"matcher now node-{new[0] if new else '?'}", flush=True)
        subprocess.run([os.path.join(HERE, "cluster.sh"), "start-node", str(k), "--run-dir",
                        args.run_dir], check=True, stdout=subprocess.DEVNULL)
        victim[0] = None

    stop.set()
    request("DELETE", f"{base}/Subscription/{sub['id']}", token)
    print(f"{len(results)} runs: min {min(results):.2f} s, median "
          f"{statistics.median(results):.2f} s, max {max(results):.2f} s", flush=True)


if __name__ == "__main__":
    main()
