"""A local image base on smolvm: served from a registry on 127.0.0.1 for the build.

The stand-in pulls such an image for real, over HTTP, as smolvm's in-guest crane
does. Its images borrow the host's /usr through bind mounts, which an OCI image
cannot carry: SMOLVM_STANDIN_REGISTRY_HOST_RO_BINDS hands the stand-in those binds
for images pulled from a loopback registry, so the rootfs served is the very
directory the test made, and the pull, the digests and the re-pull at the pack
are all real.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import platform
import re
import socket
import ssl
import tarfile
from pathlib import Path

import pytest

from tasks.backends.registry import base_image, serve_base
from tasks.errors import BottleError
from tests.scenario import assert_fully_provisioned, setup_agent
from tests.standin import harness

MARKER = 'served by the loopback registry\n'
REF = re.compile(r'127\.0\.0\.1:(\d+)/claude-bottle/base:[0-9a-f]{16}')


def tools_rootfs(dest: Path) -> tuple[Path, list[str]]:
    """A stand-in rootfs that the image setup can run in, and the host dirs it needs bound."""
    entry = harness.make_tools_rootfs(dest)
    (dest / 'etc/ssl/certs').mkdir(parents=True, exist_ok=True)   # what ca-certificates lays down
    (dest / 'etc/ca-certificates.conf').touch()
    (dest / 'etc/marker').write_text(MARKER)
    return dest, entry['host_ro_binds']


def tarball(rootfs: Path, dest: Path) -> Path:
    with tarfile.open(dest, 'w:gz' if dest.name.endswith(('.gz', '.tgz')) else 'w') as tar:
        for name in sorted(os.listdir(rootfs)):
            tar.add(rootfs / name, arcname=name)
    return dest


def port_is_closed(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# --- through doit, against the stand-in -----------------------------------------------------

def launch_from_local_base(standin, base: Path, binds: list[str]):
    setup_agent(standin, image={'base': str(base)})
    env = standin.env(SMOLVM_STANDIN_REGISTRY_HOST_RO_BINDS=os.pathsep.join(binds))
    run = standin.doit('launch:a', env=env)

    create = next(c for c in run.calls if c[:2] == ['machine', 'create'] and '--image' in c)
    build_machine = create[create.index('--name') + 1]
    ref = create[create.index('--image') + 1]
    assert build_machine.startswith('bottle-build-') and REF.fullmatch(ref) and '--net' in create
    pack = next(c for c in run.calls if c[:2] == ['pack', 'create'])
    assert pack[pack.index('--from-vm') + 1] == build_machine
    assert run.calls.index(create) < run.calls.index(pack)
    assert port_is_closed(int(REF.fullmatch(ref).group(1)))

    assert_fully_provisioned(standin)
    assert standin.guest('a', 'cat /etc/marker') == MARKER
    assert standin.doit('launch:a', env=env).kinds == {'probe': 1}


def test_a_local_directory_base_is_served_pulled_and_packed(standin, tmp_path):
    rootfs, binds = tools_rootfs(tmp_path / 'rootfs')
    launch_from_local_base(standin, rootfs, binds)


def test_a_local_tarball_base_is_served_pulled_and_packed(standin, tmp_path):
    rootfs, binds = tools_rootfs(tmp_path / 'rootfs')
    launch_from_local_base(standin, tarball(rootfs, tmp_path / 'base.tgz'), binds)


def test_the_pack_pulls_again_and_fails_like_smolvm_once_the_registry_is_gone(oci_cache, tmp_path):
    rootfs, binds = tools_rootfs(tmp_path / 'rootfs')
    data = tmp_path / 'smolvm'
    env = {**os.environ, **harness.standin_env(data, tmp_path / 'no-index.json'),
           'SMOLVM_STANDIN_REGISTRY_HOST_RO_BINDS': os.pathsep.join(binds)}
    try:
        with serve_base(rootfs) as ref:
            harness.run(env, 'machine', 'create', '--name', 'm', '--image', ref, '--net', '--', 'sleep',
                        'infinity', check=True)
            started = harness.run(env, 'machine', 'start', '--name', 'm', check=True)
            assert f'Pulling image {ref}... done.' in started.stderr
            harness.run(env, 'machine', 'stop', '--name', 'm', check=True)
        packed = harness.run(env, 'pack', 'create', '--from-vm', 'm', '-o', str(tmp_path / 'out'))
    finally:
        harness.stop_all(data)
    assert packed.returncode == 1
    assert f'Pulling {ref} in export VM...' in packed.stderr
    assert (f'Error: agent operation failed: pull image: crane manifest failed: Error: fetching manifest '
            f'{ref}: Get "https://{ref.split("/")[0]}/v2/": ') in packed.stderr
    assert 'connect: connection refused' in packed.stderr


# --- the registry itself, over HTTP on loopback ---------------------------------------------

@pytest.fixture
def oci_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    return tmp_path / 'cache' / 'claude-bottle' / 'bases' / 'oci'


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / 'rootfs'
    (root / 'etc').mkdir(parents=True)
    (root / 'etc/hostname').write_text('bottle\n')
    (root / 'usr/bin').mkdir(parents=True)
    (root / 'usr/bin/tool').write_text('#!/bin/sh\necho tool\n')
    (root / 'usr/bin/tool').chmod(0o755)
    (root / 'bin').symlink_to('usr/bin')
    (root / 'tmp').mkdir()
    (root / 'tmp').chmod(0o1777)
    return root


def get(ref: str, path: str, method: str = 'GET') -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(ref.split('/')[0], timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def manifest_of(ref: str) -> dict:
    status, _, body = get(ref, f'/v2/claude-bottle/base/manifests/{ref.rsplit(":", 1)[1]}')
    assert status == 200
    return json.loads(body)


def test_the_manifest_is_served_by_tag_and_digest_with_its_digest_header(oci_cache, rootfs):
    with serve_base(rootfs) as ref:
        tag = ref.rsplit(':', 1)[1]
        status, headers, body = get(ref, f'/v2/claude-bottle/base/manifests/{tag}')
        digest = f'sha256:{hashlib.sha256(body).hexdigest()}'
        assert status == 200 and digest.removeprefix('sha256:').startswith(tag)
        assert headers['Docker-Content-Digest'] == digest
        assert headers['Content-Type'] == 'application/vnd.oci.image.manifest.v1+json'
        assert int(headers['Content-Length']) == len(body)
        assert get(ref, f'/v2/claude-bottle/base/manifests/{digest}')[2] == body
        status, head, empty = get(ref, f'/v2/claude-bottle/base/manifests/{tag}', 'HEAD')
        assert status == 200 and empty == b'' and head['Docker-Content-Digest'] == digest
        assert int(head['Content-Length']) == len(body)
        assert get(ref, '/v2/')[0] == 200


def test_blobs_match_their_digests_and_the_config_names_the_layer(oci_cache, rootfs):
    with serve_base(rootfs) as ref:
        manifest = manifest_of(ref)
        blobs = {}
        for descriptor in [manifest['config'], *manifest['layers']]:
            status, headers, body = get(ref, f'/v2/claude-bottle/base/blobs/{descriptor["digest"]}')
            assert status == 200 and len(body) == descriptor['size'] == int(headers['Content-Length'])
            assert f'sha256:{hashlib.sha256(body).hexdigest()}' == descriptor['digest']
            assert headers['Docker-Content-Digest'] == descriptor['digest']
            status, headers, empty = get(ref, f'/v2/claude-bottle/base/blobs/{descriptor["digest"]}', 'HEAD')
            assert status == 200 and empty == b'' and int(headers['Content-Length']) == descriptor['size']
            blobs[descriptor['digest']] = body
    config = json.loads(blobs[manifest['config']['digest']])
    layer = blobs[manifest['layers'][0]['digest']]
    assert config['os'] == 'linux'
    assert config['architecture'] == {'x86_64': 'amd64', 'aarch64': 'arm64'}[platform.machine()]
    assert config['rootfs'] == {'type': 'layers', 'diff_ids': [f'sha256:{hashlib.sha256(layer).hexdigest()}']}
    assert manifest['layers'][0]['mediaType'] == 'application/vnd.oci.image.layer.v1.tar'


def test_unknown_names_references_and_digests_are_404_and_writes_are_refused(oci_cache, rootfs):
    with serve_base(rootfs) as ref:
        tag = ref.rsplit(':', 1)[1]
        for path, code in [(f'/v2/other/manifests/{tag}', 'NAME_UNKNOWN'),
                           ('/v2/claude-bottle/base/manifests/latest', 'MANIFEST_UNKNOWN'),
                           (f'/v2/claude-bottle/base/blobs/sha256:{"0" * 64}', 'BLOB_UNKNOWN'),
                           ('/v2/claude-bottle/base/blobs/sha256:..%2F..%2Findex.json', 'BLOB_UNKNOWN')]:
            status, _, body = get(ref, path)
            assert status == 404 and json.loads(body)['errors'][0]['code'] == code, path
        assert get(ref, f'/v2/claude-bottle/base/manifests/{tag}', 'PUT')[0] == 405


def test_a_tls_hello_is_hung_up_on_so_crane_falls_back_to_http(oci_cache, rootfs):
    with serve_base(rootfs) as ref:
        host, port = ref.split('/')[0].split(':')
        with pytest.raises(OSError):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        assert get(ref, '/v2/')[0] == 200


def test_the_port_is_closed_once_the_block_ends(oci_cache, rootfs):
    with serve_base(rootfs) as ref:
        port = int(REF.fullmatch(ref).group(1))
        assert not port_is_closed(port)
    assert port_is_closed(port)


def layer_files(ref: str, dest: Path) -> dict[str, tuple]:
    """Extract the served layer into dest; what each path is, as a comparable tuple."""
    manifest = manifest_of(ref)
    layer = get(ref, f'/v2/claude-bottle/base/blobs/{manifest["layers"][0]["digest"]}')[2]
    raw = gzip.decompress(layer) if layer[:2] == b'\x1f\x8b' else layer
    config = json.loads(get(ref, f'/v2/claude-bottle/base/blobs/{manifest["config"]["digest"]}')[2])
    assert config['rootfs']['diff_ids'] == [f'sha256:{hashlib.sha256(raw).hexdigest()}']
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        # keeps the sticky bit of tmp (the explicit filter where Python has filters: 3.11.4 and later)
        tar.extractall(dest, **({'filter': 'fully_trusted'} if hasattr(tarfile, 'fully_trusted_filter') else {}))
    files = {}
    for path in sorted(dest.rglob('*')):
        rel = str(path.relative_to(dest))
        if path.is_symlink():
            files[rel] = ('link', os.readlink(path))
        elif path.is_dir():
            files[rel] = ('dir', path.stat().st_mode & 0o7777)
        else:
            files[rel] = ('file', path.stat().st_mode & 0o7777, path.read_bytes())
    return files


def test_plain_and_gzip_layers_extract_back_to_the_same_files(oci_cache, rootfs, tmp_path):
    sources = {'dir': rootfs, 'tar': tarball(rootfs, tmp_path / 'base.tar'),
               'tgz': tarball(rootfs, tmp_path / 'base.tgz')}
    trees, media_types = {}, {}
    for kind, source in sources.items():
        with serve_base(source) as ref:
            trees[kind] = layer_files(ref, tmp_path / f'out-{kind}')
            media_types[kind] = manifest_of(ref)['layers'][0]['mediaType']
    assert trees['dir'] == trees['tar'] == trees['tgz']
    assert trees['dir']['usr/bin/tool'] == ('file', 0o755, b'#!/bin/sh\necho tool\n')
    assert trees['dir']['bin'] == ('link', 'usr/bin') and trees['dir']['tmp'] == ('dir', 0o1777)
    assert media_types == {'dir': 'application/vnd.oci.image.layer.v1.tar',
                           'tar': 'application/vnd.oci.image.layer.v1.tar',
                           'tgz': 'application/vnd.oci.image.layer.v1.tar+gzip'}


def test_an_unchanged_base_is_built_once_and_a_changed_one_again(oci_cache, rootfs, tmp_path):
    base = tarball(rootfs, tmp_path / 'base.tgz')
    built = {source: base_image(source) for source in (rootfs, base)}
    assert sorted(p.name for p in oci_cache.iterdir()) == sorted(i.layout.name for i in built.values())
    assert all(base_image(source) == image for source, image in built.items())
    (rootfs / 'etc/hostname').write_text('changed\n')
    tarball(rootfs, base)
    for source, image in built.items():
        again = base_image(source)
        assert again.layout != image.layout and again.manifest_digest != image.manifest_digest
    assert len(list(oci_cache.iterdir())) == 4        # and no partial layout left behind


def test_a_missing_base_or_one_that_is_no_tarball_is_a_clear_error(oci_cache, tmp_path):
    with pytest.raises(BottleError, match='does not exist'):
        base_image(tmp_path / 'nowhere')
    junk = tmp_path / 'junk.tar'
    junk.write_bytes(b'not a tar archive' * 64)
    with pytest.raises(BottleError, match='neither a tar archive nor a gzip-compressed one'):
        base_image(junk)


def test_a_base_whose_uid_1000_is_taken_gives_that_account_to_the_agent(standin, tmp_path):
    """As on ubuntu:24.04 (`ubuntu`) or the node images (`node`): uid and gid 1000 already belong
    to another account, whose home holds a file."""
    rootfs, binds = tools_rootfs(tmp_path / 'rootfs')
    for name, line in (('passwd', 'ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/sh'), ('group', 'ubuntu:x:1000:'),
                       ('shadow', 'ubuntu:*:19000:0:99999:7:::'), ('gshadow', 'ubuntu:*::')):
        with open(rootfs / 'etc' / name, 'a') as table:
            table.write(line + '\n')
    (rootfs / 'home/ubuntu').mkdir()
    (rootfs / 'home/ubuntu/.profile').write_text('# the base account\'s\n')
    os.chown(rootfs / 'home/ubuntu', 1000, 1000)
    launch_from_local_base(standin, rootfs, binds)
    accounts = standin.guest('a', 'getent passwd 1000; getent group 1000; getent passwd ubuntu; '
                                  'stat -c "%U %G" /home/agent; cat /home/agent/.profile')
    assert accounts.splitlines() == ['agent:x:1000:1000:Ubuntu:/home/agent:/bin/bash', 'agent:x:1000:',
                                     'agent agent', '# the base account\'s']
    env = standin.env(SMOLVM_STANDIN_REGISTRY_HOST_RO_BINDS=os.pathsep.join(binds))
    claude = standin.backend.attach(standin, 'a', env)
    assert claude.ok and (claude.claude['user'], claude.claude['uid']) == ('agent', '1000'), claude.output


def test_a_base_with_the_agents_name_on_another_uid_stops_the_build_with_what_to_set(standin, tmp_path):
    rootfs, binds = tools_rootfs(tmp_path / 'rootfs')
    with open(rootfs / 'etc/passwd', 'a') as passwd, open(rootfs / 'etc/group', 'a') as group:
        passwd.write('agent:x:1500:1500::/home/agent:/bin/sh\n')
        group.write('agent:x:1500:\n')
    setup_agent(standin, image={'base': str(rootfs)})
    run = standin.doit('launch:a', env=standin.env(SMOLVM_STANDIN_REGISTRY_HOST_RO_BINDS=os.pathsep.join(binds)),
                       check=False)
    assert run.returncode != 0
    assert ('the base has a user agent with uid:gid 1500:1500, not 1000:1000; set user.uid to 1500, or '
            'user.name to another name') in run.output
