"""TLS: HTTPS on the main port (--tls-cert-path, --tls-key-path), reloaded
on SIGHUP and when the files change, and TLS/mTLS to https:// workers
(--ca-cert-paths, --client-cert-path, --client-key-path). Certificates
are made here, by a throwaway CA."""

import datetime
import http.client
import json
import os
import signal
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import GatewayProcess, wait_for


class CA:
    def __init__(self, name: str = "smg test CA"):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, directory, name: str, client: bool = False) -> tuple[str, str]:
        """A leaf certificate for 127.0.0.1 (server) or a client; (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        if client:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        else:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                             x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
        with open(cert_path + ".tmp", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path + ".tmp", "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        os.replace(key_path + ".tmp", key_path)
        os.replace(cert_path + ".tmp", cert_path)
        return cert_path, key_path

    def save(self, directory) -> str:
        path = os.path.join(directory, "ca.crt")
        with open(path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


def https(port: int, ca_path: str, method: str = "GET", path: str = "/health", body=None):
    """(status, body, the server certificate's common name)."""
    ctx = ssl.create_default_context(cafile=ca_path)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        r = conn.getresponse()
        peer = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        return r.status, r.read(), peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    finally:
        conn.close()


@pytest.fixture
def https_gateway():
    """Factory: a gateway serving HTTPS, waited for over HTTPS."""
    running = []

    def make(args, ca_path):
        g = GatewayProcess(args)
        running.append(g)
        wait_for(lambda: g.proc.poll() is None and https(g.port, ca_path, path="/readiness")[0] == 200,
                 message="the gateway ready over HTTPS")
        return g

    yield make
    for g in running:
        g.__exit__(None, None, None)


def test_https_on_the_main_port_and_a_reload_without_dropping_connections(fake_workers, https_gateway, tmp_path):
    ca = CA()
    ca_path = ca.save(tmp_path)
    cert, key = ca.issue(tmp_path, "gateway-1")
    (w,) = fake_workers(1)
    g = https_gateway(["--worker-urls", w.url, "--tls-cert-path", cert, "--tls-key-path", key], ca_path)
    status, body, name = https(g.port, ca_path, "POST", "/generate", {"text": "hi"})
    assert status == 200 and json.loads(body)["text"] and name == "gateway-1"
    # a connection opened before the reload keeps working after it
    ctx = ssl.create_default_context(cafile=ca_path)
    kept = http.client.HTTPSConnection("127.0.0.1", g.port, context=ctx, timeout=10)
    kept.request("GET", "/health")
    assert kept.getresponse().read() is not None
    # SIGHUP: new handshakes get the new certificate
    new_cert, new_key = ca.issue(tmp_path, "gateway-2")
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    g.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: https(g.port, ca_path)[2] == "gateway-2", message="the new certificate served")
    kept.request("GET", "/health")
    assert kept.getresponse().status == 200
    kept.close()
    # a changed file is picked up without a signal
    third_cert, third_key = ca.issue(tmp_path, "gateway-3")
    os.replace(third_key, key)
    os.replace(third_cert, cert)
    wait_for(lambda: https(g.port, ca_path)[2] == "gateway-3", timeout=20, message="the changed file served")
    # a broken file keeps the certificate in use
    with open(cert, "w") as f:
        f.write("not a certificate")
    wait_for(lambda: "TLS certificate not reloaded" in g.logs(), timeout=20, message="the bad file reported")
    assert https(g.port, ca_path)[2] == "gateway-3"
    # plain HTTP on the TLS port is not served
    plain = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        plain.request("GET", "/health")
        plain.getresponse().read()


def test_https_workers_with_mutual_tls(gateway, fake_workers, tmp_path):
    from smg.testing import FakeWorker

    ca = CA()
    ca_path = ca.save(tmp_path)
    server_cert, server_key = ca.issue(tmp_path, "worker")
    client_cert, client_key = ca.issue(tmp_path, "smg-client", client=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_cert, server_key)
    ctx.load_verify_locations(cafile=ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mTLS: the worker wants smg's certificate
    w = FakeWorker("127.0.0.1", 0, ssl_context=ctx).start()
    try:
        assert w.url.startswith("https://")
        g = gateway(["--worker-urls", w.url, "--ca-cert-paths", ca_path, "--client-cert-path", client_cert,
                     "--client-key-path", client_key], wait_workers=1)
        r = g.post("/generate", {"text": "over TLS"})
        assert r.status == 200 and r.json()["meta_info"]["worker"] == w.name
        # without the client certificate the worker refuses the handshake: never registered
        g2 = gateway(["--worker-urls", w.url, "--ca-cert-paths", ca_path])
        wait_for(lambda: "is not reachable yet" in g2.logs(), message="the refused handshake reported")
        assert g2.post("/generate", {"text": "x"}).status == 404
        # a worker whose certificate the CAs do not vouch for is not trusted
        other = CA("another CA").save(tmp_path / "..")
        g3 = gateway(["--worker-urls", w.url, "--ca-cert-paths", other, "--client-cert-path", client_cert,
                      "--client-key-path", client_key])
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in g3.logs() or "certificate verify failed" in g3.logs(),
                 message="the untrusted certificate reported")
    finally:
        w.stop()


def test_tls_flags_are_checked(capsys, tmp_path):
    from smg.cli import config_from_args

    for argv in (["--tls-cert-path", "/nonexistent.crt", "--tls-key-path", "/nonexistent.key"],
                 ["--tls-cert-path", str(tmp_path)], ["--client-cert-path", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            config_from_args(argv)
        assert e.value.code == 2
