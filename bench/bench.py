"""Benchmark of autoheal: start autoheal.py as its own process and measure it against its budget.

    python3 bench/bench.py            5 runs of every figure (about 3 minutes)
    python3 bench/bench.py --quick    1 short run of every figure (under a minute), for the test suite
    python3 bench/bench.py --runs 3
    python3 bench/bench.py --replicas  the replica figures (a real 3-member etcd on loopback, Debian's etcd-server)

Two ways of starting are measured. "script": python3 autoheal.py, the README's command, which
compiles the whole file at every start. "image": python -m autoheal from bytecode compiled
beforehand, exactly as the Dockerfile runs it. The load figures are
taken on the image form.

Workload (issue 8): an action map of 1,000 alertnames with cooldown_sec 0, dry-run, the global
action budget off, the state file where the default configuration puts it (so every decision is
recorded as in production); the server pinned to CPU 0 and the load generator to CPU 1
(taskset), so that they do not compete. Load comes from wrk (Debian's package) when present,
else from a Python generator (slower: its figures are marked).

Standard library only. autoheal runs on a plain interpreter: a virtual environment of the
Python running this script, made without pip, as a container would have it (a pyenv shim adds
about 50 ms to every start, and site-packages' .pth files more).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
AUTOHEAL = HERE.parent / "autoheal.py"
ALERTNAMES = [f"BenchAlert{index:04d}" for index in range(1000)]
COORDINATION_POLL_SEC = 0.25  # autoheal's: a replica reads the shared state this often
PYTHON = sys.executable  # replaced by the plain interpreter of a virtual environment in main()

# figure, unit, budget, True when higher is better
BUDGETS = {
    "cold start to first 200, script": ("ms", 70, False),
    "cold start to first 200, image": ("ms", 70, False),
    "idle resident memory, script": ("MiB", 20, False),
    "idle resident memory, image": ("MiB", 20, False),
    "POST /alert req/s, state file": ("req/s", 6000, True),
    "POST /alert p99, state file": ("ms", 6, False),
    "POST /alert req/s, memory only": ("req/s", 7500, True),
    "POST /alert p99, memory only": ("ms", 6, False),
    "one POST of 5,000 alerts": ("ms", 60, False),
    "GET /metrics, 1,000 alertnames": ("ms", 5, False),
    "resident memory after all": ("MiB", 30, False),
    "--check, whole process (script)": ("ms", 40, False),
    "--check, whole process (image)": ("ms", 40, False),
    "SIGTERM to exit, idle": ("ms", 100, False),
    # A fleet (issue 31): one action with cooldown_by ["instance"] and 100,000 targets in cooldown.
    "fleet: memory of 100,000 targets": ("MiB", 80, False),
    "fleet: POST of one more target": ("ms", 5, False),
    "fleet: GET /metrics, 100,000 targets": ("ms", 5, False),
    "fleet: /metrics bytes added by them": ("B", 100, False),
    "fleet: start, 100,000 in the state file": ("ms", 1000, False),
}
FLEET_TARGETS = 100_000


def pinned(cpu: int) -> list:
    """A taskset prefix pinning a command to one CPU, when taskset and that CPU exist."""
    if shutil.which("taskset") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu)]
    return []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raw_get(port: int, path: str, timeout: float = 2.0) -> tuple:
    """GET over a raw socket: (status, body); status 0 when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
            chunks = []
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return 0, b""
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0, body


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """autoheal started for one run, pinned to CPU 0, in a working directory of its own.

    image=True starts it as the Dockerfile does: python -m autoheal from a directory holding
    autoheal.py and its compiled bytecode (the malloc arena limit is autoheal's own now).
    """

    def __init__(self, workdir: Path, state: bool, image: bool = True, extra: dict = None):
        self.port = free_port()
        self.workdir = workdir
        env = {"PATH": os.environ["PATH"], "AUTOHEAL_HOST": "127.0.0.1", "AUTOHEAL_PORT": str(self.port),
               "AUTOHEAL_ACTIONS_FILE": str(workdir / "actions.json"), "AUTOHEAL_MAX_ACTIONS_PER_HOUR": "0",
               "AUTOHEAL_ALERTMANAGER_TIMEOUT_SEC": "1"}
        if not state:
            env["AUTOHEAL_STATE_FILE"] = ""
        env.update(extra or {})
        command = [PYTHON, str(AUTOHEAL)]
        if image:
            command = [PYTHON, "-m", "autoheal"]
            workdir = workdir / "app"
        self.env = env
        self.started = time.perf_counter()
        self.process = subprocess.Popen(pinned(0) + command, cwd=workdir, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while time.time() < deadline:
            if raw_get(self.port, "/", timeout=0.5)[0] == 200:
                self.ready = time.perf_counter()
                return
            if self.process.poll() is not None:
                raise SystemExit(f"autoheal exited: {self.process.stderr.read().decode()}")
            time.sleep(0.001)
        raise SystemExit("autoheal did not answer within 20 s")

    def stop(self) -> float:
        """SIGTERM; milliseconds until the process has exited."""
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        return (time.perf_counter() - started) * 1000


def alert_body(alertnames: list) -> bytes:
    alerts = [{"status": "firing", "labels": {"alertname": name, "severity": "critical", "instance": "crm-api:8000"},
               "annotations": {"autoheal": "true", "summary": "bench"}, "startsAt": "2026-11-28T16:47:26.913Z",
               "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "", "fingerprint": "666d2cad1d47bd80"}
              for name in alertnames]
    return json.dumps({"version": "4", "status": "firing", "receiver": "autoheal", "groupLabels": {},
                       "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am",
                       "alerts": alerts}).encode()


WRK_SCRIPT = """
local bodies = {}
local index = 0
init = function(args)
  for i = 0, 999 do
    bodies[i] = string.format('%s', '__BODY__'):gsub('__NAME__', string.format('BenchAlert%04d', i))
  end
end
request = function()
  index = (index + 1) % 1000
  return wrk.format("POST", "/alert", {["Content-Type"] = "application/json"}, bodies[index])
end
"""


def load_with_wrk(port: int, seconds: float, workdir: Path) -> tuple:
    """16 keep-alive connections for seconds: (requests/s, p99 ms, non-2xx count)."""
    template = alert_body(["__NAME__"]).decode().replace("\\", "\\\\").replace("'", "\\'")
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT.replace("__BODY__", template))
    done = subprocess.run(pinned(1) + ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-s", str(script),
                                       f"http://127.0.0.1:{port}/alert"], capture_output=True, text=True)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", done.stdout)
    scale = {"us": 0.001, "ms": 1, "s": 1000}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", done.stdout)
    return rate, float(p99.group(1)) * scale, int(errors.group(1)) if errors else 0


