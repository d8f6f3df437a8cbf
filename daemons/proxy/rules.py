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
      "gated": [{"host": "github.com", "path": "/acme/app"}],
      "addresses": {"registry.internal": "10.20.0.5"},
      "secrets": [{"name": "GITHUB_TOKEN", "hosts": ["api.github.com"], "header": "Authorization",
                   "format": "Bearer {}", "placeholder": "cbp-GITHUB_TOKEN-6f1c0e9a2b7d4e53a8c1"}]
    }

- `host`: that exact name (or IP literal), case-insensitive, a trailing dot ignored.
- `domain`: that name and every name under it (`github.com`, `api.github.com`; not `evilgithub.com`).
- `methods`, `paths` (optional, each a non-empty list): the entry then allows only those methods, and
  only paths starting with one of those prefixes. A path a server could read otherwise than it is
  written never matches a prefix (refused rather than normalised): `.` or `..` segments, an encoded `/`,
  `.`, `\\`, `;` or NUL, a `\\` or `;` itself, double encoding (`%25`), anything but printable ASCII
  unencoded (control characters, spaces, raw bytes), or percent-encoded bytes that are not UTF-8
  (overlong forms), a segment of dots (`...`, `.. `), or a character Unicode normalises to another
  (fullwidth dots). Where methods are narrowed, a request that asks for another method by an override
  (message.py: a header, a `_method` parameter in the query or the body) is refused.
- A request is allowed when any entry allows it; an empty or missing `hosts` allows nothing.
- `allow_private`: networks (CIDR) that allowed hosts may resolve to although they are loopback,
  private, link-local or otherwise not public; every such address is refused unless listed here.
- `gated`: repositories the bottle reaches only through the git gate: a request for that path on that
  host (`/acme/app`, `/acme/app.git`, or anything below either) is refused whatever `hosts` allows. The
  path is read as a forge reads it: up to a `#`, decoded (twice-encoded too), `\\` as `/`, `//`, `/./`
  and `..` resolved (and, for a server that does not resolve `..`, not), `;parameters` dropped, trailing
  blanks and dots trimmed, and compared without case after Unicode normalisation (GitHub serves
  owner/repo case-insensitively).
  The gate itself is reached at GATE_HOST, which the addon routes to it (SERVICES).
