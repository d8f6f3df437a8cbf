"""mitmproxy addon: the egress fence of every bottle of a project, in one mitmproxy process (serve.py).

Runs inside mitmproxy's own environment (standard library, mitmproxy and the sibling `rules.py`).

Which bottle a connection belongs to comes only from the door it came through: each bottle's door is a
Unix socket this process listens on itself (doors.py; no TCP listener, no relay), never from anything
the client sends. The doors file (option `bottle_doors`) maps bottles to doors and files; the addon reads
it at start and polls it, opening and closing doors live, so adding or removing a bottle never restarts
the proxy:

    {"bottles": {"<bottle>": {"door": "/abs/door-dir", "rules": "/abs/egress-rules.json",
                              "log": "/abs/egress.log", ...}},
     "services": {"gate": {"port": 41240, "key_file": "/abs/gate/key"}, "supervise": {...}}}
                                                  (the project's services that run, rules.SERVICES)

For every request, in this order:
- `health.bottle.invalid` (a reserved name that can never resolve) is answered here with
  {"bottle": <name>, "services": {<service>: <route tag>}}: the health check through a door, with no
  upstream, which also tells which services the addon routes now (rules.route_tag: not the port);
- `http://git.bottle.invalid/...` goes to the project's git gate, and `http://supervise.bottle.invalid/...`
  to its supervisor, with the bottle's name and that service's key in headers the guest cannot set
  (a service refuses a request without its key);
- CONNECT to a port other than 443 or 80, or to an IPv4 address in a non-canonical form
  (`2130706433`, `0x7f000001`, `127.1`), is refused with a 403 at CONNECT time;
- any other CONNECT is accepted without connecting upstream (connection_strategy=lazy); the TLS
  inside is always intercepted (never passed through), so every request is checked here, and a
  denied one gets a readable 403 naming the host and how to get it allowed, before any DNS lookup
  or connection upstream;
- the request's head must be read by any server as the proxy reads it (message.py: HTTP/1.1 or 1.0, clean
  header names and values, one Host, no routing headers, no body on a GET);
- the TLS SNI, the Host header and the request-target's own authority (a request in absolute form inside
  a tunnel) must all name the CONNECT target, host and port (no fronting); what goes upstream is
  origin-form with the proxy's own Host for the checked target, so the server reads the very target
  that was checked;
- the bottle's rules (see rules.py), re-read when the file changes (written as temp + rename); where they
  narrow methods, an override in a header, the query or a body a framework reads as parameters is refused
  (a body is read whole first, at most message.BODY_LIMIT);
- a bottle's bound secrets (rules `secrets`, bound_secrets.py): a placeholder in its binding's header of an
  HTTPS request to one of its hosts is replaced by the real value the host handed over (option
  `bottle_secrets`: the hand-over socket), and refused anywhere else (another host or header, plain HTTP, the
  URL, the body; a streamed body is refused before the chunk carrying it leaves), as is a placeholder with no
  value yet; a request carrying a value asks for an uncompressed answer, and the values in any response of
  that bottle are put back to placeholders;
- the allowed name is resolved once per client connection, and refused when any address is
  loopback, private, link-local or otherwise not public, unless the rules' `allow_private` lists it;
  the upstream connection goes to that checked address (no DNS rebinding), its certificate checked
  against the name.
Raw TCP is never relayed. Responses are streamed to the client as they arrive (server-sent events,
large downloads). Each decision is one JSON line in the bottle's log: time, bottle, method, host,
port, path (without the query, which may hold secrets), allowed, reason, status, bytes (response
body bytes sent to the client), address (the upstream address connected to), authority (the one the
request-target named, when a request in absolute form named one: what was asked), and secret (the bound
secrets put in or refused, by name, when there are any; never a value). The guest chooses much of
that line and how often it is written, and the log is on the host's disk: each text field is cut at
logbound.FIELD_BYTES with its length noted, and the live log holds at most `bottle_log_bytes` (default
logbound.EGRESS_LOG_BYTES) before it becomes egress.log.1 (logbound.RotatingLog).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import NamedTuple

from mitmproxy import ctx, http

import bound_secrets
import logbound
import message
import rules as bottle_rules
from doors import CONNECTIONS, IDLE_SECONDS, Door, RateLimited
from rules import BOTTLE_HEADER, HEALTH_HOST, LISTEN_HOST, PORTS, SERVICES, route_tag

DOORS_POLL_SECONDS = 0.25
SERVICE_CONNECT_SECONDS = 2.0     # a project's service on the host's loopback answers at once, or is down

log = logging.getLogger(__name__)


DOOR_SOCKET = 'egress.sock'     # in the door's directory


class Bottle:
    def __init__(self, name: str, door: Path, rules_file: Path, log_file: Path,
                 log_bytes: int = logbound.EGRESS_LOG_BYTES):
        self.name, self.door, self.rules_file, self.log_file = name, door, rules_file, log_file
        self.refused_connection = RateLimited(self.record_connection_refused)
        self._rules_key = None
        self._rules: bottle_rules.Rules | str = 'no rules read yet'
        self._log = logbound.RotatingLog(log_file, log_bytes)
        self.values: dict[str, str] = {}                  # bound secret -> its real value: memory only
        self.masks: list[tuple[bytes, bytes]] = []        # (value, placeholder), for responses

    def rules(self) -> bottle_rules.Rules | str:
        """The current rules, or why there are none (then everything is denied)."""
        try:
            st = os.stat(self.rules_file)
            key = (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            key = None
        if key != self._rules_key:
            self._rules_key = key
            try:
                self._rules = bottle_rules.load(self.rules_file)
            except bottle_rules.RulesError as err:
                self._rules = f'the rules of bottle {self.name} cannot be used ({err})'
        return self._rules

    def record(self, flow: http.HTTPFlow, allowed: bool, reason: str | None, status: int | None,
               response_bytes: int | None = None, address: str | None = None, secret: str | None = None):
        line = {'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'bottle': self.name,
                'method': flow.request.method, 'host': flow.request.host, 'port': flow.request.port,
                'path': '' if flow.request.method == 'CONNECT' else flow.request.path.split('?', 1)[0],
                'allowed': allowed, 'reason': reason, 'status': status, 'bytes': response_bytes,
                'address': address, 'authority': flow.request.authority or None}
        if secret:
            line['secret'] = secret
        self._write(line)

    def take_values(self, values: dict[str, str]) -> str | None:
        """The bottle's secrets' values, in place of the ones it had; why not, naming no value."""
        rules = self.rules()
        if isinstance(rules, str):
            return rules
        bound = {binding.name: binding for binding in rules.secrets}
        unbound = sorted(set(values) - set(bound))
        if unbound:
            return (f'bottle {self.name} has no secret {", ".join(unbound)} bound in its rules ({self.rules_file}); '
                    f'bound: {", ".join(sorted(bound)) or "none"}')
        self.values = dict(values)
        self.masks = [(value.encode(), bound[name].placeholder.encode()) for name, value in values.items()]
        return None

    def record_connection_refused(self, reason: str):
        self._write({'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), 'bottle': self.name,
                     'method': None, 'host': None, 'port': None, 'path': '', 'allowed': False, 'reason': reason,
                     'status': 503, 'bytes': None, 'address': None, 'authority': None})

    def _write(self, line: dict):
        try:
            self._log.write(json.dumps(logbound.cut_fields(line)))
        except OSError as err:
            self.close()
            log.warning(f'cannot write the egress log of bottle {self.name}: {err}')

    def close(self):
        self._log.close()


class Service(NamedTuple):
    name: str
    port: int
    key_header: str
    key: str


SERVICE_NAMES = {host: name for name, (host, _) in SERVICES.items()}


class ByteCounter:
    """The response's `stream` callable: passes chunks through as they come, counting them."""
    def __init__(self):
        self.count = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.count += len(chunk)
        return chunk


