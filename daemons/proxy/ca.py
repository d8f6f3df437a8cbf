"""The egress CA, made once on the host, in mitmproxy's layout so the proxy loads it as is:

    <confdir>/mitmproxy-ca.pem        the key and the certificate: THE key file, mode 0600, the only
                                      copy of the key anywhere
    <confdir>/mitmproxy-ca-cert.pem   the certificate alone, for guests' trust stores

ECDSA P-256, basicConstraints CA:TRUE (critical, no intermediates), keyUsage keyCertSign and cRLSign
(critical). It must exist before mitmproxy starts: mitmproxy would otherwise make its own RSA CA
and a second copy of the key (mitmproxy-ca.p12).

Runs with the proxy environment's Python (it needs `cryptography`), the project on its PYTHONPATH:
    python ca.py CONFDIR           make the CA unless it exists (and restore a missing cert file)
    python ca.py CONFDIR --renew   replace it with a new one
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daemons.atomic import write_atomic     # standard library only; control.py puts the project on PYTHONPATH

KEY_FILE = 'mitmproxy-ca.pem'
CERT_FILE = 'mitmproxy-ca-cert.pem'
VALID_DAYS = 3650


def ensure(confdir: Path, renew: bool = False) -> None:
    key_file, cert_file = confdir / KEY_FILE, confdir / CERT_FILE
    if key_file.exists() and not renew:
        cert = x509.load_pem_x509_certificate(key_file.read_bytes())
        key_pem = None
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(key)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    confdir.mkdir(parents=True, exist_ok=True)
    os.chmod(confdir, 0o700)
    if key_pem:
        write_atomic(key_file, key_pem + cert_pem, 0o600)   # made 0600: never readable by others
    if not cert_file.exists() or cert_file.read_bytes() != cert_pem:
        write_atomic(cert_file, cert_pem, 0o644)


def _certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
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