- `addresses` (optional): names the proxy resolves to that address itself instead of asking the host's
  resolver (the manifest's network.hosts); the address is judged as any other (allow_private).
- `secrets` (optional): the bottle's bound secrets. The guest holds each one's `placeholder` (ASCII letters,
  digits, `-` and `_`, at least PLACEHOLDER_MIN characters); the proxy puts the real value, which it holds in
  memory only (handed over by control.EgressProxy.hand_over), in place of the placeholder in the `header` of
  HTTPS requests to one of `hosts` (exact names, lower-case), and refuses the placeholder anywhere else
  (addon.py). `format` (`{}` exactly once: `Bearer {}`) is how the guest writes the header's value; `header`
  must be one the proxy can set (settable_header).
Only ports 443 and 80 are ever reachable, whatever the rules say. An address is refused when it is not
public by the project's own table (SPECIAL_V4, SPECIAL_V6) or by Python's, and an IPv6 address that embeds
an IPv4 one (EMBEDDED_V4: mapped, compatible, translated, NAT64, 6to4, Teredo) is judged as that IPv4
address: which of these forms Python calls non-global depends on its patch level. Addresses under the
local-use NAT64 prefix 64:ff9b:1::/48, whose layout each network chooses, are refused whole.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes

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
# Headers a bound secret cannot go in: the proxy sets, drops or frames by them itself.
UNSETTABLE_HEADERS = frozenset({'host', 'content-length', 'transfer-encoding', 'connection', 'upgrade', 'te',
                                'trailer', 'keep-alive', 'expect'})
PLACEHOLDER_MIN = 24
_PLACEHOLDER = re.compile(r'[A-Za-z0-9_-]+')
_ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
_HEADER_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def settable_header(name: str) -> str | None:
    """Why a bound secret cannot go in the header `name`, or None when it can."""
    if not isinstance(name, str) or not _HEADER_TOKEN.fullmatch(name):
        return f'{name!r} is not an HTTP header name'
    lower = name.lower()
    if lower in UNSETTABLE_HEADERS or lower.startswith('proxy-'):
        return f'{name} is a header the egress proxy sets or drops itself (it frames or routes the request)'
    if lower.startswith(BOTTLE_HEADER.lower()):
        return f'{name} is a header of the project\'s own ({BOTTLE_HEADER}*), which the proxy sets itself'
    return None


def route_tag(port: int, key: str) -> str:
    """How the proxy's health answer names the route it takes to a service: the host compares it with what
    it asked for, and the guest, which can ask the same through its door, learns nothing of the port."""
    return hashlib.sha256(f'claude-bottle route\0{port}\0{key}'.encode()).hexdigest()[:16]

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

    def allows(self, method: str, path: str, override: str | None = None) -> bool:
        """`path` without the query; `override`: the method another header or parameter asks for, if any."""
        if self.methods is not None and (method.upper() not in self.methods or override is not None):
            return False
        if self.paths is None:
            return True
        decoded = unambiguous_path(path)
        return decoded is not None and decoded.startswith(self.paths)

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
        repo = [_repo_segment(s) for s in self.path.split('/') if s]
        return any([_repo_segment(s) for s in forge_path(path, resolve).split('/') if s][:len(repo)] == repo
                   for resolve in (True, False))      # a server that does not resolve `..` reads it unresolved

    def to_json(self) -> dict:
        return {'host': self.host, 'path': self.path}


@dataclass(frozen=True)
class SecretBinding:
    """A bound secret: the guest's `placeholder` becomes the real value in `header` of HTTPS requests to `hosts`."""
    name: str
    hosts: tuple[str, ...]
    header: str
    format: str
    placeholder: str

    def to_json(self) -> dict:
        return {'name': self.name, 'hosts': list(self.hosts), 'header': self.header, 'format': self.format,
                'placeholder': self.placeholder}

    def where(self) -> str:
        """Where the secret goes, as a refusal says it."""
        return f'in the {self.header} header of HTTPS requests to {" or ".join(self.hosts)}'


@dataclass(frozen=True)
class Rules:
    hosts: tuple[HostRule, ...] = ()
    allow_private: tuple[IPNetwork, ...] = ()
    gated: tuple[GatedRepo, ...] = ()
    addresses: tuple[tuple[str, str], ...] = ()     # (name, address): names resolved here, not by the host
    secrets: tuple[SecretBinding, ...] = ()

    @classmethod
    def from_json(cls, data) -> Rules:
        if not isinstance(data, dict):
            raise RulesError('the rules must be a JSON object with "hosts" and "allow_private"')
        unknown = set(data) - {'hosts', 'allow_private', 'gated', 'addresses', 'secrets'}
        if unknown:
            raise RulesError(f'unknown keys {sorted(unknown)}; the keys are "hosts", "allow_private", "gated", '
                             '"addresses" and "secrets"')
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
        addresses = data.get('addresses', {})
        try:
            if not isinstance(addresses, dict) or not all(isinstance(k, str) and k and isinstance(v, str)
                                                          for k, v in addresses.items()):
                raise ValueError('not a mapping')
            named = tuple(sorted((normal_host(k), str(ipaddress.ip_address(v))) for k, v in addresses.items()))
        except ValueError:
            raise RulesError('"addresses" must be an object of NAME: "IP address"') from None
        secrets = data.get('secrets', [])
        if not isinstance(secrets, list):
            raise RulesError('"secrets" must be a list of objects')
        return cls(tuple(_host_rule(i, entry) for i, entry in enumerate(hosts)), allow_private,
                   tuple(GatedRepo(normal_host(g['host']), g['path'].rstrip('/')) for g in gated), named,
                   _secret_bindings(secrets))

    def to_json(self) -> dict:
        data = {'hosts': [h.to_json() for h in self.hosts], 'allow_private': [str(n) for n in self.allow_private]}
        if self.gated:
            data['gated'] = [g.to_json() for g in self.gated]
        if self.addresses:
            data['addresses'] = dict(self.addresses)
        if self.secrets:
            data['secrets'] = [s.to_json() for s in self.secrets]
        return data

    def address_of(self, host: str) -> str | None:
        """The address the rules name for `host` (network.hosts), or None: the host's resolver is asked."""
        host = normal_host(host)
        return next((address for name, address in self.addresses if name == host), None)

    def refusal(self, method: str, host: str, path: str, override: str | None = None) -> str | None:
        """Why this request is not allowed, or None when it is. `path` without the query; `override`: the
        method a method-override header or parameter asks for (method_override)."""
        host = normal_host(host)
        for_host = [h for h in self.hosts if h.matches_host(host)]
        if not for_host:
            return f'{host} is not an allowed host'
        if any(h.allows(method, path, override) for h in for_host):
            return None
        if override is not None and any(h.methods is not None for h in for_host):
            return (f'{method} {path} asks for method {override} by an override, which is refused where methods '
                    f'are narrowed on {host}')
        if any(h.paths is not None for h in for_host) and unambiguous_path(path) is None:
            return (f'{method} {path} is not allowed on {host}: a path a server could read otherwise than it is '
                    'written (encoded /, ., \\, ; or NUL, double encoding, dot segments, bytes that are not UTF-8) '
                    'never matches narrowed paths')
        return f'{method} {path} is not allowed on {host}; the rules allow only ' + '; '.join(
            f'{",".join(sorted(h.methods)) if h.methods else "any method"} on '
            f'{" or ".join(h.paths) if h.paths else "any path"}' for h in for_host)

    def narrows_methods(self, host: str) -> bool:
        """Whether an entry for this host narrows methods (then a body may have to be read for an override)."""
        host = normal_host(host)
        return any(h.methods is not None for h in self.hosts if h.matches_host(host))

    def gated_refusal(self, host: str, path: str) -> str | None:
        """Why this request is refused as one for a gated repository, or None."""
        host = normal_host(host)
        if any(g.covers(host, path) for g in self.gated):
            return f'{host}{path} is in a repository that only the git gate reaches'
        return None

    def address_refused(self, address: IPAddress) -> bool:
        """True for loopback, private, link-local, unspecified, multicast and other non-public
        addresses, unless `allow_private` lists their network. An IPv6 address that embeds IPv4 ones
        is refused when any of them is."""
        if any(address.version == n.version and address in n for n in self.allow_private):
            return False
        if isinstance(address, ipaddress.IPv6Address) and address not in NAT64_LOCAL:
            embedded = embedded_ipv4(address)
            if embedded:
                return any(self.address_refused(v4) for v4 in embedded)
        return not_public(address)


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
    if not isinstance(name, str) or not name.strip('.') or any(c in name for c in '/:@ *') and not is_ip(name):
        raise RulesError(f'{where}: {name!r} is not a host name')
    if noncanonical_ipv4(name):
        raise RulesError(f'{where}: {name!r} is not a canonical IPv4 address; write it as a.b.c.d')
    if subdomains and is_ip(name):
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


def _secret_bindings(entries: list) -> tuple[SecretBinding, ...]:
    bindings: list[SecretBinding] = []
    for index, entry in enumerate(entries):
        where = f'"secrets"[{index}]'
        if not isinstance(entry, dict):
            raise RulesError(f'{where} must be an object with "name", "hosts", "header", "format" and "placeholder"')
        keys = {'name', 'hosts', 'header', 'format', 'placeholder'}
        if set(entry) != keys:
            raise RulesError(f'{where}: unknown keys {sorted(set(entry) - keys)}' if set(entry) - keys else
                             f'{where}: missing keys {sorted(keys - set(entry))}')
        name, hosts, header = entry['name'], entry['hosts'], entry['header']
        form, placeholder = entry['format'], entry['placeholder']
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise RulesError(f'{where}: "name" must be an environment variable name such as GITHUB_TOKEN')
        where = f'{where} ({name})'
        if not isinstance(hosts, list) or not hosts or not all(
                isinstance(h, str) and h and h == h.lower() and h == normal_host(h)
                and (is_ip(h) or not any(c in h for c in '/:@ *')) and not noncanonical_ipv4(h) for h in hosts):
            raise RulesError(f'{where}: "hosts" must be a non-empty list of exact host names in lower case, '
                             'such as ["api.github.com"]')
        if (why := settable_header(header)) is not None:
            raise RulesError(f'{where}: "header": {why}')
        if not isinstance(form, str) or form.count('{}') != 1 or any(ord(c) < 0x20 or ord(c) == 0x7f for c in form):
            raise RulesError(f'{where}: "format" must be a header value with "{{}}" exactly once, such as "Bearer {{}}"')
        if not isinstance(placeholder, str) or len(placeholder) < PLACEHOLDER_MIN \
                or not _PLACEHOLDER.fullmatch(placeholder):
            raise RulesError(f'{where}: "placeholder" must be at least {PLACEHOLDER_MIN} ASCII letters, digits, '
                             '"-" and "_"')
        for other in bindings:
            if other.name == name:
                raise RulesError(f'{where}: "name": secret {name} is bound twice')
            if placeholder in other.placeholder or other.placeholder in placeholder:
                raise RulesError(f'{where}: "placeholder" overlaps that of secret {other.name}; each needs its own')
        bindings.append(SecretBinding(name, tuple(hosts), header, form, placeholder))
    return tuple(bindings)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# Bytes that must not appear percent-encoded in a path a narrowed rule matches: what would change how a
# server splits or resolves it (/ . \\ ; %), and NUL.
_AMBIGUOUS_ENCODED = {0x2f, 0x2e, 0x5c, 0x3b, 0x25, 0x00}
_PERCENT = re.compile(r'%(?P<hex>[0-9A-Fa-f]{2})?')


def unambiguous_path(path: str) -> str | None:
    """The path decoded, when every server reads it the same way; None when one could read it otherwise:
    `.` or `..` segments, `\\`, `;`, an encoded `/`, `.`, `\\`, `;`, `%` or NUL, a `%` without two hex digits,
    anything but printable ASCII unencoded (control characters, spaces, raw bytes), or encoded bytes that
    are not UTF-8 (overlong forms such as %c0%ae)."""
    if any(c in path for c in '\\;') or not all(0x20 < ord(c) < 0x7f for c in path):
        return None         # raw bytes outside printable ASCII too: a request-target has none
    for match in _PERCENT.finditer(path):
        if match['hex'] is None or int(match['hex'], 16) in _AMBIGUOUS_ENCODED:
            return None
    try:
        decoded = unquote_to_bytes(path).decode('utf-8', errors='strict')
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in decoded):
        return None
    if unicodedata.normalize('NFKC', decoded) != decoded:
        return None         # fullwidth dots and slashes, ligatures: a server may normalise them
    if any(segment and not segment.strip(' \t.') for segment in decoded.split('/')):
        return None         # `.`, `..`, `...`, `.. `: dots and blanks alone, which servers resolve or trim
    return decoded


