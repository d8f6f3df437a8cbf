"""A bottle's rules decide what servers will read, not what the strings say (daemons/proxy/rules.py and
message.py): a narrowed path is never passed by a form a server could read otherwise, a narrowed method never by
an override (in a header, the query or the body, however a framework spells its name), a gated repository is
matched as a forge resolves paths, an IPv6 address that embeds an IPv4 one is judged as that IPv4 address by the
project's own table, and a Host names the target only in the strict form. Many generated variants each
(hypothesis); the same through the real proxy is in tests/test_proxy.py, through a real bottle in
tests/test_fence.py."""
from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'daemons' / 'proxy'))   # as the addon imports it
import message  # noqa: E402
import rules  # noqa: E402

pytestmark = pytest.mark.fast
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NARROWED = rules.Rules.from_json({'hosts': [
    {'host': 'api.example.com', 'methods': ['GET'], 'paths': ['/ok/']},
    {'host': 'open.example.com'}],
    'gated': [{'host': 'github.com', 'path': '/acme/app'}]})

SAFE = st.text(alphabet='abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_~', min_size=1, max_size=8)
PLAIN_NAMES = SAFE.filter(lambda name: not message.is_override_name(name))     # parameters that ask for no method
# Forms a server may read otherwise than a prefix check does: dot segments hidden or encoded, encoded
# separators, matrix parameters, NUL, double encoding, overlong UTF-8, backslashes.
TRICKS = st.sampled_from([
    '..;', '..;/', '%2e%2e', '%2E%2e', '.%2e', '%252e%252e', '%2f', '%2F', '..%2f', '%5c', '\\', '..\\',
    '..%00', '%00', ';x=1', ';', '%c0%ae%c0%ae', '%e0%80%ae', '%c0%af', '%25', '%', '%zz', './', '../', '%09',
    '%3b', '%ff', '..%20', '%20..', '...', '.%09', '%ef%bc%8e%ef%bc%8e', '%ef%bc%8f', '%ef%ac%81'])
# The headers servers and frameworks read as the method instead of the request line's.
OVERRIDE_HEADERS = ['X-HTTP-Method-Override', 'X-HTTP-Method', 'X-Method-Override',
                    'X_HTTP_Method_Override', 'X-HTTP_Method', 'X_Method_Override']     # CGI reads `_` as `-`


def path_of(segments: list[str]) -> str:
    return '/'.join(segments)


@SETTINGS
@given(before=st.lists(SAFE, max_size=3), trick=TRICKS, after=st.lists(SAFE, max_size=3))
@example(before=[], trick='..;', after=['private'])
def test_a_narrowed_path_refuses_every_form_a_server_could_read_otherwise(before, trick, after):
    path = '/ok/' + path_of(before + [trick] + after)
    assert NARROWED.refusal('GET', 'api.example.com', path) is not None, path


@SETTINGS
@given(tail=st.text(max_size=12), raw=st.binary(max_size=6))
@example(tail='', raw=b'\xc0\xae\xc0\xae/private')
def test_any_path_at_all_is_judged_and_passes_only_as_the_plain_prefix_it_names(tail, raw):
    """Whatever the agent sends: raw bytes (mitmproxy hands them over as surrogate escapes), spaces, any
    character; the decision never fails, and an allowed path is printable ASCII under the prefix."""
    path = '/ok/' + tail + raw.decode('utf-8', 'surrogateescape')
    reason = NARROWED.refusal('GET', 'api.example.com', path)
    NARROWED.gated_refusal('github.com', path)
    if reason is None:
        assert all(0x20 < ord(c) < 0x7f for c in path) and rules.unambiguous_path(path).startswith('/ok/'), path


@SETTINGS
@given(segments=st.lists(SAFE, max_size=4), encode=st.booleans())
def test_a_plain_path_under_the_prefix_passes_encoded_or_not(segments, encode):
    path = '/ok/' + path_of(segments)
    if encode:      # percent-encoding an unreserved character changes nothing a server reads
        path = ''.join(f'%{ord(c):02X}' if c.isalpha() and i % 3 == 0 else c for i, c in enumerate(path))
    assert NARROWED.refusal('GET', 'api.example.com', path) is None, path
    assert NARROWED.refusal('GET', 'api.example.com', '/nope/' + path_of(segments)) is not None


