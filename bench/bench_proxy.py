#!/usr/bin/env python3
"""Egress proxy benchmark: what the door and the proxy add to a request, and what they weigh.

    python bench/bench_proxy.py [--quick] [--keep]

Everything is real and on loopback: a TLS upstream (tests/proxy_upstreams.py, TCP_NODELAY) on a
127.x.y.z address, the project's proxy (daemons/proxy/serve.py: mitmproxy with the addon, listening on each
door itself) and, standing in for the one inside a bottle, a guest-side socat relay from 127.0.0.1 to the
door's Unix socket. So a proxied request goes

    client -> guest relay (TCP) -> door (Unix socket) -> proxy + addon -> upstream

and the same client also talks to the same upstream directly. The client is Python's http.client
(CONNECT tunnel via set_tunnel, TCP_NODELAY), the same code on every route, so its own cost is in
both columns and cancels out of the difference. Routes are measured in turn within each repetition,
so a load change on the machine hits them alike; figures are the median over repetitions of each
repetition's median, with the range of those medians.

    keep-alive request    one connection, one untimed warm-up request, then N sequential GETs
    new connection        each GET on a new connection (through the door: CONNECT, two TLS
                          handshakes, the proxy's upstream connection)
    first streamed event  on a warm connection, GET of a server-sent event stream whose first event
                          is sent at once and the next one a second later: time until the first
                          event is read (a buffering proxy would show a second or more)
    memory                VmRSS of the proxy, and of the guest-side socat relays (inside bottles in
                          real use), with 1 bottle and with 20 bottles (20 doors, one request
                          through each), and after the whole workload

Then where the keep-alive time goes: the same requests over two socat hops without a proxy, and to
the proxy without the addon (same options otherwise, on a TCP listener), with the CPU each process used
per request (utime + stime from /proc, relays' exited connection children included). Then another
bottle's keep-alive requests before and while one bottle holds 300 silent connections to its door (the
refused ones, the processes made, the proxy's open files). Last, curl with many URLs in one
invocation, offering HTTP/2 (curl's default, like git's libcurl) or HTTP/1.1 only, with the upstream
connections each run made, through the door and through a proxy without the addon with and without
`http2=false`. Then a bound secret (issue 23): keep-alive requests of a bottle whose rules bind a secret to the
upstream, each carrying its placeholder in the Authorization header, which the proxy replaces by the value (and
whose responses it scans for the value), against the same requests of a bottle without secrets carrying a token
of the same length; the target is the first within 10% of the second. The targets are printed beside the
figures; missing one does not fail the bench.

It runs as root, like the tests: the upstream listens on port 443, the only HTTPS port the proxy
reaches. mitmproxy's environment is made once in the user cache (or $BOTTLE_TEST_CACHE, as the tests
do); the first time needs PyPI.
"""
from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemons.lifecycle import Daemon  # noqa: E402
from daemons.proxy.control import EgressProxy, ProxyError, ensure_venv, write_rules  # noqa: E402
from tasks.cache import cache_dir  # noqa: E402
from tests.proxy_upstreams import GuestRelay, Upstream, make_upstream_ca, random_loopback_address  # noqa: E402

CACHE_ENV = 'BOTTLE_TEST_CACHE'
LOOPBACK = '127.0.0.1'
TIMEOUT = 30.0
BOTTLES = 20
TARGET_KEEP_ALIVE_MS = 2.0
TARGET_NEW_CONNECTION_MS = 15.0
TARGET_MEMORY_MB = 150.0
BUFFERED_SECONDS = 0.5      # the second event comes 1 s after the first: slower means held back
TARGET_SECRET_RATIO = 1.10  # a request with a bound secret put in, against one of a bottle without secrets
SECRET = 'BENCH_TOKEN'
PLACEHOLDER = 'cbp-BENCH_TOKEN-0123456789abcdef01234567'


class BenchFailure(Exception):
    """A request that did not get its answer, or a process that would not start."""


