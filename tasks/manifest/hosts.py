"""Allowed hosts: the host patterns, HostEntry (one allowed host, as the Agent holds it and as it goes into
the egress rules), HostList (the kind of the `network` host lists), CLAUDE_CODE_HOSTS, and the hosts a
skill declares in its SKILL.md front matter.

Apart because one syntax serves manifests and skills, and what it means is the egress proxy's
(daemons/proxy/rules.py).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from daemons.proxy.rules import HostRule, is_ip, noncanonical_ipv4    # standard library only, shared with the proxy
from tasks.manifest.kinds import Index, Kind, Text, quote, show, unknown_keys
from tasks.manifest.yaml_file import YAML_LINE_BREAK, Document, Problem, parse, read_text

HOST_NAME = Text('host name', 'a host name such as api.anthropic.com',
                 r'(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*'
                 r'[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?', max_length=253)

WILDCARD = '*.'
HTTP_METHODS = ('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS')
# What Claude Code itself needs, from its network documentation (code.claude.com/docs/en/network-config):
# the API, and claude.ai and platform.claude.com for signing in. Telemetry and error reports
# (statsig.anthropic.com, sentry.io, in older versions of that page) are left out on purpose.
CLAUDE_CODE_HOSTS = ['api.anthropic.com', 'claude.ai', 'platform.claude.com']


def _host_problem(host: str) -> str | None:
    name = host.removeprefix(WILDCARD)
    if noncanonical_ipv4(name):
        return f'{quote(name)} is an address in a form resolvers accept but rules cannot check; write it as a.b.c.d'
    if host.startswith(WILDCARD) and name.replace('.', '').isdigit():
        return f'{quote(host)}: an address has no subdomains; write the address alone'
    return None


def _network_problem(text: str) -> str | None:
    try:
        ipaddress.ip_network(text)
    except ValueError as err:
        return (f'{quote(text)} is not a network ({err}); write an address and its prefix length, '
                'such as 10.20.0.0/16 or 192.168.5.7/32')
    return None


class AddressMap(Kind):
    """name: address, the names the egress proxy resolves itself (network.hosts)."""
    name = 'map of host name: address'

    def problems(self, value):
        if not isinstance(value, dict):
            yield (), f'expected a mapping of host name: address (registry.internal: 10.20.0.5), got {show(value)}'
            return
        for key, address in value.items():
            error = HOST_NAME.problem(key)
            if error:
                yield (key,), error
            elif key.replace('.', '').isdigit() or noncanonical_ipv4(key):
                yield (key,), f'{quote(key)} is an address, not a name; only names are mapped'
            elif not isinstance(address, str) or not is_ip(address):
                yield (key,), f'{show(address)} is not an IP address such as 10.20.0.5 or fd00::5'

    def schema(self):
        return {'type': 'object', 'propertyNames': HOST_NAME.schema(), 'additionalProperties': {'type': 'string'}}

    def convert(self, value, base_dir):
        return {key.lower().rstrip('.'): str(ipaddress.ip_address(address)) for key, address in value.items()}


HOST_PATTERN = Text('host', 'a host name such as api.github.com, or *.github.com for that domain and every '
                    'name under it', rf'(?:\*\.)?(?:{HOST_NAME.pattern.pattern})', max_length=255,
                    rule=_host_problem)
PATH_PREFIX = Text('path prefix', 'a path prefix starting with "/" such as /repos/acme/ (no spaces)',
                   r'/[!-~]*', max_length=2048)
NETWORK = Text('network', 'a network such as 10.20.0.0/16', rule=_network_problem)


@dataclass(frozen=True)
class HostEntry:
    """One allowed host: a name, or `*.domain` for the domain and every name under it, optionally
    narrowed to some methods and path prefixes."""
    host: str
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.host.removeprefix(WILDCARD)

    def covers(self, host: str) -> bool:
        """Whether a request to `host` (a name in lower case) is to this entry's host (methods and paths aside)."""
        name = self.name.lower()
        return host == name or self.host.startswith(WILDCARD) and host.endswith(f'.{name}')

    def rule(self) -> dict:
        """The entry in the rules format, written by daemons/proxy/rules.py's own HostRule: methods sorted
        and each once, as the rules file holds them whatever order the manifest gives."""
        return HostRule(self.name.lower(), self.host.startswith(WILDCARD),
                        frozenset(self.methods) if self.methods else None, self.paths or None).to_json()