@SETTINGS
@given(header=st.sampled_from(OVERRIDE_HEADERS), case=st.sampled_from([str.lower, str.upper, str.title]),
       method=st.sampled_from(['DELETE', 'PUT', 'POST', 'get']), query=st.lists(PLAIN_NAMES, max_size=2))
def test_a_method_override_is_refused_where_methods_are_narrowed(header, case, method, query):
    by_header = message.method_override([(case(header), method)], '&'.join(query))
    assert by_header == method.upper()
    assert NARROWED.refusal('GET', 'api.example.com', '/ok/x', by_header) is not None
    by_parameter = message.method_override([], '&'.join([*query, f'{case("_method")}={method}']))
    assert NARROWED.refusal('GET', 'api.example.com', '/ok/x', by_parameter) is not None
    assert NARROWED.refusal('GET', 'open.example.com', '/x', by_header) is None     # no narrowing there
    assert NARROWED.refusal('GET', 'api.example.com', '/ok/x', message.method_override([], '&'.join(query))) is None


# How frameworks spell the override's name: PHP drops leading blanks and `+`, reads ` `, `.` and an unclosed `[`
# as `_`, cuts at NUL and files `_method[x]` under `_method`; CGI reads `_` in a header name as `-`; any case.
NAME_FORMS = st.sampled_from(['{n}', '+{n}', '%20{n}', '{n}%00junk', '{n}[]', '{n}[x]', '{n}%5b', '{n}+', ' {n}'])
OVERRIDE_NAMES = st.sampled_from(['_method', '.method', '[method', '%2emethod', '_METHOD', '_HttpMethod',
                                  'X-HTTP-Method-Override', 'x_http_method_override'])


@SETTINGS
@given(name=OVERRIDE_NAMES, form=NAME_FORMS, query=st.lists(PLAIN_NAMES, max_size=2), separator=st.sampled_from('&;'))
def test_an_override_parameter_is_found_however_its_name_is_spelled(name, form, query, separator):
    spelled = form.format(n=name)
    pairs = separator.join([*query, f'{spelled}=DELETE'])
    assert message.method_override([], pairs) == 'DELETE', pairs
    for content_type in (None, 'application/x-www-form-urlencoded; charset=utf-8', 'APPLICATION/X-WWW-FORM-URLENCODED'):
        assert message.body_checked(content_type)
        assert message.body_override(content_type, pairs.encode()) == 'DELETE', (content_type, pairs)


@SETTINGS
@given(name=OVERRIDE_NAMES, other=st.lists(PLAIN_NAMES, max_size=3))
def test_an_override_in_a_multipart_or_json_body_is_found(name, other):
    name = name.replace('%2e', '.')
    fields = [*other, name]
    multipart = b''.join(b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\nDELETE\r\n' % f.encode()
                         for f in fields) + b'--B--\r\n'
    assert message.body_override('multipart/form-data; boundary=B', multipart) is not None
    rfc2231 = multipart.replace(b'name="%s"' % name.encode(), b"name*=utf-8''%s" % name.encode())
    assert message.body_override('multipart/form-data; boundary=B', rfc2231) is not None
    body = json.dumps({**{f: 'x' for f in other}, name: 'DELETE'}).encode()
    for content_type in ('application/json', 'application/vnd.api+json'):
        assert message.body_override(content_type, body) == 'DELETE'
    plain = json.dumps({f: 'x' for f in other}).encode()
    assert message.body_override('application/json', plain) is None
    form = b'&'.join(f.encode() + b'=1' for f in other)
    assert message.body_override('application/x-www-form-urlencoded', form) is None


@SETTINGS
@given(media=st.sampled_from(['application/x-www-form-urlencoded, text/plain', 'application/x-www-form-urlencoded x',
                              'Application/X-WWW-Form-Urlencoded;charset=utf-8', '']),
       header=st.sampled_from(['X.HTTP.Method.Override', 'X~HTTP~Method~Override', 'X-HTTP-Method.Override',
                               'x http method', 'X__Method__Override']))
