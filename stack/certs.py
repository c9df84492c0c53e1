"""A throw-away certificate authority and a server certificate for loopback TLS.

Made with the openssl CLI (always present on Debian) rather than a Python
package the project does not otherwise need. The server certificate names
``localhost`` and ``127.0.0.1`` so clients can verify the hostname either way.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DAYS = "3650"


def ensure_ca_and_server_cert(d: Path, cn: str = "localhost") -> dict[str, Path]:
    """Create ``ca.crt``/``ca.key``/``server.crt``/``server.key`` in ``d`` if missing."""
    d.mkdir(parents=True, exist_ok=True)
    paths = {k: d / f"{k.replace('_', '.')}" for k in ("ca_crt", "ca_key", "server_crt",
                                                        "server_key")}
    if all(p.exists() for p in paths.values()):
        return paths
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found: apt-get install -y openssl")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
             "-subj", "/CN=gaitflow stack test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", paths["ca_key"], "-out", paths["ca_crt"])
    csr = d / "server.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
             "-keyout", paths["server_key"], "-out", csr)
    ext = d / "server.ext"
    ext.write_text("basicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", csr, "-CA", paths["ca_crt"], "-CAkey", paths["ca_key"],
             "-CAcreateserial", "-days", DAYS, "-sha256", "-extfile", ext,
             "-out", paths["server_crt"])
    csr.unlink()
    ext.unlink()
    for k in ("ca_key", "server_key"):
        paths[k].chmod(0o600)
    return paths


def _openssl(*args: object) -> None:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {r.stderr.strip()}")


__all__ = ["ensure_ca_and_server_cert"]
