"""A read-only OCI registry on 127.0.0.1 that serves one local root filesystem as an image.

smolvm packs only machines made from a registry image, so a local base (a directory or
a tarball) reaches it as one, pulled from here. What that rests on, in smolvm's source
(smol-machines/smolvm a5df5001 = v1.9.3):
- `pack create --from-vm` refuses a machine made from a local archive or directory
  (src/pack_export.rs:135-147), and `pack create --image` hands its image to the
  in-guest registry pull whatever it is (src/cli/pack.rs:339);
- a registry image is pulled inside the guest on the machine's first start
  (src/cli/vm_common.rs:1502-1519), by crane: `crane manifest`, `crane config`, then
  `crane blob <repo>@<digest>` per layer (crates/smolvm-agent/src/storage.rs:2003, 2051,
  2102-2105); the layer is decompressed by its magic bytes, gzip, zstd or none
  (crates/smolvm-oci-layer/src/lib.rs:171-199), its media type is not looked at;
- `pack create --from-vm` of such a machine pulls the image again, in a helper VM that
  always has network (src/pack_export.rs:369-386), so the registry must stay up until
  the pack is written;
- `--net` alone is TSI (src/network/launch.rs:140-148; launcher.rs:919), where the VMM
  makes the guest's connections on the host, so the guest's 127.0.0.1:PORT is this
  host's loopback (libkrun; ../shared/research/egress-transport.md §1.3).
crane (v0.19.0 in the agent rootfs, scripts/build-agent-rootfs.sh:66) speaks plain HTTP
to 127.0.0.1 and localhost:PORT (go-containerregistry pkg/name/registry.go, Scheme) after
trying https first (pkg/v1/remote/transport/ping.go); it checks every blob against its
digest and size. smolvm's own host-side client treats loopback registries as plain HTTP
too (crates/smolvm-registry/src/lib.rs:191, src/registry.rs:66), which matters for
`pack pull/push`, not here.

The image is one layer: a directory is tarred (uncompressed: it only crosses loopback),
a tarball is served as it is, gzip-compressed or not. It is kept as an OCI image layout
in the user cache, bases/oci/<key>/, where the key changes with any file of the base
(from file metadata, ctime included), so an unchanged base is never tarred or hashed again.
The docker backend imports the same cached layer, so both backends see one version of a base.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from tasks.cache import cache_dir
from tasks.errors import BottleError

REPOSITORY = 'claude-bottle/base'
LAYOUT_VERSION = 'claude-bottle oci layout 1'   # part of every cache key: change it to rebuild them all

MANIFEST_TYPE = 'application/vnd.oci.image.manifest.v1+json'
INDEX_TYPE = 'application/vnd.oci.image.index.v1+json'
CONFIG_TYPE = 'application/vnd.oci.image.config.v1+json'
LAYER_TYPE = 'application/vnd.oci.image.layer.v1.tar'
GZIP_LAYER_TYPE = 'application/vnd.oci.image.layer.v1.tar+gzip'
OCI_ARCH = {'x86_64': 'amd64', 'amd64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}
IMAGE_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
GZIP_MAGIC = b'\x1f\x8b'
TLS_HANDSHAKE = b'\x16'
CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseImage:
    """An OCI image layout in the cache: one manifest, its config and its layer."""
    layout: Path
    manifest: bytes
    manifest_digest: str

    @property
    def tag(self) -> str:
        return _tag(self.manifest_digest)

    @property
    def layer(self) -> Path:
        """The one layer: the root filesystem as a tar (gzip-compressed if the base was)."""
        return self.blob(json.loads(self.manifest)['layers'][0]['digest'])

    def blob(self, digest: str) -> Path | None:
        match = re.fullmatch(r'sha256:([0-9a-f]{64})', digest)
        path = self.layout / 'blobs' / 'sha256' / match.group(1) if match else None
        return path if path and path.is_file() else None


def _tag(manifest_digest: str) -> str:
    return manifest_digest.removeprefix('sha256:')[:16]


def base_image(source: Path) -> BaseImage:
    """The image of a local root filesystem, built into the user cache on first use."""
    source = Path(source).resolve()
    if not (source.is_dir() or source.is_file()):
        raise BottleError(f'the image base {source} does not exist: image.base must name a root '
                          'filesystem directory or a .tar, .tar.gz or .tgz of one')
    layout = cache_dir() / 'bases' / 'oci' / _source_key(source)
    if not (layout / 'index.json').is_file():
        _build_layout(source, layout)
    index = json.loads((layout / 'index.json').read_text())
    digest = index['manifests'][0]['digest']
    manifest = (layout / 'blobs' / 'sha256' / digest.removeprefix('sha256:')).read_bytes()
    return BaseImage(layout, manifest, digest)


@contextlib.contextmanager
def serve_base(source: Path) -> Iterator[str]:
    """Serve the image of `source` on 127.0.0.1 while the block runs; yield its reference."""
    image = base_image(source)
    registry = _Registry(image)
    thread = threading.Thread(target=registry.serve_forever, args=(0.1,), daemon=True,
                              name=f'registry:{registry.server_port}')
    thread.start()
    try:
        yield f'127.0.0.1:{registry.server_port}/{REPOSITORY}:{image.tag}'
    finally:
        registry.stop()
        thread.join()


# --- building the layout ---------------------------------------------------------------------

def _source_key(source: Path) -> str:
    """Changes whenever the base does, without reading a file: ctime moves with any write,
    chmod, chown or rename and cannot be set back."""
    key = hashlib.sha256(f'{LAYOUT_VERSION}\0{os.uname().machine}\0'.encode())

    def add(path: str, name: str):
        st = os.lstat(path)
        target = os.readlink(path) if os.path.islink(path) else ''
        key.update(f'{name}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0'
                   f'{st.st_ctime_ns}\0{st.st_ino}\0{st.st_rdev}\0{target}\n'.encode())

    def fail(err: OSError):
        raise err

    try:
        if source.is_file():
            add(str(source), '')
            return key.hexdigest()
        for directory, dirs, files in os.walk(source, onerror=fail):
            dirs.sort()
            for name in [*dirs, *sorted(files)]:
                path = os.path.join(directory, name)
                add(path, os.path.relpath(path, source))
    except OSError as err:
        raise _unreadable(source, err) from None
    return key.hexdigest()


def _unreadable(source: Path, err: OSError) -> BottleError:
    where = err.filename or source
    fix = (f'pack it as root into a tarball (`sudo tar -C {source} --numeric-owner -cf base.tar .`) '
           'and name that in image.base' if source.is_dir() else 'make it readable by you')
    return BottleError(f'cannot read {where} of the image base {source} ({err.strerror or err}); '
                       f'the image needs all of it: {fix}')


def _build_layout(source: Path, layout: Path):
    arch = OCI_ARCH.get(os.uname().machine.lower())
    if arch is None:
        raise BottleError(f'no OCI architecture is known for this host ({os.uname().machine}), '
                          'so a local image base cannot be served to smolvm')
    layout.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=layout.parent, prefix=f'.{layout.name}.'))
    try:
        blobs = partial / 'blobs' / 'sha256'
        blobs.mkdir(parents=True)
        layer = blobs.parent / 'layer.partial'
        try:
            if source.is_dir():
                digest, diff_id, media_type = _tar_directory(source, layer)
            else:
                digest, diff_id, media_type = _take_tarball(source, layer)
        except OSError as err:
            raise _unreadable(source, err) from None
        layer_size = layer.stat().st_size
        layer.rename(blobs / digest.removeprefix('sha256:'))
        config = _canonical({'architecture': arch, 'os': 'linux', 'config': {'Env': [IMAGE_PATH]},
                             'rootfs': {'type': 'layers', 'diff_ids': [diff_id]}})
        manifest = _canonical({
            'schemaVersion': 2, 'mediaType': MANIFEST_TYPE,
            'config': {'mediaType': CONFIG_TYPE, 'digest': _put(blobs, config), 'size': len(config)},
            'layers': [{'mediaType': media_type, 'digest': digest, 'size': layer_size}]})
        manifest_digest = _put(blobs, manifest)
        (partial / 'oci-layout').write_bytes(_canonical({'imageLayoutVersion': '1.0.0'}))
        # index.json last: a layout that has one is complete
        (partial / 'index.json').write_bytes(_canonical({
            'schemaVersion': 2, 'mediaType': INDEX_TYPE,
            'manifests': [{'mediaType': MANIFEST_TYPE, 'digest': manifest_digest, 'size': len(manifest),
                           'annotations': {'org.opencontainers.image.ref.name': _tag(manifest_digest)}}]}))
        try:
            partial.rename(layout)
        except OSError:
            if not (layout / 'index.json').is_file():   # not just another build of the same base, first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(',', ':')).encode()


def _put(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f'sha256:{digest}'


class _Hashing:
    """A write-only file that hashes what goes through it."""

    def __init__(self, out):
        self.out, self.sha = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.out.write(data)


def _numeric_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = info.gname = ''     # as `tar --numeric-owner`: the guest's names are not the host's
    return info


def _tar_directory(source: Path, layer: Path) -> tuple[str, str, str]:
    with open(layer, 'wb') as out:
        hashing = _Hashing(out)
        with tarfile.open(fileobj=hashing, mode='w|', format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(source)):
                tar.add(source / name, arcname=name, filter=_numeric_owner)
    digest = f'sha256:{hashing.sha.hexdigest()}'
    return digest, digest, LAYER_TYPE


def _take_tarball(source: Path, layer: Path) -> tuple[str, str, str]:
    with open(source, 'rb') as f:
        head = f.read(512)
    compressed = head.startswith(GZIP_MAGIC)
    if not compressed and head[257:262] != b'ustar':
        raise BottleError(f'the image base {source} is neither a tar archive nor a gzip-compressed one; '
                          'image.base takes a root filesystem as a directory, .tar, .tar.gz or .tgz')
    shutil.copyfile(source, layer)    # not a hard link: that would move the base's ctime, its key
    digest = f'sha256:{_sha256(open(layer, "rb"))}'
    if not compressed:
        return digest, digest, LAYER_TYPE
    try:
        diff_id = f'sha256:{_sha256(gzip.open(layer))}'
    except (OSError, EOFError, zlib.error) as err:
        raise BottleError(f'the image base {source} is not a valid gzip file ({err}); '
                          'recompress it with `gzip`') from None
    return digest, diff_id, GZIP_LAYER_TYPE


def _sha256(stream) -> str:
    sha = hashlib.sha256()
    with stream:
        while chunk := stream.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


# --- serving it ----------------------------------------------------------------------------

API_PATH = re.compile(r'/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<reference>[^/]+)')


class _Registry(ThreadingHTTPServer):
    def __init__(self, image: BaseImage):
        super().__init__(('127.0.0.1', 0), _Handler)
        self.image = image
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        pass        # a client that hangs up mid-blob is the client's story; crane reports it

    def stop(self):
        """Stop answering: the port refuses from here on, and open connections are cut."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'     # keep-alive: crane reuses its connection
    timeout = 120
    server: _Registry

    def handle(self):
        # crane tries https first; hanging up on the TLS hello makes it fall back to http at once
        if self.connection.recv(1, socket.MSG_PEEK) == TLS_HANDSHAKE:
            return
        super().handle()

    def log_message(self, format, *args):
        pass        # doit's output is for the build, not for each request

    def do_GET(self):
        self._answer(send_body=True)

    def do_HEAD(self):
        self._answer(send_body=False)

    def _read_only(self):
        self.close_connection = True      # the request body is left unread
        self._error(405, 'UNSUPPORTED', 'this registry is read-only')

    do_POST = do_PUT = do_PATCH = do_DELETE = _read_only

    def _answer(self, send_body: bool):
        image = self.server.image
        path = urlsplit(self.path).path
        if path in ('/v2', '/v2/'):
            return self._send(200, 'application/json', b'{}', send_body)
        api = API_PATH.fullmatch(path)
        if api is None:
            return self._error(404, 'NOT_FOUND', f'{path} is not an endpoint of this registry')
        name, kind, reference = api.group('name', 'kind', 'reference')
        if name != REPOSITORY:
            return self._error(404, 'NAME_UNKNOWN', f'repository {name} is not served here')
        if kind == 'manifests':
            if reference not in (image.tag, image.manifest_digest):
                return self._error(404, 'MANIFEST_UNKNOWN', f'manifest {reference} is not served here')
            return self._send(200, MANIFEST_TYPE, image.manifest, send_body, image.manifest_digest)
        blob = image.blob(reference)
        if blob is None:
            return self._error(404, 'BLOB_UNKNOWN', f'blob {reference} is not served here')
        self._headers(200, 'application/octet-stream', blob.stat().st_size, reference)
        if send_body:
            with open(blob, 'rb') as f:
                self.connection.sendfile(f)

    def _error(self, status: int, code: str, message: str):
        body = json.dumps({'errors': [{'code': code, 'message': message}]}).encode()
        self._send(status, 'application/json', body, self.command != 'HEAD')

    def _send(self, status: int, content_type: str, body: bytes, send_body: bool, digest: str | None = None):
        self._headers(status, content_type, len(body), digest)
        if send_body:
            self.wfile.write(body)

    def _headers(self, status: int, content_type: str, length: int, digest: str | None):
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(length))
        self.send_header('Docker-Distribution-API-Version', 'registry/2.0')
        if digest:
            self.send_header('Docker-Content-Digest', digest)
        self.end_headers()