def test_a_form_is_read_whatever_follows_its_type_and_an_override_header_however_a_gateway_spells_it(media, header):
    """Rack ends a media type at `,`, PHP at a blank too; lighttpd maps every non-alphanumeric character of a
    header name to `_`, PHP `.` and blanks."""
    assert message.body_checked(media) and message.body_override(media, b'a=1&_method=DELETE') == 'DELETE'
    assert message.method_override([(header, 'DELETE')], '') == 'DELETE'


@pytest.mark.parametrize('content_type, body', [
    ('multipart/mixed; boundary=B', b'--B\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--B--'),
    ('multipart/related; boundary=B', b'--B\r\nContent-ID: <_method>\r\n\r\nDELETE\r\n--B--'),
    ('multipart/form-data; boundary=B', b"--B\r\nContent-Disposition: form-data; name='_method'\r\n\r\nPUT\r\n--B--"),
    ('application/json5', b'{"_method": "DELETE"}'),
    ('text/x-json', b'{"a": 1, "_method": "DELETE"}'),
    ('application/json', b'{"_method": "DELETE", "n": ' + b'1' * 5000 + b'}'),      # past Python's int digits
    ('application/json', b'{"_method": "GET", "_method": "DELETE"}'),                  # the last one wins there
])
def test_every_body_a_framework_reads_parameters_from_is_read(content_type, body):
    assert message.body_checked(content_type)
    assert message.body_override(content_type, body) is not None, content_type


@pytest.mark.parametrize('body', [b'{"_method": "DELETE", "x": ' + b'[' * 5000 + b']' * 5000 + b'}',
                                  b'{"_method": "DELETE"', b'\xff\xfe{}'])
def test_a_json_body_the_proxy_cannot_read_is_refused_not_passed(body):
    with pytest.raises(message.UnreadableBody):
        message.body_override('application/json', body)


def test_a_parameter_that_only_contains_the_word_is_not_an_override():
    for name in ('payment_method', 'method', '_methods', 'x-http-method-overrides'):
        assert message.method_override([], f'{name}=DELETE') is None, name
    assert not message.body_checked('application/octet-stream') and not message.body_checked('text/plain')


AUTHORITY_TRICKS = st.sampled_from(['{h}:8443', '{h}:443@evil.test', 'evil.test@{h}', '{h}:evil.test', '{h}:+443',
                                    '{h}:4_43', '{h}:0443x', '{h}:99999', '{h} :443', '{h}:', 'evil.test',
                                    '{h}.evil.test',
                                    '{h}:443:443', '[{h}]', '{h}/x', '{h}#x', '{h}%00'])


@SETTINGS
@given(trick=AUTHORITY_TRICKS, case=st.sampled_from([str.lower, str.upper]))
def test_a_host_header_names_the_target_only_in_the_strict_form(trick, case):
    host = 'api.example.com'
    value = trick.format(h=case(host))
    fields = [(b'Host', value.encode())]
    assert message.head_refusal('HTTP/1.1', 'GET', '/', fields, 'https', host, 443) is not None, value
    for good in (case(host), f'{case(host)}:443', f'{host}.'):
        assert message.head_refusal('HTTP/1.1', 'GET', '/', [(b'Host', good.encode())], 'https', host, 443) is None, good
    assert message.named(value, 'https') != (host, 443)


@SETTINGS
@given(version=st.from_regex(r'HTTP/[0-9]\.[0-9]', fullmatch=True),
       control=st.sampled_from([b'\r', b'\n', b'\x00', b'\r\n ', b'\x0b', b'\x7f']))
def test_a_head_with_another_version_or_a_control_character_in_a_value_is_refused(version, control):
    fields = [(b'Host', b'api.example.com'), (b'X-Note', b'a' + control + b'Host: evil.test')]
    assert message.head_refusal('HTTP/1.1', 'GET', '/', fields, 'https', 'api.example.com', 443) is not None
    clean = [(b'Host', b'api.example.com')]
    assert (message.head_refusal(version, 'GET', '/', clean, 'https', 'api.example.com', 443) is None) == \
        (version in ('HTTP/1.1', 'HTTP/1.0'))