class MaskingCounter(ByteCounter):
    """ByteCounter for a bottle with secrets' values: each value back to its placeholder first."""
    def __init__(self, masker: bound_secrets.Masker):
        super().__init__()
        self.masker = masker

    def __call__(self, chunk: bytes) -> bytes:
        return super().__call__(self.masker(chunk))


class EgressFence:
    def __init__(self):
        self.bottles: dict[str, Bottle] = {}
        self.doors: dict[str, Door] = {}
        self.clients: dict[str, str] = {}                # mitmproxy's client id -> its bottle, set by its door
        self._door_errors: dict[str, str] = {}
        self.services: dict[str, Service] = {}        # by the name the guest uses
        self._doors_key = None
        self._watch: asyncio.Task | None = None
        # (client connection id, host, port) -> the address checked for it; the upstream
        # connection is made to that address and no other.
        self.checked: dict[tuple[str, str, int], str] = {}
        self._connecting: dict[str, tuple[str, int]] = {}
        self.hand_over: bound_secrets.HandOver | None = None

    def load(self, loader):
        loader.add_option('bottle_doors', str, '', 'The JSON file mapping bottles to doors, rules and logs.')
        loader.add_option('bottle_door_connections', int, CONNECTIONS,
                          'The most connections one bottle may hold open through its door.')
        loader.add_option('bottle_door_idle', int, int(IDLE_SECONDS),
                          'Seconds without traffic after which a connection through a door is closed.')
        loader.add_option('bottle_log_bytes', int, logbound.EGRESS_LOG_BYTES,
                          'The most bytes of a bottle\'s live egress log; past it, it becomes egress.log.1.')
        loader.add_option('bottle_secrets', str, '',
                          'The Unix socket where the host hands over the values of the bottles\' bound secrets.')
        bound_secrets.apply()       # before any request: a streamed body is scanned

    def configure(self, updated):
        if 'bottle_doors' in updated:
            self.read_doors()

    async def running(self):
        if ctx.options.bottle_secrets:
            self.hand_over = bound_secrets.HandOver(Path(ctx.options.bottle_secrets), self.take_values)
            try:
                await self.hand_over.open()
            except OSError as err:
                log.error(f'cannot listen for secrets at {ctx.options.bottle_secrets}: {err}')
                self.hand_over = None
        self._watch = asyncio.create_task(self.watch_doors())

    def take_values(self, bottle: str, values: dict[str, str]) -> str | None:
        if bottle not in self.bottles:
            return f'bottle {bottle} has no door in this egress proxy'
        return self.bottles[bottle].take_values(values)

    def done(self):
        if self.hand_over:
            self.hand_over.close()
        if self._watch:
            self._watch.cancel()
        for door in self.doors.values():
            door.close()
        for bottle in self.bottles.values():
            bottle.close()

    async def watch_doors(self):
        while True:
            try:
                self.read_doors()
                await self.open_doors()
            except Exception:       # keep watching: the next write of the file may be good
                log.exception('cannot apply the doors file')
            await asyncio.sleep(DOORS_POLL_SECONDS)

    async def open_doors(self):
        """Listen on the door of every bottle in the doors file, and on no other; a door whose socket was
        removed (a cleaner of /tmp) is opened again."""
        for name in [n for n, door in self.doors.items()      # gone, moved, or its socket removed or replaced
                     if n not in self.bottles or door.path != self.bottles[n].door / DOOR_SOCKET or not door.intact()]:
            self.doors.pop(name).close()
        for name, bottle in self.bottles.items():
            if name in self.doors:
                continue
            door = Door(name, bottle.door / DOOR_SOCKET, self.clients, bottle.refused_connection,
                        ctx.options.bottle_door_connections, ctx.options.bottle_door_idle)
            try:
                await door.open()
            except OSError as err:      # tried again at the next poll; said once
                if self._door_errors.get(name) != str(err):
                    log.error(f'cannot open the door of bottle {name} at {door.path}: {err}')
                self._door_errors[name] = str(err)
                continue
            self._door_errors.pop(name, None)
            self.doors[name] = door

    def read_doors(self):
        path = Path(ctx.options.bottle_doors)
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            key = None
        if key == self._doors_key:
            return
        try:
            data = json.loads(path.read_text()) if key else {'bottles': {}}
            doors = data['bottles']
            services = {SERVICES[name][0]: Service(name, int(entry['port']), SERVICES[name][1],
                                                   Path(entry['key_file']).read_text().strip())
                        for name, entry in data.get('services', {}).items()}
            bottles = {}
            for name, door in doors.items():
                new = Bottle(name, Path(door['door']), Path(door['rules']), Path(door['log']),
                             ctx.options.bottle_log_bytes)
                old = self.bottles.get(name)
                same = old and (old.door, old.rules_file, old.log_file) == (new.door, new.rules_file, new.log_file)
                if old and not same:
                    new.values, new.masks = old.values, old.masks
                bottles[name] = old if same else new     # keeps the parsed rules and the values
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.error(f'the doors file {path} is not valid ({err}); keeping the current doors')
            return
        self._doors_key = key
        self.services = services
        for gone in set(self.bottles.values()) - set(bottles.values()):
            gone.close()
        self.bottles = bottles

    def bottle_of(self, flow: http.HTTPFlow) -> Bottle | None:
        name = self.clients.get(flow.client_conn.id)
        return self.bottles.get(name) if name else None

    def http_connect(self, flow: http.HTTPFlow):
        bottle = self.bottle_of(flow)
        host, port = flow.request.host, flow.request.port
        if bottle is None:
            refusal = NO_BOTTLE
        elif normal_host(host) == HEALTH_HOST:
            return
        elif normal_host(host) in SERVICE_NAMES:
            refusal = Refusal(f'{host} is reached at http://{normal_host(host)}/ (plain HTTP through the door), '
                              'not through a tunnel')
        elif port not in PORTS:
            refusal = port_refusal(port)
        elif bottle_rules.noncanonical_ipv4(host):
            refusal = noncanonical_refusal(host)
        else:
            return
        deny(flow, bottle, refusal)

    async def requestheaders(self, flow: http.HTTPFlow):
        bottle = None
        try:
            bottle = self.bottle_of(flow)
            await self.judge(flow, bottle)
        except Exception as err:        # fail closed: a request this code could not judge does not go up
            log.exception('cannot check a request of bottle %s', bottle.name if bottle else '(none)')
            flow.metadata.pop('bottle_allowed', None)
            deny(flow, bottle, Refusal(f'the egress proxy could not check this request ({type(err).__name__})'))

    async def judge(self, flow: http.HTTPFlow, bottle: Bottle | None):
        """Answer, route to a service, deny, or let the request go up (and mark it so)."""
        request = flow.request
        host = normal_host(request.host)
        if bottle is None:
            deny(flow, bottle, NO_BOTTLE)
            return
        if host == HEALTH_HOST:
            routes = {service.name: route_tag(service.port, service.key) for service in self.services.values()}
            flow.response = http.Response.make(200, json.dumps({'bottle': bottle.name, 'services': routes}),
                                               {'Content-Type': 'application/json'})
            return
        reason = message.head_refusal(request.http_version, request.method, request.path, request.headers.fields,
                                      request.scheme, host, request.port)
        if reason:
            deny(flow, bottle, Refusal(reason))
        elif host in SERVICE_NAMES:
            self.to_service(flow, bottle, host)
        elif refusal := await self.refusal(flow, bottle):
            deny(flow, bottle, refusal)
        else:
            request.headers['Host'] = message.host_header(host, request.port, request.scheme)
            flow.metadata['bottle_allowed'] = bottle

    @staticmethod
    def bind_secrets(flow: http.HTTPFlow, bottle: Bottle, host: str) -> Refusal | None:
        """A placeholder where its secret may go replaced by the value; anywhere else, or without a value, the
        refusal. The body is scanned as it comes (bound_secrets.BodyScanner, `request`)."""
        request = flow.request
        bindings = flow.metadata['bottle_rules'].secrets
        put = []
        for binding in bindings:
            placeholder, needle = binding.placeholder, binding.placeholder.encode()
            if placeholder in request.path:
                return secret_refusal(binding, 'in its URL')
            found = False
            for name, value in request.headers.fields:
                if needle in name:
                    return secret_refusal(binding, 'in the name of a header')
                if needle not in value:
                    continue
                shown_name = message.shown(name)
                if name.lower() != binding.header.lower().encode():
                    return secret_refusal(binding, f'in its {shown_name} header')
                if host not in binding.hosts or request.scheme != 'https':
                    return secret_refusal(binding, f'in its {shown_name} header to {request.scheme}://{host}')
                found = True
            if found:
                real = bottle.values.get(binding.name)
                if real is None:
                    return Refusal(f'it carries the placeholder of secret {binding.name}, which has no value in the '
                                   'egress proxy yet (a restarted proxy has none)', ATTACH, binding.name)
                request.headers.set_all(binding.header, [v.replace(placeholder, real)
                                                         for v in request.headers.get_all(binding.header)])
                put.append(binding.name)
        if put:
            flow.metadata['bottle_secret'] = ', '.join(put)
            request.headers['Accept-Encoding'] = 'identity'     # an echoed value is found only uncompressed
        if 'transfer-encoding' in request.headers or request.headers.get('content-length', '0').strip() != '0':
            flow.metadata[bound_secrets.SCAN] = bound_secrets.BodyScanner(bindings, body_refused)
        return None

    def request(self, flow: http.HTTPFlow):
        """A body held for an override check (refusal) is whole now: refused here when it asks for another
        method or cannot be read, before any connection upstream; failing to judge it refuses it too. So is a
        body held whole that carries a bound secret's placeholder (a streamed one was scanned as it went)."""
        scanner = flow.metadata.get(bound_secrets.SCAN)
        if scanner and not flow.request.stream and not flow.response \
                and (binding := scanner.find(flow.request.raw_content or b'')):
            flow.metadata.pop('bottle_check_body', None)
            deny(flow, flow.metadata.pop('bottle_allowed'), secret_refusal(binding, 'in its body'))
            return
        if not flow.metadata.pop('bottle_check_body', False) or flow.response:
            return
        bottle = flow.metadata.pop('bottle_allowed')
        try:
            refusal = self.body_override_refusal(flow, bottle)
        except Exception as err:        # fail closed, as requestheaders
            log.exception('cannot check the body of a request of bottle %s', bottle.name)
            refusal = Refusal(f'the egress proxy could not check this request (its body: {type(err).__name__})')
        if refusal:
            deny(flow, bottle, refusal)
        else:
            flow.metadata['bottle_allowed'] = bottle

    @staticmethod
    def body_override_refusal(flow: http.HTTPFlow, bottle: Bottle) -> Refusal | None:
        request = flow.request
        try:
            override = message.body_override(request.headers.get('content-type'), request.raw_content or b'')
        except message.UnreadableBody as err:
            return Refusal(f'where methods are narrowed on {request.host}, a body is read for a method override, '
                           f'and {err}', ALLOW_HOSTS)
        rules = bottle.rules()
        if isinstance(rules, str):
            return Refusal(rules, RELAUNCH)
        reason = rules.refusal(request.method, request.host, request.path.partition('?')[0], override)
        return Refusal(reason, ALLOW_HOSTS) if reason else None

    def to_service(self, flow: http.HTTPFlow, bottle: Bottle, host: str):
        service = self.services.get(host)
        if service is None:
            deny(flow, bottle, Refusal(f'this project runs no {SERVICE_NAMES[host]} service', NO_SERVICE))
            return
        request = flow.request
        for name in {n.lower() for n in request.headers.keys()}:
            if name.startswith(('proxy', BOTTLE_HEADER.lower())):    # httpoxy, and identities the guest made up
                del request.headers[name]
        request.scheme, request.host, request.port = 'http', LISTEN_HOST, service.port
        request.headers[BOTTLE_HEADER] = bottle.name
        request.headers[service.key_header] = service.key
        request.stream = True       # a push reaches the gate as it comes
        self.checked[(flow.client_conn.id, LISTEN_HOST, service.port)] = LISTEN_HOST
        flow.metadata['bottle_allowed'] = bottle

    async def refusal(self, flow: http.HTTPFlow, bottle: Bottle) -> Refusal | None:
        request = flow.request
        host = normal_host(request.host)
        if request.port not in PORTS:
            return port_refusal(request.port)
        if bottle_rules.noncanonical_ipv4(host):
            return noncanonical_refusal(host)
        sni = flow.client_conn.sni
        if sni is not None and normal_host(sni) != host:
            return Refusal(f'the TLS server name {message.shown(sni)} is not the CONNECT target {host}')
        if request.authority:       # absolute form inside a tunnel: a server may route by this authority
            if message.named(request.authority, request.scheme) != (host, request.port):
                return Refusal(f'the request-target names {message.shown(request.authority)}, not the target '
                               f'{host}:{request.port}')
            request.authority = ''      # origin-form upstream (HTTP/1 only: head_refusal), the target checked here
        rules = bottle.rules()
        if isinstance(rules, str):
            return Refusal(rules, RELAUNCH)
        flow.metadata['bottle_rules'] = rules
        path, _, query = request.path.partition('?')
        reason = rules.gated_refusal(host, path)
        if reason:
            return Refusal(reason, GATED)
        override = message.method_override(request.headers.items(), query)
        reason = rules.refusal(request.method, host, path, override)
        if reason:
            return Refusal(reason, ALLOW_HOSTS)
        refusal = self.body_refusal(flow, rules, host)
        if refusal is None and rules.secrets:     # before any DNS lookup: a placeholder astray goes nowhere
            refusal = self.bind_secrets(flow, bottle, host)
        return refusal or await self.check_address(flow, rules, host, request.port)

    @staticmethod
    def body_refusal(flow: http.HTTPFlow, rules: bottle_rules.Rules, host: str) -> Refusal | None:
        """Where methods are narrowed, a body a framework could read a `_method` from is held whole and read
        (request); one too large to hold, or sent in chunks or encoded, is refused here."""
        headers = flow.request.headers
        has_body = 'transfer-encoding' in headers or headers.get('content-length', '0').strip() != '0'
        if not (has_body and rules.narrows_methods(host) and message.body_checked(headers.get('content-type'))):
            return None
        length = headers.get('content-length', '').strip()
        if 'transfer-encoding' in headers or 'content-encoding' in headers or not length.isdigit() \
                or int(length) > message.BODY_LIMIT:
            return Refusal(f'where methods are narrowed on {host}, a body of type '
                           f'{message.shown(headers.get("content-type", "(none)"))} is read for a method override: '
                           f'send it with a Content-Length of at most {message.BODY_LIMIT} bytes, not chunked or '
                           'encoded', ALLOW_HOSTS)
        flow.metadata['bottle_check_body'] = True
        return None

    async def check_address(self, flow, rules: bottle_rules.Rules, host: str, port: int) -> Refusal | None:
        key = (flow.client_conn.id, flow.request.host, port)
        address = self.checked.get(key)
        if address is None and (named := rules.address_of(host)):
            addresses = [named]                             # network.hosts: the manifest's own address
        elif address is None:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as err:
                return Refusal(f'{host} does not resolve ({err})')
            if flow.client_conn.id not in self.clients:      # gone meanwhile: nothing to remember it for
                return Refusal('the connection closed while its host was resolved')
            addresses = [info[4][0].split('%', 1)[0] for info in infos]
        else:
            addresses = [address]
        for candidate in addresses:
            if rules.address_refused(ipaddress.ip_address(candidate)):
                return Refusal(f'{host} resolves to {candidate}, a loopback, private, link-local or '
                               'otherwise non-public address', ALLOW_PRIVATE)
        self.checked[key] = addresses[0]
        return None

    async def server_connect(self, data):
        host, port = data.server.address
        address = self.checked.get((data.client.id, host, port))
        if address is None:      # every allowed request was checked first; anything else is refused
            data.server.error = f'the egress proxy did not check {host}:{port}'
            return
        service = next((s for s in self.services.values() if (LISTEN_HOST, s.port) == (host, port)), None)
        if service and not await _accepts(port):
            # mitmproxy's answer to a failed connect names the address and port it tried: on the host, for a
            # service, which the guest has no use for. Said here instead, by the name the guest uses.
            data.server.error = (f'the project\'s {service.name} service does not answer; launching an agent '
                                 'again starts it')
            return
        self._connecting[data.server.id] = (host, port)
        data.server.address = (address, port)

    def server_connected(self, data):
        # Name the connection by its host again, so that mitmproxy, which matches connections to
        # reuse by address, reuses it for later requests to that host; the TLS server name and the
        # certificate check already use the host. Its guard forbids changing the address of an
        # open connection, hence the plain attribute write.
        name = self._connecting.pop(data.server.id, None)
        if name:
            object.__setattr__(data.server, 'address', name)

    def server_connect_error(self, data):
        self._connecting.pop(data.server.id, None)

    def client_disconnected(self, client):
        for key in [k for k in self.checked if k[0] == client.id]:
            del self.checked[key]

    def responseheaders(self, flow: http.HTTPFlow):
        bottle = flow.metadata.get('bottle_allowed')
        if not bottle:
            return
        if not bottle.masks:
            flow.response.stream = flow.metadata['bottle_bytes'] = ByteCounter()
        elif mask_head(flow, bottle.masks):
            flow.metadata['bottle_mask_whole'] = True       # held whole (mitmproxy's default), masked in `response`
        else:
            flow.response.stream = flow.metadata['bottle_bytes'] = MaskingCounter(bound_secrets.Masker(bottle.masks))

    def response(self, flow: http.HTTPFlow):
        bottle = flow.metadata.pop('bottle_allowed', None)
        if bottle:
            if flow.metadata.pop('bottle_mask_whole', False):
                mask_body(flow.response, bottle.masks)
                flow.metadata['bottle_bytes'] = ByteCounter()
                flow.metadata['bottle_bytes'].count = len(flow.response.raw_content or b'')
            counter = flow.metadata.get('bottle_bytes')
            bottle.record(flow, True, None, flow.response.status_code, counter.count if counter else None,
                          _peer(flow), flow.metadata.get('bottle_secret'))

    def error(self, flow: http.HTTPFlow):
        bottle = flow.metadata.pop('bottle_allowed', None)
        if bottle:
            counter = flow.metadata.get('bottle_bytes')
            bottle.record(flow, True, f'upstream failed: {flow.error.msg}',
                          flow.response.status_code if flow.response else None,
                          counter.count if counter else None, _peer(flow), flow.metadata.get('bottle_secret'))

    def tcp_start(self, flow):
        flow.kill()      # rawtcp is off; this is the second lock on the same door


