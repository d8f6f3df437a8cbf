"""Bound secrets: a host environment variable and where its value may go (Secret), the kind of `secrets`
(SecretList), and the two secrets with a known binding (DEFAULT_BINDINGS).

The guest never holds a secret's value: it holds a placeholder, and the egress proxy puts the value into the
bound header of requests to the bound hosts (daemons/proxy: rules.py's `secrets`). So every secret needs a
binding; a bare name is allowed only for a secret whose binding is known. Apart because what a binding means
is the proxy's, like hosts.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from daemons.proxy.rules import settable_header      # standard library only, shared with the proxy
from tasks.manifest.hosts import HOST_NAME
from tasks.manifest.kinds import MAX_NAME_BYTES, Index, Kind, Text, quote, show, unknown_keys

ENV_NAME = Text('name', 'an environment variable name such as API_TOKEN', r'[A-Za-z_][A-Za-z0-9_]*',
                max_length=MAX_NAME_BYTES)
HEADER = Text('header', 'an HTTP header name such as Authorization', r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", max_length=128)
FORMAT = Text('format', 'a header value with {} where the value goes, such as "Bearer {}"', max_length=512,
              rule=lambda text: None if text.count('{}') == 1 and '\r' not in text and '\n' not in text
              else f'{quote(text)} must hold "{{}}" exactly once (where the value goes), on one line')
ANTHROPIC_HOST = 'api.anthropic.com'
BASE_URL_ENV = 'ANTHROPIC_BASE_URL'
# name -> (header, format): bound to the Anthropic API's host (the host of the manifest's ANTHROPIC_BASE_URL).
DEFAULT_BINDINGS = {'ANTHROPIC_API_KEY': ('x-api-key', '{}'),
                    'CLAUDE_CODE_OAUTH_TOKEN': ('Authorization', 'Bearer {}')}


@dataclass(frozen=True)
class Secret:
    """A host environment variable whose value goes only into `header` (as `format` with the value for {}) of
    requests to `hosts`; `hosts` is None for a default binding until load_agents resolves it."""
    name: str
    hosts: tuple[str, ...] | None
    header: str
    format: str = '{}'

    def binding(self) -> dict:
        """The secret in the rules format, but for the placeholder (tasks/secrets.py adds it)."""
        return {'name': self.name, 'hosts': list(self.hosts or ()), 'header': self.header, 'format': self.format}


def anthropic_host(env: dict[str, str]) -> str:
    """Where Claude Code sends its API requests: the host of the manifest's ANTHROPIC_BASE_URL, or Anthropic's."""
    url = env.get(BASE_URL_ENV)
    return (urlsplit(url).hostname or ANTHROPIC_HOST) if url else ANTHROPIC_HOST


class SecretList(Kind):
    """`secrets`: bare names with a known binding, or {name, hosts, header, format}."""
    name = 'list of `NAME` or `{name, hosts, header, format}`'
    ENTRY_KEYS = ('name', 'hosts', 'header', 'format')
    EXAMPLE = '{name: GITHUB_TOKEN, hosts: [api.github.com], header: Authorization, format: "Bearer {}"}'

    def problems(self, value):
        if not isinstance(value, list):
            yield (), f'expected a list of secrets such as [ANTHROPIC_API_KEY, {self.EXAMPLE}], got {show(value)}'
            return
        seen = set()
        for i, entry in enumerate(value):
            at = (Index(i),)
            if isinstance(entry, str):
                error = ENV_NAME.problem(entry)
                if error:
                    yield at, error
                elif entry not in DEFAULT_BINDINGS:
                    yield at, (f'{entry!r} has no binding, and a secret without one would have to enter the guest; '
                               f'say where its value may go: - {self.EXAMPLE.replace("GITHUB_TOKEN", entry)} '
                               f'(a bare name is only for {", ".join(DEFAULT_BINDINGS)})')
                name = entry
            elif isinstance(entry, dict):
                yield from self._entry_problems(at, entry)
                name = entry.get('name')
            else:
                yield at, f'expected a variable name or a mapping such as {self.EXAMPLE}, got {show(entry)}'
                continue
            if isinstance(name, str) and name in seen:
                yield at, f'{name!r} is listed twice; keep one'
            seen.add(name if isinstance(name, str) else None)

    def _entry_problems(self, at: tuple, entry: dict):
        for key, problem in unknown_keys(entry, self.ENTRY_KEYS, 'a secret'):
            yield at + (key,), problem
        if 'name' not in entry:
            yield at, f'a secret needs its name, such as {self.EXAMPLE}'
        else:
            yield from ((at + ('name',) + below, error) for below, error in ENV_NAME.problems(entry['name']))
        hosts = entry.get('hosts')
        if not isinstance(hosts, list) or not hosts:
            yield at + ('hosts',), (f'expected the hosts the value may go to, such as [api.github.com], got '
                                    f'{show(hosts)}')
        else:
            for j, host in enumerate(hosts):
                yield from ((at + ('hosts', Index(j)) + below, error) for below, error in HOST_NAME.problems(host))
        if 'header' not in entry:
            yield at, f'a secret needs the header its value goes in, such as {self.EXAMPLE}'
        else:
            error = HEADER.problem(entry['header']) or settable_header(entry['header'])
            if error:
                yield at + ('header',), error
        if 'format' in entry:
            yield from ((at + ('format',) + below, error) for below, error in FORMAT.problems(entry['format']))

    def schema(self):
        return {'type': 'array', 'uniqueItems': True, 'items': {'anyOf': [
            {'enum': list(DEFAULT_BINDINGS)},
            {'type': 'object', 'required': ['name', 'hosts', 'header'], 'additionalProperties': False,
             'properties': {'name': ENV_NAME.schema(),
                            'hosts': {'type': 'array', 'minItems': 1, 'items': HOST_NAME.schema()},
                            'header': HEADER.schema(), 'format': {**FORMAT.schema(), 'pattern': r'\{\}'}}}]}}

    def convert(self, value, base_dir):
        secrets = []
        for entry in value:
            if isinstance(entry, str):
                header, form = DEFAULT_BINDINGS[entry]
                secrets.append(Secret(entry, None, header, form))
            else:
                secrets.append(Secret(entry['name'], tuple(h.lower().rstrip('.') for h in entry['hosts']),
                                      entry['header'], entry.get('format', '{}')))
        return tuple(secrets)


def resolved(secrets: tuple[Secret, ...], env: dict[str, str]) -> tuple[Secret, ...]:
    """Default bindings given the Anthropic API's host of this manifest's env."""
    host = anthropic_host(env)
    return tuple(s if s.hosts is not None else Secret(s.name, (host.lower(),), s.header, s.format) for s in secrets)