def case_variant(text: str, flips: list[bool]) -> str:
    return ''.join(c.upper() if flip else c for c, flip in zip(text, flips + [False] * len(text)))


@SETTINGS
@given(flips=st.lists(st.booleans(), max_size=12), git=st.booleans(), slashes=st.sampled_from(['/', '//', '/./', '\\']),
       encode=st.sampled_from([None, '%2f', '%252f']), tail=st.sampled_from(['', '/info/refs', '/git-upload-pack']))
def test_a_gated_repository_is_matched_as_a_forge_resolves_its_path(flips, git, slashes, encode, tail):
    owner, repo = case_variant('acme', flips[:4]), case_variant('app', flips[4:])
    path = '/' + owner + (encode or slashes) + repo + ('.git' if git else '') + tail
    assert NARROWED.gated_refusal('github.com', path) is not None, path
    assert NARROWED.gated_refusal('github.com', '/' + owner + slashes + repo + 's' + tail) is None
    assert NARROWED.gated_refusal('github.com', '/other' + slashes + repo + tail) is None


@SETTINGS
@given(repo_form=st.sampled_from(['app', 'app;x=1', 'app.git;x', 'app%20', 'app.', 'app.git.', 'app%2e', '%ef%bd%81pp',
                                  'APP', 'app.GIT', 'x/..;/app', 'x/%2e%2e/app', 'x/..%2fapp']),
       owner_form=st.sampled_from(['acme', 'ACME', 'acme;v', 'acme%20', '%ef%bd%81cme', 'acme.']),
       tail=st.sampled_from(['', '/info/refs', '/git-upload-pack']))
def test_a_gated_repository_is_matched_whatever_a_forge_trims_or_normalises(repo_form, owner_form, tail):
    path = f'/{owner_form}/{repo_form}{tail}'
    assert NARROWED.gated_refusal('github.com', path) is not None, path


@pytest.mark.parametrize('path', ['/acme/app#x', '/acme/app.git#/other', '/acme/app/blob/main/README.md/../../../../..',
                                  '/acme/app/x/../../..'])
def test_a_gated_repository_is_matched_before_a_fragment_and_unresolved_as_well(path):
    """Servers end a path at a raw `#`; one that does not resolve `..` reads the path under the repository."""
    assert NARROWED.gated_refusal('github.com', path) is not None, path
    if '#' in path:     # and the proxy refuses a raw # in any request-target
        assert 'raw #' in message.head_refusal('HTTP/1.1', 'GET', path, [], 'https', 'github.com', 443)


PRIVATE_V4 = st.one_of(
    st.builds(lambda x: ipaddress.IPv4Address(0x7F000000 | x), st.integers(0, 0xFFFFFF)),          # 127/8
    st.builds(lambda x: ipaddress.IPv4Address(0x0A000000 | x), st.integers(0, 0xFFFFFF)),          # 10/8
    st.builds(lambda x: ipaddress.IPv4Address(0xA9FE0000 | x), st.integers(0, 0xFFFF)),            # 169.254/16
    st.builds(lambda x: ipaddress.IPv4Address(0xC0A80000 | x), st.integers(0, 0xFFFF)),            # 192.168/16
    st.builds(lambda x: ipaddress.IPv4Address(0x64400000 | x), st.integers(0, 0x3FFFFF)))          # 100.64/10
PUBLIC_V4 = st.sampled_from([ipaddress.IPv4Address(a) for a in ('8.8.8.8', '1.1.1.1', '93.184.216.34',
                                                                 '140.82.112.3', '151.101.1.69')])