class Refusal(NamedTuple):
    reason: str
    remedy: str | None = None      # how to get it allowed, with {bottle} for the agent; None: it cannot be
    secret: str | None = None      # the bound secret it is about, by name


ALLOW_HOSTS = ('To allow it, add the host to network.allow_hosts in the manifest of agent {bottle} '
               '(a host can be narrowed to methods and paths) and launch the agent again.')
ALLOW_PRIVATE = ('To allow it, list that network in network.allow_private in the manifest of agent {bottle} '
                 'and launch the agent again.')
RELAUNCH = 'Launching agent {bottle} again writes its rules anew.'
GATED = ('Clone, fetch and push it with git by the URL in the git: list of agent {bottle}; git sends those '
         'through the git gate.')
NO_SERVICE = 'Launching agent {bottle} again starts the services its manifest asks for (git:, supervise).'
NO_BOTTLE = Refusal('this connection came through no bottle\'s door')
ATTACH = ('Attaching to agent {bottle} again (doit launch:{bottle}) hands the secret\'s value to the egress proxy, '
          'which holds it in memory only.')
SECRET_PLACE = 'The proxy puts the secret\'s value in place of the placeholder there, and only there.'


def secret_refusal(binding: bottle_rules.SecretBinding, where: str) -> Refusal:
    return Refusal(f'the egress proxy refused this request: it carries the placeholder of secret {binding.name} '
                   f'{where}; that secret goes only {binding.where()}', SECRET_PLACE, binding.name)


