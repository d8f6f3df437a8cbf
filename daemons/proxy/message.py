"""What the fence reads in a request message itself, whatever a bottle's rules say: which authority it
names, whether a server could read its head otherwise than the proxy does, and which method it asks for
besides its own.

Standard library only, like rules.py: the addon imports it inside mitmproxy's own environment. The proxy
speaks HTTP/1 to bottles (http2=false), and re-serialises what it forwards, so what a server reads is
what these checks see, provided that:

- the request line says HTTP/1.1 or HTTP/1.0 (mitmproxy reads any `HTTP/d.d`, and `HTTP/2.0` would make it
  keep the guest's absolute form and Host);
- every header name is a token and no value holds a control character (a bare CR, a folded line, NUL: a
  server that splits on them would read headers the proxy did not);
- there is at most one Host (and one Content-Type, Content-Length, Transfer-Encoding), naming the checked
  host and port strictly (`name[:digits]`, no userinfo);
  what goes up then carries the proxy's own Host for that host and port;
- no header that makes a server route elsewhere (ROUTING_HEADERS) is present;
- a GET, HEAD, OPTIONS or TRACE has no body: a server that ignores its length would read the body as a
  second request the proxy never checked;
- the request-target holds no raw `#` (servers end the path there; the proxy would check what follows).

A method override is any of METHOD_OVERRIDE_HEADERS (every character but a letter or digit read as `-`:
CGI gateways map `_`, lighttpd all of them, PHP `.`), an override parameter in the query, or in a body a
framework reads as parameters: a form (no declared type too: Rack reads a POST without one as a form),
any multipart body (a part's name, quoted either way, or its Content-ID, which Rack names a part by), or
JSON (any type that says json: Laravel reads `*/json*`). A JSON body the proxy cannot read is refused.
The media type ends at `;`, `,` or a blank (Rack splits at `,`, PHP at a blank too). Parameter names are
read as PHP keys them, generously: cut at NUL, blanks around dropped, ` `, `.` and `[` as `_`,
`name[...]` as `name`, any case; an override parameter is `_method` with any leading punctuation,
`_HttpMethod`, or a header's name.
"""
from __future__ import annotations

import json
import re
from urllib.parse import unquote_plus

VERSIONS = ('HTTP/1.1', 'HTTP/1.0')
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb'[\x00-\x08\x0a-\x1f\x7f]')      # every control character but HTAB
# Headers a server or framework behind the host may route by instead of the checked target.
ROUTING_HEADERS = ('x-original-url', 'x-rewrite-url', 'x-forwarded-host', 'x-forwarded-server', 'x-host',
                   'x-original-host', 'x-forwarded-prefix', 'forwarded')
BODYLESS = ('GET', 'HEAD', 'OPTIONS', 'TRACE')
# Headers that servers read one of (the first, or the last): two are refused.
SINGLE = ('host', 'content-type', 'content-length', 'transfer-encoding')
_AUTHORITY = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._~!$&'()*+,=-]+))"
                        r"(?::(?P<port>[0-9]{1,5}))?")

METHOD_OVERRIDE_HEADERS = ('x-http-method-override', 'x-http-method', 'x-method-override')
_OVERRIDE_PARAMETER = re.compile(r'[^a-z0-9]+(?:http)?method')
# A body the proxy reads for an override: at most this long, sent with a Content-Length (stream_large_bodies
# is 1m: up to it the body is held until it is whole), not encoded.
BODY_LIMIT = 1 << 20
_FORM_TYPES = ('', 'application/x-www-form-urlencoded')
_PART_NAMES = re.compile(rb"(?i)(?:\bname\*?\s*=\s*|content-id\s*:\s*)([^;\r\n]*)")


class UnreadableBody(ValueError):
    """A body a framework could read an override from that the proxy cannot read: refused."""


def default_port(scheme: str) -> int:
    return 443 if scheme == 'https' else 80