def forge_path(path: str, resolve: bool = True) -> str:
    """The path as a forge resolves it, for gating (a denial, so generously): up to a `#`, decoded until it
    stays the same (at most a few times), `\\` as `/`, each segment without `;parameters` and trailing
    blanks and dots, `//` and `.` segments dropped, `..` resolved (or, without `resolve`, kept as a name),
    Unicode-normalised (NFKC) and case-folded."""
    path = path.split('#', 1)[0]
    for _ in range(4):
        decoded = unquote(path, errors='replace')
        if decoded == path:
            break
        path = decoded
    resolved: list[str] = []
    path = unicodedata.normalize('NFKC', path)
    for segment in path.replace('\\', '/').split('/'):
        segment = segment.split(';', 1)[0].strip(' \t')
        if segment.strip('.'):
            segment = segment.rstrip(' \t.')       # `app.`, `app%20`: the name a forge trims them to
        if segment in ('', '.'):
            continue
        if segment == '..' and resolve:
            if resolved:
                resolved.pop()
            continue
        resolved.append(segment)
    return '/' + '/'.join(resolved).casefold()


def _repo_segment(segment: str) -> str:
    segment = unicodedata.normalize('NFKC', segment).casefold()
    return segment[:-4].rstrip(' \t.') if segment.endswith('.git') else segment