class HostList(Kind):
    """Allowed hosts: each a host name, `*.domain`, or {host, methods, paths}."""
    name = 'list of hosts: `name`, `*.domain` or `{host, methods, paths}`'
    ENTRY_KEYS = ('host', 'methods', 'paths')

    def problems(self, value):
        if not isinstance(value, list):
            yield (), f'expected a list (one "- host" per line, or [a, b]), got {show(value)}'
            return
        for i, entry in enumerate(value):
            at = (Index(i),)
            if isinstance(entry, str):
                yield from ((at + below, error) for below, error in HOST_PATTERN.problems(entry))
            elif isinstance(entry, dict):
                yield from ((at + below, error) for below, error in self._entry_problems(entry))
            else:
                yield at, (f'expected a host name, *.domain or a mapping such as {{host: api.github.com, '
                           f'methods: [GET], paths: [/repos/acme/]}}, got {show(entry)}')

    def _entry_problems(self, entry: dict):
        for key, problem in unknown_keys(entry, self.ENTRY_KEYS, 'a host entry'):
            yield (key,), problem
        if 'host' not in entry:
            yield (), 'a host entry needs host: NAME or *.DOMAIN'
        else:
            yield from ((('host',) + below, error) for below, error in HOST_PATTERN.problems(entry['host']))
        for key, item_problem in (('methods', self._method_problem), ('paths', PATH_PREFIX.problem)):
            if key not in entry:
                continue
            items = entry[key]
            if not isinstance(items, list) or not items:
                yield (key,), (f'expected a non-empty list, such as {key}: '
                               f'{"[GET, HEAD]" if key == "methods" else "[/repos/acme/]"}, got {show(items)}; '
                               f'leave {key} out to allow any')
                continue
            for j, item in enumerate(items):
                error = item_problem(item)
                if error:
                    yield (key, Index(j)), error

    @staticmethod
    def _method_problem(method) -> str | None:
        if not isinstance(method, str) or method not in HTTP_METHODS:
            return f'expected an HTTP method in capitals, one of {", ".join(HTTP_METHODS)}; got {show(method)}'
        return None

    def schema(self):
        return {'type': 'array', 'items': {'anyOf': [HOST_PATTERN.schema(), {
            'type': 'object', 'required': ['host'], 'additionalProperties': False,
            'properties': {'host': HOST_PATTERN.schema(),
                           'methods': {'type': 'array', 'minItems': 1, 'items': {'enum': list(HTTP_METHODS)}},
                           'paths': {'type': 'array', 'minItems': 1, 'items': PATH_PREFIX.schema()}}}]}}

    def convert(self, value, base_dir):
        return tuple(HostEntry(entry) if isinstance(entry, str) else HostEntry(
            entry['host'], tuple(entry['methods']) if 'methods' in entry else None,
            tuple(entry['paths']) if 'paths' in entry else None) for entry in value)


HOSTS = HostList()


# --- hosts a skill declares

SKILL_HOSTS_KEY = 'allow_hosts'
FRONT_MATTER_FENCE = '---'


def skill_hosts(path: Path, display: str, problems: list[Problem]) -> tuple[HostEntry, ...]:
    """The hosts a SKILL.md declares under `allow_hosts:` in its YAML front matter (the block between
    the first line `---` and the next), in the manifests' syntax; a file without front matter
    declares none. Its problems are reported with the SKILL.md's own lines."""
    text = read_text(path, display, problems, 'a skill needs a regular SKILL.md')
    if text is None:
        return ()
    lines = YAML_LINE_BREAK.split(text)
    if lines[0].rstrip() != FRONT_MATTER_FENCE:
        return ()
    end = next((n for n, line in enumerate(lines[1:], 1) if line.rstrip() == FRONT_MATTER_FENCE), None)
    if end is None:
        problems.append(Problem(display, 1, None, f'the front matter opened by "{FRONT_MATTER_FENCE}" on line 1 '
                                                  f'is never closed; end it with a line "{FRONT_MATTER_FENCE}"'))
        return ()
    doc = Document(path, display)
    # The fence line left blank, so that YAML counts the lines as the file does.
    if not parse('\n'.join([''] + lines[1:end]) + '\n', doc, problems):
        return ()
    if doc.data is None:
        return ()
    if not isinstance(doc.data, dict):
        problems.append(Problem(display, doc.lines.get(()), None,
                                f'the front matter must be a mapping such as name:, description:, got {show(doc.data)}'))
        return ()
    if SKILL_HOSTS_KEY not in doc.data:
        return ()
    value = doc.data[SKILL_HOSTS_KEY]
    found = [doc.problem((SKILL_HOSTS_KEY,) + below, error) for below, error in HOSTS.problems(value)]
    problems.extend(found)
    return () if found else HOSTS.convert(value, path.parent)