def body_refused(flow: http.HTTPFlow, binding: bottle_rules.SecretBinding) -> http.Response:
    """The 403 for a streamed body found carrying a placeholder (bound_secrets.apply sends it), logged."""
    deny(flow, flow.metadata.pop('bottle_allowed', None), secret_refusal(binding, 'in its body'))
    return flow.response


def mask_head(flow: http.HTTPFlow, masks: list[tuple[bytes, bytes]]) -> bool:
    """A response's headers with each value back to its placeholder; True when its body is to be held whole and
    masked then (mask_body: a length of at most message.BODY_LIMIT, mitmproxy's stream_large_bodies). A body
    streamed through a Masker may change length: it is framed by chunks then (or by the connection's end)."""
    response = flow.response
    if any(value in field for _, field in response.headers.fields for value, _ in masks):
        response.headers.fields = tuple((name, _masked(field, masks)) for name, field in response.headers.fields)
    length = response.headers.get('content-length', '').strip()
    if flow.request.method == 'HEAD' or response.status_code < 200 or response.status_code in (204, 304) \
            or length.isdigit() and int(length) <= message.BODY_LIMIT:
        return True
    if length:
        del response.headers['content-length']
        if (flow.request.http_version, response.http_version) == ('HTTP/1.1', 'HTTP/1.1'):
            response.headers['transfer-encoding'] = 'chunked'
        else:
            response.headers['connection'] = 'close'
    return False


