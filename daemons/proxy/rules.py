"""A bottle's egress rules: the file format and the decisions made from it.

Standard library only: the proxy addon imports it inside mitmproxy's own environment, and the host
side uses it to check a rules file before writing it. The file is JSON, one per bottle:

    {
      "hosts": [
        {"host": "api.anthropic.com"},
        {"domain": "github.com"},
        {"host": "api.github.com", "methods": ["GET", "HEAD"], "paths": ["/repos/acme/"]}
      ],
      "allow_private": ["10.20.0.0/16"],
      "gated": [{"host": "github.com", "path": "/acme/app"}]
    }

- `host`: that exact name (or IP literal), case-insensitive, a trailing dot ignored.
- `domain`: that name and every name under it (`github.com`, `api.github.com`; not `evilgithub.com`).
- `methods`, `paths` (optional, each a non-empty list): the entry then allows only those methods, and
  only paths starting with one of those prefixes. A path with `.` or `..` segments (also
  percent-encoded) never matches a prefix, so it cannot climb out of one.
- A request is allowed when any entry allows it; an empty or missing `hosts` allows nothing.
- `allow_private`: networks (CIDR) that allowed hosts may resolve to although they are loopback,
  private, link-local or otherwise not public; every such address is refused unless listed here.
- `gated`: repositories the bottle reaches only through the git gate: a request for that path on that
  host (`/acme/app`, `/acme/app.git`, or anything below either) is refused whatever `hosts` allows.
  The gate itself is reached at GATE_HOST, which the addon routes to it (SERVICES).
Only ports 443 and 80 are ever reachable, whatever the rules say.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

# Shared with the host side: the only upstream ports, and the name the addon answers itself for
# health checks through a door (.invalid never resolves, so it can never be a real upstream).
PORTS = (443, 80)
# Where the proxy's listeners (one per bottle) and the project's services behind it listen: loopback only,
# never an address another host could reach.
LISTEN_HOST = '127.0.0.1'
HEALTH_HOST = 'health.bottle.invalid'
GATE_HOST = 'git.bottle.invalid'
SUPERVISE_HOST = 'supervise.bottle.invalid'
# Set by the proxy on every request it routes to one of the project's services (whatever the guest
# sent under these names is dropped): which bottle speaks, and the key only the proxy and that
# service hold.
BOTTLE_HEADER = 'X-Claude-Bottle'
GATE_KEY_HEADER = 'X-Claude-Bottle-Gate-Key'
SUPERVISE_KEY_HEADER = 'X-Claude-Bottle-Supervise-Key'
# The project's own services a bottle reaches through its door, by name: (host, key header).
SERVICES = {'gate': (GATE_HOST, GATE_KEY_HEADER), 'supervise': (SUPERVISE_HOST, SUPERVISE_KEY_HEADER)}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RulesError(ValueError):
    """A rules file that is not in the format above; the message names the entry and the key."""


@dataclass(frozen=True)
class HostRule:
    name: str
    subdomains: bool
    methods: frozenset[str] | None
    paths: tuple[str, ...] | None

    def matches_host(self, host: str) -> bool:
        return host == self.name or (self.subdomains and host.endswith('.' + self.name))

    def allows(self, method: str, path: str) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return self.paths is None or (not _climbs(path) and path.startswith(self.paths))

    def to_json(self) -> dict:
        entry = {'domain' if self.subdomains else 'host': self.name}
        if self.methods is not None:
            entry['methods'] = sorted(self.methods)
        if self.paths is not None:
            entry['paths'] = list(self.paths)
        return entry


@dataclass(frozen=True)
class GatedRepo:
    host: str
    path: str

    def covers(self, host: str, path: str) -> bool:
        if host != self.host:
            return False
        path = unquote(path).replace('\\', '/')
        return any(path == p or path.startswith(p + '/') for p in (self.path, self.path + '.git'))

    def to_json(self) -> dict:
        return {'host': self.host, 'path': self.path}


@dataclass(frozen=True)
class Rules:
    hosts: tuple[HostRule, ...] = ()
    allow_private: tuple[IPNetwork, ...] = ()
    gated: tuple[GatedRepo, ...] = ()

    @classmethod
    def from_json(cls, data) -> Rules:
        if not isinstance(data, dict):
            raise RulesError('the rules must be a JSON object with "hosts" and "allow_private"')
        unknown = set(data) - {'hosts', 'allow_private', 'gated'}
        if unknown:
            raise RulesError(f'unknown keys {sorted(unknown)}; the keys are "hosts", "allow_private" and "gated"')
        hosts = data.get('hosts', [])
        if not isinstance(hosts, list):
            raise RulesError('"hosts" must be a list of objects')
        networks = data.get('allow_private', [])
        if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
            raise RulesError('"allow_private" must be a list of networks such as "10.0.0.0/8"')
        try:
            allow_private = tuple(ipaddress.ip_network(n) for n in networks)
        except ValueError as err:
            raise RulesError(f'"allow_private": {err}') from None
        gated = data.get('gated', [])
        if not isinstance(gated, list) or not all(
                isinstance(g, dict) and set(g) == {'host', 'path'} and isinstance(g['host'], str) and g['host']
                and isinstance(g['path'], str) and g['path'].startswith('/') for g in gated):
            raise RulesError('"gated" must be a list of {"host": NAME, "path": "/PATH"}')
        return cls(tuple(_host_rule(i, entry) for i, entry in enumerate(hosts)), allow_private,
                   tuple(GatedRepo(normal_host(g['host']), g['path'].rstrip('/')) for g in gated))

    def to_json(self) -> dict:
        data = {'hosts': [h.to_json() for h in self.hosts], 'allow_private': [str(n) for n in self.allow_private]}
        if self.gated:
            data['gated'] = [g.to_json() for g in self.gated]
        return data

    def refusal(self, method: str, host: str, path: str) -> str | None:
        """Why this request is not allowed, or None when it is."""
        host = normal_host(host)
        for_host = [h for h in self.hosts if h.matches_host(host)]
        if not for_host:
            return f'{host} is not an allowed host'
        if any(h.allows(method, path) for h in for_host):
            return None
        return f'{method} {path} is not allowed on {host}; the rules allow only ' + '; '.join(
            f'{",".join(sorted(h.methods)) if h.methods else "any method"} on '
            f'{" or ".join(h.paths) if h.paths else "any path"}' for h in for_host)

    def gated_refusal(self, host: str, path: str) -> str | None:
        """Why this request is refused as one for a gated repository, or None."""
        host = normal_host(host)
        if any(g.covers(host, path) for g in self.gated):
            return f'{host}{path} is in a repository that only the git gate reaches'
        return None

    def address_refused(self, address: IPAddress) -> bool:
        """True for loopback, private, link-local, unspecified, multicast and other non-public
        addresses, unless `allow_private` lists their network."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address.version == n.version and address in n for n in self.allow_private):
            return False
        return not address.is_global or address.is_multicast


