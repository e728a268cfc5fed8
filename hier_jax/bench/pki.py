"""A throwaway public-key infrastructure for benchmarks and tests over TLS: CAs and certificates for the
cloud's addresses, made with openssl, valid for a day."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_pki(
    directory: Path, certs: tuple[str, ...] = ("cloud",), cas: tuple[str, ...] = ("ca",), ips: tuple[str, ...] = ()
) -> None:
    """Throwaway CAs (`cas`; the first signs) and a certificate for 127.0.0.1 (and `ips`) per name in
    `certs` (NAME.pem, NAME.key), made with openssl."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    for ca in cas:
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN={ca}")
    names = ",".join(f"IP:{ip}" for ip in ("127.0.0.1", *ips))
    (directory / "san.ext").write_text(f"subjectAltName={names},DNS:localhost\n")
    for name in certs:
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{cas[0]}.pem", "-CAkey", f"{cas[0]}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")  # fmt: skip