@dataclass
class Shape:
    reps: int                  # repetitions of each measurement (fewer when `budget` runs out)
    keep_alive: int            # timed requests per keep-alive connection
    new_connections: int       # connections per repetition
    events: int                # first-event measurements per repetition
    curl_urls: int             # URLs per curl invocation
    curl_reps: int
    budget: float              # seconds per measurement, after its first repetition


QUICK = Shape(reps=3, keep_alive=50, new_connections=8, events=2, curl_urls=30, curl_reps=2, budget=20)
FULL = Shape(reps=7, keep_alive=200, new_connections=25, events=3, curl_urls=100, curl_reps=3, budget=90)


@dataclass
class Route:
    """How a client reaches the upstream, and which processes' CPU is charged to it."""
    name: str
    kind: str                  # 'direct', 'proxy' (CONNECT to 127.0.0.1:port) or 'relay' (raw TCP relay)
    port: int
    context: ssl.SSLContext
    pids: dict[str, Callable[[], list[int]]] = field(default_factory=dict)    # role -> pids
    headers: dict[str, str] = field(default_factory=dict)                      # sent with every request


class RelayedHTTPS(http.client.HTTPSConnection):
    """TLS with the upstream (its address for SNI and the certificate check) over a TCP connection
    to a raw relay on 127.0.0.1:port."""

    def __init__(self, address: str, relay_port: int, context: ssl.SSLContext):
        super().__init__(address, 443, timeout=TIMEOUT, context=context)
        self.relay_port = relay_port
        self.tls_context = context

    def connect(self):
        sock = socket.create_connection((LOOPBACK, self.relay_port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


def open_connection(route: Route, address: str) -> http.client.HTTPSConnection:
    if route.kind == 'proxy':
        connection = http.client.HTTPSConnection(LOOPBACK, route.port, timeout=TIMEOUT, context=route.context)
        connection.set_tunnel(address, 443)
        return connection
    if route.kind == 'relay':
        return RelayedHTTPS(address, route.port, route.context)
    return http.client.HTTPSConnection(address, 443, timeout=TIMEOUT, context=route.context)


def get(connection: http.client.HTTPSConnection, path: str, headers: dict[str, str] | None = None) -> bytes:
    connection.request('GET', path, headers=headers or {})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise BenchFailure(f'GET {path} answered {response.status}: {body[:500]!r}')
    return body


# --- the measurements: each returns one repetition's samples, in seconds ------------------------

def keep_alive(route: Route, address: str, count: int) -> list[float]:
    connection = open_connection(route, address)
    try:
        get(connection, '/warm-up')          # connection set-up and the proxy's upstream connection
        times = []
        for i in range(count):
            start = time.perf_counter()
            get(connection, f'/keep-alive/{i}', route.headers)
            times.append(time.perf_counter() - start)
        return times
    finally:
        connection.close()


def new_connections(route: Route, address: str, count: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        connection = open_connection(route, address)
        try:
            get(connection, f'/new-connection/{i}')
        finally:
            connection.close()
        times.append(time.perf_counter() - start)
    return times


def first_events(route: Route, address: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        connection = open_connection(route, address)
        try:
            get(connection, '/warm-up')
            start = time.perf_counter()
            connection.request('GET', '/events')
            line = connection.getresponse().readline()
            times.append(time.perf_counter() - start)
        finally:
            connection.close()       # the upstream's later events go nowhere; it is told to be quiet
        if line != b'data: event 1\n':
            raise BenchFailure(f'{route.name}: the event stream began with {line!r}')
    return times


@dataclass
class Series:
    """One measurement on one route: the samples of each repetition and the CPU used."""
    reps: list[list[float]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)      # role -> CPU seconds over all reps

    @property
    def medians(self) -> list[float]:
        return [statistics.median(samples) for samples in self.reps]

    @property
    def median(self) -> float:
        return statistics.median(self.medians)

    @property
    def samples(self) -> int:
        return sum(len(samples) for samples in self.reps)

    def cpu_per_sample(self, role: str) -> float | None:
        return self.cpu[role] / self.samples if role in self.cpu and self.samples else None


def interleaved(routes: list[Route], measure: Callable[[Route], list[float]], reps: int, budget: float,
                log: Callable[[str], None], what: str) -> dict[str, Series]:
    """`reps` repetitions, each measuring every route in turn; no new repetition starts once
    `budget` seconds have passed (the first always runs)."""
    series = {route.name: Series() for route in routes}
    deadline = time.monotonic() + budget
    for rep in range(reps):
        if rep and time.monotonic() > deadline:
            log(f'{what}: time budget spent after {rep} of {reps} repetitions')
            break
        for route in routes:
            before = {role: cpu_seconds(pids()) for role, pids in route.pids.items()}
            samples = measure(route)
            if route.pids:
                time.sleep(0.1)              # the relays reap the connection's child
            for role, pids in route.pids.items():
                entry = series[route.name]
                entry.cpu[role] = entry.cpu.get(role, 0.0) + cpu_seconds(pids()) - before[role]
            series[route.name].reps.append(samples)
    return series


def added(series: dict[str, Series], route: str, base: str = 'direct') -> tuple[float, float, float]:
    """Median, min and max over repetitions of (route's median - base's median) in that repetition."""
    differences = [r - b for r, b in zip(series[route].medians, series[base].medians)]
    return statistics.median(differences), min(differences), max(differences)


# --- processes: CPU and memory from /proc -------------------------------------------------------

TICKS = os.sysconf('SC_CLK_TCK')


def stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/<pid>/stat (field n at index n - 3)."""
    with open(f'/proc/{pid}/stat') as stat:
        return stat.read().rsplit(')', 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of each process, of its reaped children (cutime + cstime) and of its living
    children: socat relays fork one child per connection."""
    pids = set(pids)
    ticks = 0
    for entry in os.scandir('/proc'):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = stat_fields(pid)
        except (OSError, IndexError):
            continue
        if pid in pids:
            ticks += sum(int(f) for f in fields[11:15])
        elif int(fields[1]) in pids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) of one process, in kB."""
    with open(f'/proc/{pid}/status') as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith('VmRSS:'))
    with open(f'/proc/{pid}/smaps_rollup') as rollup:
        pss = next(int(line.split()[1]) for line in rollup if line.startswith('Pss:'))
    return rss, pss


@dataclass
class Memory:
    label: str
    host_total: float          # MB: the proxy's RSS, all the host runs for the doors
    guest_relays_rss: float


def memory(label: str, proxy: EgressProxy, guests: list[GuestRelay]) -> Memory:
    proxy_rss, _ = memory_kb(proxy.daemon().pid())
    return Memory(label, proxy_rss / 1024, sum(memory_kb(relay.process.pid)[0] for relay in guests) / 1024)


# --- the pieces not in the product: a proxy without the addon, two relays without a proxy -------

def plain_proxy(proxy: EgressProxy, venv: Path, state_dir: Path, port: int,
                   *settings: str) -> tuple[Daemon, Path]:
    """The project's proxy process (serve.py) with its options (plus `settings`, each `name=value`)
    but without the fence addon (and so no bottles), listening on `port`, with a CA of the same kind
    made by the project's CA maker; and that CA's certificate."""
    confdir = state_dir / 'ca'
    try:
        EgressProxy(state_dir, venv).ensure_ca()        # in state_dir/ca
    except ProxyError as err:
        raise BenchFailure(f'making a CA in {confdir} failed: {err}') from None
    python, serve, *kept = proxy.daemon().argv
    replaced = ('bottle_doors', 'bottle_secrets', 'confdir', 'mode', *(s.split('=', 1)[0] for s in settings))
    kept = [s for s in kept if s.split('=', 1)[0] not in replaced]
    run_without_fence = (f'import asyncio, sys; sys.path.insert(0, {str(Path(serve).parent)!r}); import serve; '
                         'sys.exit(asyncio.run(serve.serve(sys.argv[1:], [])))')
    argv = [python, '-c', run_without_fence, *kept, f'confdir={confdir}', f'mode=regular@{LOOPBACK}:{port}',
            *settings]
    return Daemon('plain-proxy', state_dir, argv, lambda: port_accepts(port)), confdir / 'mitmproxy-ca-cert.pem'


def port_accepts(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True
    except OSError:
        return False


def raw_host_relay(door: Path, address: str) -> Daemon:
    """The host relay's socat line, to the upstream instead of the proxy."""
    door.parent.mkdir(parents=True, exist_ok=True)
    return Daemon('raw-relay', door.parent.parent, [
        shutil.which('socat'), f'UNIX-LISTEN:{door},fork,unlink-early,perm=0600', f'TCP:{address}:443,nodelay'],
        door.exists)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# --- curl: many URLs in one invocation ----------------------------------------------------------

def curl_run(address: str, urls: int, proxy_port: int | None, ca_cert: Path, extra: list[str],
             upstream: Upstream) -> tuple[list[float], str, int]:
    """Per-transfer time_total of all transfers but the first (which sets the connection up), the
    HTTP versions curl spoke, and the upstream connections the run made."""
    before = upstream.connections
    marker = 'TRANSFER'
    proxy_args = ['--proxy', f'http://{LOOPBACK}:{proxy_port}'] if proxy_port else []
    proc = subprocess.run(['curl', '-sS', '--max-time', '120', *proxy_args, '--cacert', str(ca_cert), *extra,
                           '-w', f'{marker} %{{time_total}} %{{http_version}}\\n',
                           *[f'https://{address}/curl/{i}' for i in range(urls + 1)]],
                          capture_output=True, text=True, timeout=180)
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or len(lines) != urls + 1:
        raise BenchFailure(f'curl {" ".join(proxy_args + extra)} exited {proc.returncode} after {len(lines)} '
                           f'transfers: {proc.stderr[-1000:]}')
    versions = ','.join(sorted({line[2] for line in lines}))
    return [float(line[1]) for line in lines[1:]], versions, upstream.connections - before


# --- the bench ---------------------------------------------------------------------------------

@dataclass
class Results:
    latency: dict[str, dict[str, Series]] = field(default_factory=dict)    # measure -> route -> series
    memory: list[Memory] = field(default_factory=list)
    curl: list[tuple[str, list[float], str, int]] = field(default_factory=list)
    proxy_requests: int = 0        # lines in the bottles' logs: one per request
    flood: Flood | None = None
    secret: dict[str, Series] = field(default_factory=dict)     # keep-alive, without and with a bound secret


@dataclass
class Flood:
    """Another bottle's keep-alive requests before and while one bottle holds FLOOD connections to its door."""
    calm: Series
    flooded: Series
    held: int                      # of the FLOOD connections, the ones the door took
    answered: int                  # the ones refused with a 503 (the rest: closed past the bound on refusals)
    proxy_children: int            # processes the proxy made meanwhile
    proxy_fds: tuple[int, int]     # the proxy's open files before and during


FLOOD = 300


def hold_connections(door: Path, count: int) -> tuple[list[socket.socket], int, int]:
    """`count` connections to the door, held open and silent (half-open, as a hostile guest holds them); how
    many the door took, and how many of the others it answered 503 (the rest it closed unanswered)."""
    connections = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(door))
        connections.append(sock)
    time.sleep(3)          # past doors.REFUSAL_SECONDS: every refusal is done
    held = answered = 0
    for sock in connections:
        sock.setblocking(False)
        try:
            answered += sock.recv(12) == b'HTTP/1.1 503'
        except BlockingIOError:
            held += 1
        except OSError:
            pass
    return connections, held, answered


def children_of(pid: int) -> int:
    return sum(1 for entry in os.scandir('/proc') if entry.name.isdigit() and _parent(int(entry.name)) == pid)


def _parent(pid: int) -> int | None:
    try:
        return int(stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def bench(tmp: Path, shape: Shape, log: Callable[[str], None]) -> Results:
    results = Results()
    venv = ensure_venv(Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else cache_dir())
    address = random_loopback_address()
    upstream_ca, cert, key = make_upstream_ca(tmp, address)
    try:
        upstream = Upstream(address, cert, key)
    except PermissionError:
        raise BenchFailure(f'cannot listen on {address}:443: run the bench as root') from None
    upstream.server.handle_error = lambda request, client_address: None   # streams the client left
    proxy = EgressProxy(tmp / 'egress', venv, upstream_ca=upstream_ca)
    rules = {'hosts': [{'host': address}], 'allow_private': [f'{address}/32']}
    guests: list[GuestRelay] = []
    daemons: list[Daemon] = []
    try:
        log('starting the proxy and bottle b00 ...')
        bottle_dirs = []
        proxy_context = ssl.create_default_context(cafile=str(proxy.ensure_ca()))

        def open_bottle(index: int, bottle_rules: dict = rules, name: str = 'door') -> Route:
            door = proxy.open_door(f'b{index:02d}', tmp / 'bottles' / f'b{index:02d}', tmp / 'doors' / f'b{index:02d}')
            write_rules(door.rules, bottle_rules)
            guest = GuestRelay(door.socket)
            guests.append(guest)
            bottle_dirs.append(door.bottle_dir)
            route = Route(name, 'proxy', guest.port, proxy_context,
                          {'proxy': lambda: [proxy.daemon().pid()], 'relays': lambda: [guest.process.pid]})
            new_connections(route, address, 1)
            return route

        door = open_bottle(0)
        neighbour = None
        results.memory.append(memory('1 bottle', proxy, guests[:1]))

        log(f'opening {BOTTLES - 1} more doors, one request through each ...')
        for index in range(1, BOTTLES):
            route = open_bottle(index)
            neighbour = neighbour or route
        results.memory.append(memory(f'{BOTTLES} bottles', proxy, guests))

        log('starting the comparison pieces: two relays without a proxy, a proxy without the addon ...')
        raw = raw_host_relay(tmp / 'raw' / 'door' / 'egress.sock', address)
        daemons.append(raw)
        raw.start()
        guests.append(GuestRelay(tmp / 'raw' / 'door' / 'egress.sock'))
        raw_guest = guests[-1]
        plain_port, http1_port = free_port(), free_port()
        plain, plain_ca = plain_proxy(proxy, venv, tmp / 'plain', plain_port)
        http1, http1_ca = plain_proxy(proxy, venv, tmp / 'plain-http1', http1_port, 'http2=false')
        for daemon in (plain, http1):
            daemons.append(daemon)
            daemon.start()
        direct_context = ssl.create_default_context(cafile=str(upstream_ca))
        routes = [
            Route('direct', 'direct', 443, direct_context),
            Route('two socat relays, no proxy', 'relay', raw_guest.port, direct_context,
                  {'relays': lambda: [raw.pid(), raw_guest.process.pid]}),
            Route('proxy without addon', 'proxy', plain_port, ssl.create_default_context(cafile=str(plain_ca)),
                  {'proxy': lambda: [plain.pid()]}),
            door,
        ]
        for route in routes:       # each route answers before anything is timed
            keep_alive(route, address, 1)

        log(f'keep-alive: {shape.reps} x {shape.keep_alive} requests per route ...')
        results.latency['keep-alive request'] = interleaved(
            routes, lambda r: keep_alive(r, address, shape.keep_alive), shape.reps, shape.budget, log, 'keep-alive')
        log(f'new connections: {shape.reps} x {shape.new_connections} per route ...')
        results.latency['new connection'] = interleaved(
            routes, lambda r: new_connections(r, address, shape.new_connections), shape.reps, shape.budget, log,
            'new connections')
        log(f'first streamed event: {shape.reps} x {shape.events} per route ...')
        results.latency['first streamed event'] = interleaved(
            [routes[0], door], lambda r: first_events(r, address, shape.events), shape.reps, shape.budget, log,
            'first streamed event')

        log(f'a neighbour: keep-alive through b01, then again while b00 holds {FLOOD} connections ...')
        calm = interleaved([neighbour], lambda r: keep_alive(r, address, shape.keep_alive), shape.reps,
                           shape.budget, log, 'neighbour, calm')['door']
        pid = proxy.daemon().pid()
        fds_before = len(os.listdir(f'/proc/{pid}/fd'))
        held, taken, answered = hold_connections(tmp / 'doors' / 'b00' / 'egress.sock', FLOOD)
        try:
            fds_during, children = len(os.listdir(f'/proc/{pid}/fd')), children_of(pid)
            flooded = interleaved([neighbour], lambda r: keep_alive(r, address, shape.keep_alive), shape.reps,
                                  shape.budget, log, 'neighbour, flooded')['door']
        finally:
            for sock in held:
                sock.close()
        results.flood = Flood(calm, flooded, taken, answered, children, (fds_before, fds_during))

        log(f'a bound secret: {shape.reps} x {shape.keep_alive} keep-alive requests with and without ...')
        with_secret = open_bottle(BOTTLES, {**rules, 'secrets': [
            {'name': SECRET, 'hosts': [address], 'header': 'Authorization', 'format': 'Bearer {}',
             'placeholder': PLACEHOLDER}]}, 'bottle with a secret, put in')
        proxy.hand_over(f'b{BOTTLES:02d}', {SECRET: 'bench-value-' + 'v' * (len(PLACEHOLDER) - 12)})
        with_secret.headers = {'Authorization': f'Bearer {PLACEHOLDER}'}
        without = Route('bottle without secrets', 'proxy', door.port, proxy_context, door.pids,
                        {'Authorization': 'Bearer ' + 't' * len(PLACEHOLDER)})
        results.secret = interleaved([without, with_secret], lambda r: keep_alive(r, address, shape.keep_alive),
                                     shape.reps, shape.budget, log, 'bound secret')

        log(f'curl: {shape.curl_reps} x {shape.curl_urls} URLs per invocation ...')
        curl_routes = [   # name, the proxy's port (None: direct), the CA curl trusts, curl's options
            ('direct, HTTP/2 offered', None, upstream_ca, []),
            ('door, HTTP/2 offered (curl default)', door.port, proxy.ca_cert, []),
            ('door, --http1.1', door.port, proxy.ca_cert, ['--http1.1']),
            ('no addon, HTTP/2 offered', plain_port, plain_ca, []),
            ('no addon, http2=false, HTTP/2 offered', http1_port, http1_ca, []),
        ]
        runs = {name: ([], set(), []) for name, *_ in curl_routes}
        for _ in range(shape.curl_reps):
            for name, proxy_port, ca_cert, extra in curl_routes:
                times, versions, connections = curl_run(address, shape.curl_urls, proxy_port, ca_cert, extra,
                                                        upstream)
                runs[name][0].append(statistics.median(times))
                runs[name][1].add(versions)
                runs[name][2].append(connections)
        for name, (medians, versions, connections) in runs.items():
            results.curl.append((name, medians, ','.join(sorted(versions)), max(connections)))

        results.memory.append(memory(f'{BOTTLES} bottles, after the bench', proxy, guests[:BOTTLES]))
        results.proxy_requests = sum(len((d / 'egress.log').read_text().splitlines()) for d in bottle_dirs)
    finally:
        for relay in guests:
            relay.close()
        for daemon in daemons:
            daemon.stop()
        proxy.stop()
        upstream.close()
    return results


# --- the report --------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f'{seconds * 1000:.2f}'


def verdict(value: float, target: float) -> str:
    return 'yes' if value < target else 'NO'


def report(results: Results, shape: Shape, load_start: str, load_end: str, total: float) -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0))
    lat = results.latency
    out = [
        'claude-bottle egress proxy bench (everything on loopback)',
        f'machine:  {platform.system()} {platform.machine()}, {cpus} CPUs ({usable} usable), '
        f'Python {platform.python_version()}; load average {load_start} at start, {load_end} at the end',
        'door:     client -> guest socat relay (TCP) -> door (Unix socket) -> '
        'proxy + addon -> TLS upstream',
        f'client:   Python http.client, the same on every route; {shape.reps} repetitions (fewer if the '
        f'{shape.budget:.0f} s budget of a measurement ran out): {shape.keep_alive} keep-alive requests, '
        f'{shape.new_connections} new connections, {shape.events} event streams per route and repetition',
        'figures:  median over repetitions of each repetition\'s median, [range of those medians]',
        '',
    ]
    targets = {'keep-alive request': TARGET_KEEP_ALIVE_MS, 'new connection': TARGET_NEW_CONNECTION_MS}
    head = f'{"measure":<22}{"direct ms":>11}{"door ms":>11}   {"added ms [range]":<24}{"target":>10}{"met":>5}'
    out += [head, '-' * len(head)]
    for measure, by_route in lat.items():
        direct, door = by_route['direct'], by_route['door']
        middle, low, high = added(by_route, 'door')
        target = targets.get(measure)
        out.append(f'{measure:<22}{ms(direct.median):>11}{ms(door.median):>11}   '
                   f'{ms(middle) + f" [{ms(low)}-{ms(high)}]":<24}'
                   f'{(f"< {target:g} ms" if target else "-"):>10}'
                   f'{(verdict(middle * 1000, target) if target else ""):>5}')
    events = lat['first streamed event']['door']
    slowest = max(max(samples) for samples in events.reps)
    out.append(f'(first streamed event through the door: slowest of {events.samples} {ms(slowest)} ms; '
               f'{"streamed" if slowest < BUFFERED_SECONDS else "HELD BACK: the next event comes 1 s later"})')
    out.append('')

    head = f'{"memory, MB":<32}{"proxy = host total":>20}{"guest relays":>14}{"target":>10}{"met":>5}'
    out += [head, '-' * len(head)]
    for m in results.memory:
        is_target = m.label == f'{BOTTLES} bottles'
        out.append(f'{m.label:<32}{m.host_total:>20.1f}{m.guest_relays_rss:>14.1f}'
                   f'{(f"< {TARGET_MEMORY_MB:g}" if is_target else ""):>10}'
                   f'{(verdict(m.host_total, TARGET_MEMORY_MB) if is_target else ""):>5}')
    out.append(f'(RSS; the proxy is all the host runs for the doors (no relay process); it had handled '
               f'{results.proxy_requests} requests by the end, per its logs; guest relays run inside the bottles)')
    out.append('')

    out.append('where the time goes: every route, same client, same repetitions; CPU per request from '
               '/proc/<pid>/stat')
    head = (f'{"route":<30}{"keep-alive ms":>14}{"added":>8}{"proxy CPU":>11}{"relays CPU":>12}'
            f'{"new conn ms":>13}{"added":>8}{"proxy CPU":>11}{"relays CPU":>12}')
    out += [head, '-' * len(head)]
    for name in lat['keep-alive request']:
        ka, nc = lat['keep-alive request'][name], lat['new connection'][name]

        def cpu(series: Series, role: str) -> str:
            value = series.cpu_per_sample(role)
            return '' if value is None else ms(value)
        out.append(f'{name:<30}{ms(ka.median):>14}{ms(added(lat["keep-alive request"], name)[0]):>8}'
                   f'{cpu(ka, "proxy"):>11}{cpu(ka, "relays"):>12}'
                   f'{ms(nc.median):>13}{ms(added(lat["new connection"], name)[0]):>8}{cpu(nc, "proxy"):>11}'
                   f'{cpu(nc, "relays"):>12}')
    out.append(f'(ms per request or connection; CPU: ms per request or connection, from {TICKS} ticks a second '
               'summed over all repetitions; relays CPU: the socat relays on the route with their per-connection '
               'children)')
    out.append('')

    if results.flood:
        f = results.flood
        out.append(f'another bottle while one holds {FLOOD} connections to its door: keep-alive '
                   f'{ms(f.flooded.median)} ms [{ms(min(f.flooded.medians))}-{ms(max(f.flooded.medians))}] '
                   f'against {ms(f.calm.median)} ms [{ms(min(f.calm.medians))}-{ms(max(f.calm.medians))}] before; '
                   f'the door took {f.held} of the {FLOOD}, answered {f.answered} of the rest 503 and closed the others, '
                   f'{f.proxy_children} processes made, '
                   f'the proxy\'s open files {f.proxy_fds[0]} -> {f.proxy_fds[1]}')
        out.append('')

    if results.secret:
        without, with_secret = results.secret.values()
        ratios = [w / o for w, o in zip(with_secret.medians, without.medians)]
        ratio = statistics.median(ratios)
        out.append(f'a bound secret, keep-alive request: {ms(with_secret.median)} ms '
                   f'[{ms(min(with_secret.medians))}-{ms(max(with_secret.medians))}] with the placeholder replaced by '
                   f'the value (and the response scanned), {ms(without.median)} ms '
                   f'[{ms(min(without.medians))}-{ms(max(without.medians))}] in a bottle without secrets: '
                   f'ratio {ratio:.3f} [{min(ratios):.3f}-{max(ratios):.3f}] (target < {TARGET_SECRET_RATIO:g}: '
                   f'{verdict(ratio, TARGET_SECRET_RATIO)}); proxy CPU per request '
                   f'{ms(with_secret.cpu_per_sample("proxy"))} against {ms(without.cpu_per_sample("proxy"))} ms')
        out.append('')

    head = (f'{"curl, many URLs in one invocation":<40}{"ms/request":>12}{"range":>16}{"HTTP":>8}'
            f'{"upstream conns":>16}')
    out += [head, '-' * len(head)]
    for name, medians, versions, connections in results.curl:
        out.append(f'{name:<40}{ms(statistics.median(medians)):>12}'
                   f'{f"[{ms(min(medians))}-{ms(max(medians))}]":>16}{versions:>8}{connections:>16}')
    out.append(f'(median time_total per transfer, first transfer left out; {shape.curl_urls + 1} URLs, '
               f'{shape.curl_reps} runs; HTTP: the version curl spoke to the proxy (the test upstream speaks '
               '1.1 only); upstream conns: the most upstream connections one run opened)')
    out.append('')
    out.append(f'whole bench: {total:.0f} s (setup included)')
    return '\n'.join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help=f'smoke run: {QUICK.reps} repetitions of {QUICK.keep_alive} keep-alive requests')
    parser.add_argument('--keep', action='store_true', help='keep the temporary directory')
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL

    def log(message):
        print(f'[{time.perf_counter() - began:6.1f} s] {message}', file=sys.stderr, flush=True)

    def load() -> str:
        return ' '.join(f'{x:.2f}' for x in os.getloadavg())

    for tool in ('socat', 'curl', 'openssl'):
        if not shutil.which(tool):
            print(f'bench needs {tool} (Debian: apt-get install {tool})', file=sys.stderr)
            return 1
    began = time.perf_counter()
    load_start = load()
    tmp = Path(tempfile.mkdtemp(prefix='cb-proxy-bench-'))      # short: the door paths are Unix socket paths
    try:
        results = bench(tmp, shape, log)
    except BenchFailure as err:
        print(f'bench failed: {err}', file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f'kept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report(results, shape, load_start, load(), time.perf_counter() - began))
    return 0


if __name__ == '__main__':
    sys.exit(main())