def embeddings(v4: ipaddress.IPv4Address) -> dict[str, ipaddress.IPv6Address]:
    """The IPv6 forms that embed `v4`."""
    x = int(v4)
    return {
        'mapped': ipaddress.IPv6Address(0xFFFF << 32 | x),
        'translated': ipaddress.IPv6Address(0xFFFF << 48 | x),
        'compatible': ipaddress.IPv6Address(x),
        'nat64': ipaddress.IPv6Address(0x0064FF9B << 96 | x),
        '6to4': ipaddress.IPv6Address(0x2002 << 112 | x << 80 | 1),
        'teredo server': ipaddress.IPv6Address(0x20010000 << 96 | x << 64 | 0x8000_1234 << 32 | 0x7F7F7F7F),
        'teredo client': ipaddress.IPv6Address(0x20010000 << 96 | 0x08080808 << 64 | (~x & 0xFFFFFFFF)),
    }


@SETTINGS
@given(v4=PRIVATE_V4)
def test_every_ipv6_form_that_embeds_a_private_ipv4_address_is_refused(v4):
    forms = {form: v6 for form, v6 in embeddings(v4).items()
             if not (v4.packed[0] == 0 and form == 'compatible')}   # ::/104 holds :: and ::1, not embeddings
    assert [form for form, v6 in forms.items() if not NARROWED.address_refused(v6)] == [], v4
    for form, v6 in forms.items():
        assert v4 in rules.embedded_ipv4(v6), (form, v6)


@SETTINGS
@given(v4=PUBLIC_V4)
def test_an_ipv6_form_of_a_public_ipv4_address_is_judged_as_that_address(v4):
    for form in ('mapped', 'nat64', '6to4'):
        assert not NARROWED.address_refused(embeddings(v4)[form]), form
    allowed = rules.Rules.from_json({'hosts': [], 'allow_private': ['127.5.0.0/16']})
    assert not allowed.address_refused(embeddings(ipaddress.IPv4Address('127.5.6.7'))['nat64'])


@SETTINGS
@given(rest=st.integers(0, (1 << 80) - 1))
def test_the_local_use_nat64_prefix_is_refused_whole_whatever_it_embeds(rest):
    """Where a network puts the IPv4 address under 64:ff9b:1::/48 depends on its prefix length: no reading is
    right, so none is trusted; only allow_private listing it lets it through."""
    address = ipaddress.IPv6Address(0x0064FF9B0001 << 80 | rest)
    assert NARROWED.address_refused(address)
    assert not rules.Rules.from_json({'allow_private': ['64:ff9b:1::/48']}).address_refused(address)


def test_the_table_not_the_interpreter_decides(monkeypatch):
    """Whatever this Python calls global (it differs between patch levels), the project's table refuses."""
    monkeypatch.setattr(ipaddress.IPv6Address, 'is_global', property(lambda self: True))
    monkeypatch.setattr(ipaddress.IPv4Address, 'is_global', property(lambda self: True))
    for v6 in embeddings(ipaddress.IPv4Address('169.254.169.254')).values():
        assert NARROWED.address_refused(v6), v6
    for address in ('10.1.2.3', '127.0.0.1', '::1', 'fe80::1', 'fd00::1', '100::1', '100:0:0:1::1', '2001:db8::1',
                    '64:ff9b:1:808:0:808:a9fe:a9fe'):
        assert NARROWED.address_refused(ipaddress.ip_address(address)), address
    assert not NARROWED.address_refused(ipaddress.ip_address('2606:4700:4700::1111'))


def test_names_the_manifest_maps_are_resolved_by_the_rules_and_bad_ones_refused():
    parsed = rules.Rules.from_json({'hosts': [], 'addresses': {'Registry.Internal.': '10.20.0.5',
                                                                'six.example': 'fd00::5'}})
    assert parsed.address_of('registry.internal') == '10.20.0.5' and parsed.address_of('SIX.example') == 'fd00::5'
    assert parsed.address_of('other.example') is None
    assert rules.Rules.from_json(parsed.to_json()) == parsed
    for bad in ({'a.example': 'nope'}, {'a.example': 5}, ['a.example'], {'': '10.0.0.1'}):
        with pytest.raises(rules.RulesError, match='"addresses" must be an object'):
            rules.Rules.from_json({'hosts': [], 'addresses': bad})
