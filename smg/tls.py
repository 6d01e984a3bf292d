"""TLS for clients (--tls-cert-path, --tls-key-path: HTTPS on the main
port) and to workers (https:// worker URLs, verified against the system's
CAs or --ca-cert-paths, with a client certificate for mTLS from
--client-cert-path and --client-key-path).

The server's certificate is reloaded without dropping connections: on
SIGHUP, and when the certificate or key file changes (checked every few
seconds). Connections already open keep the certificate they started
with; new handshakes get the new one. A pair that does not load (a
half-written file, a key that does not match) is logged and the old
certificate stays."""

from __future__ import annotations

import logging
import os
import ssl
from typing import Optional

log = logging.getLogger("smg.tls")

CHECK_SECS = 5.0


def _stamp(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ServerCertificate:
    """The main port's TLS context and the files it was loaded from."""

    def __init__(self, cert_path: str, key_path: str):
        self.cert_path = cert_path
        self.key_path = key_path
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.context.load_cert_chain(cert_path, key_path)  # a bad pair at start-up: the caller exits
        self.stamps = (_stamp(cert_path), _stamp(key_path))
        self.last_check = 0.0

    def reload(self, reason: str) -> bool:
        """Load the files again into the same context (new handshakes use
        them); keep the old certificate if they do not load."""
        stamps = (_stamp(self.cert_path), _stamp(self.key_path))
        trial = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            trial.load_cert_chain(self.cert_path, self.key_path)
            self.context.load_cert_chain(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as e:
            log.error("TLS certificate not reloaded (%s): %s; the previous one stays in use", reason, e)
            self.stamps = stamps  # reported once per change of the files
            return False
        self.stamps = stamps
        log.info("TLS certificate reloaded (%s) from %s", reason, self.cert_path)
        return True

    def check(self, now: float) -> None:
        """The periodic tick: reload when either file changed."""
        if now - self.last_check < CHECK_SECS:
            return
        self.last_check = now
        if (_stamp(self.cert_path), _stamp(self.key_path)) != self.stamps:
            self.reload("the files changed")


def client_context(ca_paths: list[str], cert_path: Optional[str], key_path: Optional[str]) -> ssl.SSLContext:
    """The context for https:// workers: the system's CAs, or those of
    --ca-cert-paths (files or directories), and a client certificate when
    the workers ask for one (mTLS)."""
    ctx = ssl.create_default_context()
    if ca_paths:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for path in ca_paths:
            if os.path.isdir(path):
                ctx.load_verify_locations(capath=path)
            else:
                ctx.load_verify_locations(cafile=path)
    ctx.set_alpn_protocols(["http/1.1"])
    if cert_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
