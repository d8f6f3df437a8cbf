"""The egress CA, made once on the host, in mitmproxy's layout so the proxy loads it as is:

    <confdir>/mitmproxy-ca.pem        the key and the certificate: THE key file, mode 0600, the only
                                      copy of the key anywhere
    <confdir>/mitmproxy-ca-cert.pem   the certificate alone, for guests' trust stores

ECDSA P-256, basicConstraints CA:TRUE (critical, no intermediates), keyUsage keyCertSign and cRLSign
(critical). It must exist before mitmproxy starts: mitmproxy would otherwise make its own RSA CA
and a second copy of the key (mitmproxy-ca.p12).

The key file is 0600 and the directory 0700 after every run: modes found looser (a chmod, an unpacked
backup) are repaired, and one line on stderr says what was. control.py runs it before each start of the
proxy whenever `loose` finds a mode to repair, and passes that line on to the user of doit.

Runs with the proxy environment's Python (it needs `cryptography`), the project on its PYTHONPATH:
    python ca.py CONFDIR           make the CA unless it exists (and restore a missing cert file)
    python ca.py CONFDIR --renew   replace it with a new one
`loose` needs the standard library only (cryptography is imported when a CA is read or made), so the
project's Python imports this module too.
"""
from __future__ import annotations

import datetime
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemons.atomic import write_atomic     # standard library only; control.py puts the project on PYTHONPATH

KEY_FILE = 'mitmproxy-ca.pem'
CERT_FILE = 'mitmproxy-ca-cert.pem'
KEY_MODE = 0o600
DIR_MODE = 0o700
VALID_DAYS = 3650

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec


def loose(confdir: Path) -> list[tuple[Path, int, int]]:
    """(path, its mode, the mode it must have) for the directory and the key file where they differ; a
    missing one is not listed. Standard library only."""
    found = []
    for path, mode in ((confdir, DIR_MODE), (confdir / KEY_FILE, KEY_MODE)):
        try:
            actual = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            continue
        if actual != mode:
            found.append((path, actual, mode))
    return found


def ensure(confdir: Path, renew: bool = False) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key_file, cert_file = confdir / KEY_FILE, confdir / CERT_FILE
    _tighten(confdir)
    if key_file.exists() and not renew:
        cert = x509.load_pem_x509_certificate(key_file.read_bytes())
        key_pem = None
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(key)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    confdir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(confdir, DIR_MODE)         # a new one: mkdir's mode is cut by the umask
    if key_pem:
        write_atomic(key_file, key_pem + cert_pem, KEY_MODE)   # made 0600: never readable by others
    if not cert_file.exists() or cert_file.read_bytes() != cert_pem:
        write_atomic(cert_file, cert_pem, 0o644)


def _tighten(confdir: Path) -> None:
    """Repair the directory's and the key file's modes where they are looser or other than they must be, and
    say so in one line. The owner is not checked: a key file of another user's fails the chmod, in words."""
    repaired = []
    for path, actual, mode in loose(confdir):
        try:
            os.chmod(path, mode)
        except OSError as err:
            sys.exit(f'the egress CA {"directory" if path == confdir else "key"} {path} is mode {actual:04o} and '
                     f'cannot be made {mode:04o} ({err.strerror}); remove the directory (doit clean egress_ca) to '
                     'make a new CA')
        repaired.append(f'{path} was mode {actual:04o}, now {mode:04o}')
    if repaired:
        print(f'claude-bottle: the egress CA key must be readable by you alone: {"; ".join(repaired)}',
              file=sys.stderr, flush=True)


def _certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'claude-bottle'),
                      x509.NameAttribute(NameOID.COMMON_NAME, 'claude-bottle egress CA')])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))    # guests with a clock a little behind
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))


if __name__ == '__main__':
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ['--renew']):
        sys.exit(f'usage: {sys.argv[0]} CONFDIR [--renew]')
    ensure(Path(sys.argv[1]), renew=sys.argv[2:] == ['--renew'])