def read_answer(stream) -> bytes:
    """Read one HTTP answer (its Content-Length body) from a keep-alive stream: its status line."""
    status = stream.readline()
    length = 0
    for line in iter(stream.readline, b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    stream.read(length)
    return status


def load_with_python(port: int, seconds: float) -> tuple:
    """The fallback generator: 16 threads, keep-alive sockets (it, not autoheal, is the limit)."""
    bodies = [alert_body([name]) for name in ALERTNAMES]
    latencies: list = []
    errors = [0]
    stop_at = time.perf_counter() + seconds

    def client(offset: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")
        index = offset
        mine = []
        while time.perf_counter() < stop_at:
            body = bodies[index % 1000]
            index += 16
            started = time.perf_counter()
            sock.sendall(b"POST /alert HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            status = read_answer(stream)
            mine.append(time.perf_counter() - started)
            if b" 200 " not in status:
                errors[0] += 1
        latencies.extend(mine)
        sock.close()

    threads = [threading.Thread(target=client, args=(offset,)) for offset in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return len(latencies) / seconds, latencies[int(len(latencies) * 0.99)] * 1000, errors[0]


def one_post_ms(port: int, body: bytes) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(b"POST /alert HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        answer = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            answer += chunk
        elapsed = (time.perf_counter() - started) * 1000
    if b" 200 " not in answer.split(b"\r\n", 1)[0]:
        raise SystemExit(f"the 5,000-alert POST failed: {answer[:300]!r}")
    return elapsed


def check_ms(port: int, app: Path = None) -> float:
    """One probe, the whole process: python3 autoheal.py --check (script), or from app's bytecode
    python -m autoheal --check, as the image's HEALTHCHECK runs it."""
    env = {"PATH": os.environ["PATH"], "AUTOHEAL_PORT": str(port)}
    command = [PYTHON, "-m", "autoheal", "--check"] if app else [PYTHON, str(AUTOHEAL), "--check"]
    started = time.perf_counter()
    done = subprocess.run(pinned(1) + command, env=env, capture_output=True, cwd=app)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise SystemExit(f"--check failed: {done.stderr.decode()}")
    return elapsed


def prepare(workdir: Path, actions: dict) -> None:
    """The working directory of a run: the action map, and autoheal.py compiled as the image has it."""
    (workdir / "actions.json").write_text(json.dumps({"actions": actions}))
    (workdir / "app").mkdir()
    shutil.copy(AUTOHEAL, workdir / "app" / "autoheal.py")
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(workdir / "app")], check=True)


def fleet_body(first: int, count: int) -> bytes:
    """count alerts of FleetAlert, each a target of its own (instance host-<n>:9100)."""
    return json.dumps({"version": "4", "alerts": [
        {"status": "firing", "labels": {"alertname": "FleetAlert", "instance": f"host-{n:06d}:9100"},
         "annotations": {"autoheal": "true"}} for n in range(first, first + count)]}, separators=(",", ":")).encode()


def fleet_run() -> dict:
    """100,000 targets of one per-target action put in cooldown (dry-run: the claims and the
    cooldown starts are the same), 5,000 to a webhook: the memory they take above the idle
    figure, what one more target's webhook costs then, /metrics (its time, and that it does not
    grow), and a start that reads them back from the state file."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="autoheal-fleet-") as name:
        workdir = Path(name)
        prepare(workdir, {"FleetAlert": {"command": ["true"], "cooldown_sec": 86400, "cooldown_by": ["instance"]}})
        server = Server(workdir, True)
        try:
            time.sleep(1)
            idle = resident_mib(server.process.pid)
            before = raw_get(server.port, "/metrics")[1]
            for first in range(0, FLEET_TARGETS, 5000):
                one_post_ms(server.port, fleet_body(first, 5000))
            time.sleep(0.5)  # the quiet moment's housekeeping (a heap trim) has run
            figures["fleet: memory of 100,000 targets"] = resident_mib(server.process.pid) - idle
            status = json.loads(raw_get(server.port, "/")[1])
            assert status["cooldowns"]["FleetAlert"]["targets_total"] == FLEET_TARGETS, status["cooldowns"]
            figures["fleet: POST of one more target"] = statistics.median(
                one_post_ms(server.port, fleet_body(FLEET_TARGETS + n, 1)) for n in range(20))
            timings = []
            for _ in range(20):
                started = time.perf_counter()
                after = raw_get(server.port, "/metrics")[1]
                timings.append((time.perf_counter() - started) * 1000)
            figures["fleet: GET /metrics, 100,000 targets"] = statistics.median(timings)
            figures["fleet: /metrics bytes added by them"] = len(after) - len(before)
        finally:
            server.stop()
        server = Server(workdir, True)
        try:
            figures["fleet: start, 100,000 in the state file"] = (server.ready - server.started) * 1000
            status = json.loads(raw_get(server.port, "/")[1])
            assert status["cooldowns"]["FleetAlert"]["targets_total"] >= FLEET_TARGETS, status["cooldowns"]
        finally:
            server.stop()
    return figures


def start_etcd(folder: Path) -> tuple:
    """A 3-member etcd cluster on loopback: (its processes, the client URLs)."""
    clients, peers = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{port}" for port in clients]
    cluster = ",".join(f"e{i}=http://127.0.0.1:{port}" for i, port in enumerate(peers))
    processes = [subprocess.Popen(
        ["etcd", "--name", f"e{i}", "--data-dir", str(folder / f"e{i}"), "--listen-client-urls", urls[i],
         "--advertise-client-urls", urls[i], "--listen-peer-urls", f"http://127.0.0.1:{peers[i]}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peers[i]}", "--initial-cluster", cluster,
         "--initial-cluster-state", "new", "--initial-cluster-token", f"b{clients[0]}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True) for i in range(3)]
    deadline = time.time() + 30
    while time.time() < deadline:
        if all(raw_get(int(url.rsplit(":", 1)[1]), "/health")[0] == 200 for url in urls):
            return processes, urls
        time.sleep(0.2)
    raise SystemExit("etcd did not start")


def etcd_requests(urls: list) -> collections.Counter:
    """The requests every member has handled (gRPC, which its HTTP gateway goes through), by
    method (Txn, LeaseGrant, ...)."""
    counts: collections.Counter = collections.Counter()
    for url in urls:
        text = raw_get(int(url.rsplit(":", 1)[1]), "/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith("grpc_server_handled_total{") and 'grpc_type="unary"' in line:
                method = line.partition('grpc_method="')[2].partition('"')[0]
                counts[method] += float(line.rsplit(" ", 1)[1])
    return counts


def latencies_ms(port: int, count: int, names: list) -> list:
    """count single-alert webhooks, one after the other on one connection: each one's time."""
    timings = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")
        for index in range(count):
            body = alert_body([names[index % len(names)]])
            started = time.perf_counter()
            sock.sendall(b"POST /alert HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            status = read_answer(stream)
            timings.append((time.perf_counter() - started) * 1000)
            if b" 200 " not in status:
                raise SystemExit(f"a webhook failed: {status!r}")
    return timings


def replica_run(count: int = 300) -> dict:
    """Live webhooks (enabled, not dry-run: each runs true), single-alert, every alertname a new
    cooldown claim: against one process, then against a replica whose claims go to a real
    3-member etcd on loopback.  The etcd requests per webhook, p50 and p99 of both, and the time
    to judge a 10-alert webhook (10 new claims) on the replica."""
    figures = {}
    with tempfile.TemporaryDirectory(prefix="autoheal-replicas-") as name:
        workdir = Path(name)
        prepare(workdir, {alertname: {"command": ["true"], "cooldown_sec": 3600} for alertname in ALERTNAMES})
        live = {"AUTOHEAL_ENABLED": "true", "AUTOHEAL_DRY_RUN": "false"}
        server = Server(workdir, True, extra=live)
        try:
            single = latencies_ms(server.port, count, ALERTNAMES)
        finally:
            server.stop()
        for path in workdir.glob("autoheal-state.db*"):
            path.unlink()
        processes, urls = start_etcd(workdir)
        try:
            server = Server(workdir, True, extra={**live, "AUTOHEAL_ETCD_ENDPOINTS": ",".join(urls),
                                                  "AUTOHEAL_REPLICA": "bench"})
            try:
                time.sleep(1.5)  # its first polls of the shared state are done
                before = etcd_requests(urls)
                replica = latencies_ms(server.port, count, ALERTNAMES)
                time.sleep(COORDINATION_POLL_SEC * 2)  # the run records of the last webhooks go with a poll
                polls_before = etcd_requests(urls)
                time.sleep(2)
                after = etcd_requests(urls)
                spent = sum(replica) / 1000 + COORDINATION_POLL_SEC * 2
                for method in ("Txn", "LeaseGrant", "requests"):  # requests: all of them
                    made = [sum(counts.values()) if method == "requests" else counts[method]
                            for counts in (before, polls_before, after)]
                    polling = (made[2] - made[1]) / 2  # per second, when idle
                    figures[f"replicas: etcd {method} per webhook"] = (made[1] - made[0] - polling * spent) / count
                ten = alert_body(ALERTNAMES[count:count + 10])
                figures["replicas: judge a 10-alert webhook"] = one_post_ms(server.port, ten)
            finally:
                server.stop()
        finally:
            for process in processes:
                process.kill()
                process.wait()
    for label, timings in (("one process", single), ("replica", replica)):
        timings.sort()
        figures[f"live POST p50, {label}"] = timings[len(timings) // 2]
        figures[f"live POST p99, {label}"] = timings[int(len(timings) * 0.99)]
    return figures


def one_run(quick: bool, use_wrk: bool) -> dict:
    figures = {}
    seconds = 2 if quick else 10
    with tempfile.TemporaryDirectory(prefix="autoheal-bench-") as name:
        workdir = Path(name)
        prepare(workdir, {alertname: {"command": ["true"], "cooldown_sec": 0} for alertname in ALERTNAMES})
        server = Server(workdir, True, image=False)
        figures["cold start to first 200, script"] = (server.ready - server.started) * 1000
        time.sleep(1)
        figures["idle resident memory, script"] = resident_mib(server.process.pid)
        figures["--check, whole process (script)"] = statistics.median(check_ms(server.port) for _ in range(5))
        figures["--check, whole process (image)"] = statistics.median(
            check_ms(server.port, workdir / "app") for _ in range(5))
        server.stop()
        for path in workdir.glob("autoheal-state.db*"):
            path.unlink()
        for state in (True, False):
            server = Server(workdir, state)
            try:
                if state:
                    figures["cold start to first 200, image"] = (server.ready - server.started) * 1000
                    time.sleep(1)
                    figures["idle resident memory, image"] = resident_mib(server.process.pid)
                label = "state file" if state else "memory only"
                if use_wrk:
                    rate, p99, errors = load_with_wrk(server.port, seconds, workdir)
                else:
                    rate, p99, errors = load_with_python(server.port, seconds)
                if errors:
                    raise SystemExit(f"{errors} requests failed under load")
                figures[f"POST /alert req/s, {label}"] = rate
                figures[f"POST /alert p99, {label}"] = p99
                if state:
                    # Minimal alerts, so that 5,000 fit the default 1 MiB body limit (about 500 KB).
                    big = json.dumps({"version": "4", "alerts": [
                        {"status": "firing", "labels": {"alertname": name}, "annotations": {"autoheal": "true"}}
                        for name in (ALERTNAMES * 5)[:5000]]}, separators=(",", ":")).encode()
                    figures["one POST of 5,000 alerts"] = statistics.median(one_post_ms(server.port, big) for _ in range(3))
                    timings = []
                    for _ in range(20):
                        started = time.perf_counter()
                        status, body = raw_get(server.port, "/metrics")
                        timings.append((time.perf_counter() - started) * 1000)
                        assert status == 200 and body.count(b"\n") > 10000
                    figures["GET /metrics, 1,000 alertnames"] = statistics.median(timings)
                    figures["resident memory after all"] = resident_mib(server.process.pid)
            finally:
                server.stop()
        # The SIGTERM figure wants an idle server: measure it on a fresh one.
        server = Server(workdir, True)
        time.sleep(0.5)
        figures["SIGTERM to exit, idle"] = server.stop()
    figures.update(fleet_run())
    return figures


REPLICA_BUDGETS = {
    # One claim transaction per webhook; above it, amortised: a lease grant per half second of
    # webhooks, and the latest runs of a poll's webhooks written together with that poll.
    "replicas: etcd requests per webhook": ("requests", 1.1, False),
    "replicas: etcd Txn per webhook": ("txn", 1.1, False),
    "replicas: etcd LeaseGrant per webhook": ("grants", 0.1, False),
    "live POST p50, one process": ("ms", 10, False),
    "live POST p50, replica": ("ms", 20, False),
    "live POST p99, one process": ("ms", 20, False),
    "live POST p99, replica": ("ms", 40, False),
    "replicas: judge a 10-alert webhook": ("ms", 60, False),
}


def print_table(budgets: dict, results: list) -> tuple:
    """Each figure's median and spread over the runs beside its budget: (the summary, how many missed)."""
    print(f"{'figure':38} {'median':>9} {'spread':>17} {'budget':>12}  verdict")
    missed = 0
    summary = {}
    for figure, (unit, budget, higher) in budgets.items():
        values = [run[figure] for run in results]
        median = statistics.median(values)
        ok = median >= budget if higher else median <= budget
        missed += not ok
        summary[figure] = {"median": median, "min": min(values), "max": max(values), "budget": budget, "unit": unit}
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"{figure:38} {median:>9.2f} {spread:>17} {('>= ' if higher else '<= ') + str(budget):>9} {unit:8} "
              f"{'ok' if ok else 'MISSED'}")
    return summary, missed


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()} x {model}, Python {sys.version.split()[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short run (under a minute)")
    parser.add_argument("--runs", type=int, default=None, help="runs of every figure (default 5, 1 with --quick)")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even with wrk")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--replicas", action="store_true", help="the replica figures only (needs etcd)")
    options = parser.parse_args()
    runs = options.runs or (1 if options.quick else 5)
    global PYTHON
    environment = Path(tempfile.mkdtemp(prefix="autoheal-bench-venv-"))
    venv.create(environment, with_pip=False, symlinks=True)
    PYTHON = str(environment / "bin" / "python")
    use_wrk = bool(shutil.which("wrk")) and not options.python_load
    if options.replicas:
        budgets, results = REPLICA_BUDGETS, [replica_run() for _ in range(runs)]
        print(f"autoheal replica benchmark: {runs} run(s), 300 live single-alert webhooks each; {machine()}")
    else:
        budgets, results = BUDGETS, [one_run(options.quick, use_wrk) for _ in range(runs)]
        print(f"autoheal benchmark: {runs} run(s){' (quick)' if options.quick else ''}, load from "
              f"{'wrk' if use_wrk else 'the Python generator (a lower bound for req/s)'}; {machine()}")
    summary, missed = print_table(budgets, results)
    if options.json:
        Path(options.json).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(environment, ignore_errors=True)
    print(f"{len(budgets) - missed} within budget, {missed} missed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