def named(authority: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) an authority names strictly (`name`, `name:port`, `[v6]:port`), the scheme's port when it
    names none; None for anything else (userinfo, a second colon, `+443`, a port over 65535)."""
    match = _AUTHORITY.fullmatch(authority)
    if not match or (match['port'] and int(match['port']) > 65535):
        return None
    host = (match['v6'] or match['name']).lower().rstrip('.')
    return host, int(match['port']) if match['port'] else default_port(scheme)


def host_header(host: str, port: int, scheme: str) -> str:
    """The Host the proxy sends up for a checked host and port."""
    shown = f'[{host}]' if ':' in host else host
    return shown if port == default_port(scheme) else f'{shown}:{port}'


def shown(value: bytes | str, limit: int = 80) -> str:
    """Text from the guest as it may appear in a refusal: printable ASCII, escaped otherwise, bounded."""
    if isinstance(value, str):
        value = value.encode('utf-8', 'surrogateescape')
    text = value[:limit].decode('ascii', 'backslashreplace')
    text = ''.join(c if ' ' <= c <= '~' else f'\\x{ord(c):02x}' for c in text)
    return text + ('...' if len(value) > limit else '')


def head_refusal(version: str, method: str, target: str, fields, scheme: str, host: str, port: int) -> str | None:
    """Why this request head could be read otherwise by a server than by the proxy, or None. `target`: the
    request-target's path and query; `fields`: the (name, value) byte pairs as received; `host`, `port`:
    the checked target."""
    if version not in VERSIONS:
        return f'the request line says {shown(version)}; the proxy speaks HTTP/1.1 and HTTP/1.0 only'
    if '#' in target:
        return 'the request-target holds a raw #, where a server ends the path'
    hosts, seen = [], {}
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return f'the header name {shown(name)} is not a token'
        if _CONTROL.search(value):
            return (f'the header {shown(name)} holds a control character (a CR, LF or NUL a server could read as '
                    'the end of a header)')
        lower = name.lower().decode()
        if lower in SINGLE:
            seen[lower] = seen.get(lower, 0) + 1
            if seen[lower] > 1:
                return f'the request has more than one {shown(name)} header'
        if lower == 'host':
            hosts.append(value)
        elif lower in ROUTING_HEADERS:
            return f'the header {shown(name)} would let a server route the request elsewhere than its target'
        elif method.upper() in BODYLESS and (lower == 'transfer-encoding' or lower == 'content-length'
                                             and value.strip() != b'0'):
            return (f'a {method.upper()} with a body is refused: a server that ignores its length would read the '
                    'body as another request')
    if hosts and named(hosts[0].decode('latin-1').strip(), scheme) != (host, port):
        return f'the Host header {shown(hosts[0])} does not name the target {host_header(host, port, scheme)}'
    return None


def _asked(value) -> str:
    """The method an override asks for, as a refusal may show it."""
    letters = re.sub('[^A-Z]', '', str(value).upper())[:16]
    return letters or '(not a method name)'


def parameter_key(name: str) -> tuple[str, ...]:
    """The keys a server may file a parameter name under, generously (a denial): cut at NUL, blanks around
    dropped, ` ` and `.` as `_` (PHP), without case; then its part before a `[` (an array), or with a `[`
    read as `_` (PHP's unclosed bracket), the first or all of them."""
    name = name.split('\0', 1)[0].strip(' \t').lower().replace(' ', '_').replace('.', '_')
    return (name.split('[', 1)[0].strip(), name.replace('[', '_', 1).split('[', 1)[0].strip(),
            name.replace('[', '_').strip())


def _canonical(name: str) -> str:
    """A header name as gateways make it a variable: every run of characters but letters and digits a `-`."""
    return re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')


def is_override_name(name: str) -> bool:
    return any(_OVERRIDE_PARAMETER.fullmatch(key) or _canonical(key) in METHOD_OVERRIDE_HEADERS
               for key in parameter_key(name))


def method_override(headers, query: str) -> str | None:
    """The method a request asks for by a method-override header or query parameter, if any. `headers`:
    (name, value) pairs."""
    for name, value in headers:
        if _canonical(name) in METHOD_OVERRIDE_HEADERS:
            return _asked(value)
    for name, value in _pairs(query):
        if is_override_name(name):
            return _asked(value)
    return None


def _pairs(text: str):
    """(name, value) of a query or form, split on `&` and `;` (older Rack splits on both), `+` as a blank."""
    for pair in re.split('[&;]', text):
        name, _, value = pair.partition('=')
        yield unquote_plus(name, errors='surrogateescape'), unquote_plus(value, errors='surrogateescape')


def media_type(content_type: str | None) -> str:
    """The media type as the most lenient framework reads it: up to `;`, `,` or a blank, without case."""
    return re.split(r'[;,\s]', (content_type or '').strip().lower(), maxsplit=1)[0]


def body_checked(content_type: str | None) -> bool:
    """Whether a framework could read parameters, and so a `_method`, from a body of this type."""
    media = media_type(content_type)
    return media in _FORM_TYPES or media.startswith('multipart/') or 'json' in media


def body_override(content_type: str | None, body: bytes) -> str | None:
    """The method a body asks for by an override field, if any (body_checked says which bodies); UnreadableBody
    for a JSON body the proxy cannot read."""
    media = media_type(content_type)
    if media.startswith('multipart/'):       # every part's name and Content-ID: generous, as a denial
        for match in _PART_NAMES.finditer(body):
            for raw in re.findall(r"[^\s\"'<>]+", match[1].decode('latin-1')):
                if is_override_name(raw) or is_override_name(unquote_plus(raw.rpartition("'")[2])):
                    return '(a form field)'
        return None
    if media in _FORM_TYPES:
        for name, value in _pairs(body.decode('latin-1')):
            if is_override_name(name):
                return _asked(value)
        return None
    try:        # numbers as text: Python refuses integers of over 4300 digits, which PHP and Node read
        pairs = json.loads(body, object_pairs_hook=lambda pairs: pairs, parse_int=str, parse_float=str,
                           parse_constant=str)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        raise UnreadableBody(f'its JSON body cannot be read ({type(err).__name__})') from None
    if isinstance(pairs, list):
        for item in pairs:
            if isinstance(item, tuple) and is_override_name(item[0]):
                return _asked(item[1])
    return None