def load(path: Path) -> Rules:
    """The rules in `path`; RulesError names the file when it is not valid."""
    try:
        return Rules.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as err:     # RulesError and JSON errors are ValueErrors
        raise RulesError(f'{path}: {err}') from None


def normal_host(host: str) -> str:
    return host.lower().rstrip('.')


def noncanonical_ipv4(host: str) -> bool:
    """True for IPv4 addresses not written as four decimal numbers (`2130706433`, `0x7f000001`,
    `127.1`, `0177.0.0.1`): resolvers accept them, so they could slip past name rules."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def _host_rule(index: int, entry) -> HostRule:
    where = f'"hosts"[{index}]'
    if not isinstance(entry, dict):
        raise RulesError(f'{where} must be an object such as {{"host": "example.com"}}')
    unknown = set(entry) - {'host', 'domain', 'methods', 'paths'}
    if unknown:
        raise RulesError(f'{where}: unknown keys {sorted(unknown)}; allowed are host or domain, methods, paths')
    if ('host' in entry) == ('domain' in entry):
        raise RulesError(f'{where} needs exactly one of "host" and "domain"')
    subdomains = 'domain' in entry
    name = entry['domain' if subdomains else 'host']
    if not isinstance(name, str) or not name.strip('.') or any(c in name for c in '/:@ *') and not _is_ip(name):
        raise RulesError(f'{where}: {name!r} is not a host name')
    if noncanonical_ipv4(name):
        raise RulesError(f'{where}: {name!r} is not a canonical IPv4 address; write it as a.b.c.d')
    if subdomains and _is_ip(name):
        raise RulesError(f'{where}: {name!r} is an address, not a domain; use "host"')
    methods = entry.get('methods')
    if methods is not None and (not isinstance(methods, list) or not methods
                                or not all(isinstance(m, str) and m.isalpha() for m in methods)):
        raise RulesError(f'{where}: "methods" must be a non-empty list such as ["GET", "HEAD"]')
    paths = entry.get('paths')
    if paths is not None and (not isinstance(paths, list) or not paths
                              or not all(isinstance(p, str) and p.startswith('/') for p in paths)):
        raise RulesError(f'{where}: "paths" must be a non-empty list of prefixes starting with "/"')
    return HostRule(normal_host(name), subdomains,
                    frozenset(m.upper() for m in methods) if methods else None,
                    tuple(paths) if paths else None)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _climbs(path: str) -> bool:
    segments = unquote(path.split('?', 1)[0]).replace('\\', '/').split('/')
    return '.' in segments or '..' in segments