def mask_body(response: http.Response, masks: list[tuple[bytes, bytes]]):
    """A body held whole with each value back to its placeholder, looked for decoded (gzip and the like)."""
    try:
        body, decoded = response.get_content(strict=True) or b'', True
    except ValueError:
        body, decoded = response.raw_content or b'', False
    if not any(value in body for value, _ in masks):
        return
    body = _masked(body, masks)
    if decoded:
        response.content = body         # encoded again as it came, its Content-Length set
    else:
        response.raw_content = body
        response.headers['content-length'] = str(len(body))


def _masked(field: bytes, masks: list[tuple[bytes, bytes]]) -> bytes:
    for value, placeholder in masks:
        field = field.replace(value, placeholder)
    return field


def port_refusal(port: int) -> Refusal:
    return Refusal(f'port {port} is never reachable through the egress proxy; only 443 and 80 are')


def noncanonical_refusal(host: str) -> Refusal:
    return Refusal(f'{host} is an IPv4 address in a non-canonical form; only a.b.c.d is accepted')


def deny(flow: http.HTTPFlow, bottle: Bottle | None, refusal: Refusal):
    name = bottle.name if bottle else '(none)'
    remedy = refusal.remedy.format(bottle=name) if refusal.remedy else 'This cannot be allowed.'
    body = (f'Blocked by the egress proxy of bottle {name}: {flow.request.method} to {flow.request.host} '
            f'is not allowed.\nReason: {refusal.reason}.\n{remedy}\n')
    flow.request.stream = False      # a streamed upload would open the upstream connection
    flow.response = http.Response.make(403, body, {'Content-Type': 'text/plain; charset=utf-8'})
    if bottle:
        bottle.record(flow, False, refusal.reason, 403, secret=refusal.secret)


def normal_host(host: str) -> str:
    return bottle_rules.normal_host(host)


async def _accepts(port: int) -> bool:
    """A service on LISTEN_HOST takes a connection at `port` within SERVICE_CONNECT_SECONDS."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LISTEN_HOST, port), SERVICE_CONNECT_SECONDS)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _peer(flow: http.HTTPFlow) -> str | None:
    peer = flow.server_conn.peername
    return peer[0] if peer else None


addons = [EgressFence()]