# --- addresses: the project's own table of what is not public, and of IPv6 forms that embed IPv4

SPECIAL_V4 = tuple(ipaddress.IPv4Network(n) for n in (
    '0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12',
    '192.0.0.0/24', '192.0.2.0/24', '192.88.99.0/24', '192.168.0.0/16', '198.18.0.0/15', '198.51.100.0/24',
    '203.0.113.0/24', '224.0.0.0/4', '240.0.0.0/4'))
SPECIAL_V6 = tuple(ipaddress.IPv6Network(n) for n in (
    '::/128', '::1/128', '::/96', '::ffff:0:0/96', '::ffff:0:0:0/96', '64:ff9b::/96', '64:ff9b:1::/48',
    '100::/64', '100:0:0:1::/64', '2001::/23', '2001:db8::/32', '2002::/16', '3fff::/20', '5f00::/16', 'fc00::/7',
    'fe80::/10',
    'fec0::/10', 'ff00::/8'))


def _v4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value & 0xFFFFFFFF)


# The local-use NAT64 prefix (RFC 8215): where the IPv4 address sits in it depends on the length of the
# prefix each network picks (RFC 6052), so no one reading is right; refused whole (SPECIAL_V6).
NAT64_LOCAL = ipaddress.IPv6Network('64:ff9b:1::/48')


# (network, the IPv4 addresses an address of it embeds)
EMBEDDED_V4 = (
    (ipaddress.IPv6Network('::ffff:0:0/96'), lambda v: [_v4(v)]),                 # IPv4-mapped
    (ipaddress.IPv6Network('::ffff:0:0:0/96'), lambda v: [_v4(v)]),               # IPv4-translated (SIIT)
    (ipaddress.IPv6Network('64:ff9b::/96'), lambda v: [_v4(v)]),                  # NAT64, well-known prefix
    (ipaddress.IPv6Network('2002::/16'), lambda v: [_v4(v >> 80)]),               # 6to4
    (ipaddress.IPv6Network('2001::/32'), lambda v: [_v4(v >> 64), _v4(~v)]),      # Teredo: server, client
    (ipaddress.IPv6Network('::/96'), lambda v: [_v4(v)]),                         # IPv4-compatible (deprecated)
)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address embeds (EMBEDDED_V4); none for the others (and for :: and ::1)."""
    if address in (ipaddress.IPv6Address('::'), ipaddress.IPv6Address('::1')):
        return []
    value = int(address)
    for network, extract in EMBEDDED_V4:
        if address in network:
            return extract(value)
    return []


def not_public(address: IPAddress) -> bool:
    """Not a public unicast address, by the project's table or by Python's (whichever says so)."""
    table = SPECIAL_V4 if address.version == 4 else SPECIAL_V6
    return any(address in network for network in table) or not address.is_global or address.is_multicast
