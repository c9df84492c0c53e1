"""Eclipse Mosquitto from Debian, run as our own process with our own config.

Three listeners on loopback (``per_listener_settings``):

* ``port`` (1883): anonymous, what the pipeline uses by default;
* ``secure_port`` (8883): username/password only;
* ``tls_port`` (8884): TLS with a CA made by the stack, plus username/password.

The user is ``gaitflow``; its password is generated at install into
``.stack/mosquitto/credentials.txt`` (``username=...``/``password=...`` lines,
read it with :func:`credentials`). The CA for TLS clients is ``ca_file()``.
Persistence is on so persistent sessions and their queued QoS 1/2 messages
survive a broker restart.
"""
from __future__ import annotations

import getpass
import os
import secrets
import subprocess
import threading
import uuid
from pathlib import Path

from ..certs import ensure_ca_and_server_cert
from ..config import StackConfig
from ..service import Service

BINARY = "/usr/sbin/mosquitto"
PASSWD_TOOL = "/usr/bin/mosquitto_passwd"
USERNAME = "gaitflow"


def credentials(cfg: StackConfig) -> tuple[str, str]:
    """(username, password) for the authenticated listeners."""
    path = cfg.dir / "mosquitto" / "credentials.txt"
    kv = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return kv["username"], kv["password"]


def ca_file(cfg: StackConfig) -> Path:
    """The CA certificate that signed the TLS listener's certificate."""
    return cfg.dir / "mosquitto" / "certs" / "ca.crt"


class Mosquitto(Service):
    name = "mosquitto"
    ready_timeout = 30.0

    # -- install ------------------------------------------------------------
    def is_installed(self) -> bool:
        return (Path(BINARY).exists() and Path(PASSWD_TOOL).exists()
                and (self.state / "credentials.txt").exists()
                and (self.state / "passwd").exists()
                and ca_file(self.cfg).exists())

    def install(self) -> None:
        if not Path(BINARY).exists():
            self._apt_install()
        self._make_credentials()
        ensure_ca_and_server_cert(self.state / "certs")

    def _apt_install(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(f"{BINARY} is missing and installing it needs root: run "
                               "`sudo apt-get update && sudo apt-get install -y mosquitto`, "
                               "then `python -m stack install` again")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"],
                     ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                      "mosquitto"]):
            print(f"  [mosquitto] $ {' '.join(argv)}", flush=True)
            # apt's own output is the progress here (one line per package/step)
            subprocess.run(argv, env=env, check=True)

    def _make_credentials(self) -> None:
        creds, passwd = self.state / "credentials.txt", self.state / "passwd"
        if creds.exists() and passwd.exists():
            return
        password = secrets.token_urlsafe(18)
        passwd.unlink(missing_ok=True)
        subprocess.run([PASSWD_TOOL, "-b", "-c", str(passwd), USERNAME, password],
                       check=True, capture_output=True)
        passwd.chmod(0o600)
        creds.write_text(f"username={USERNAME}\npassword={password}\n")
        creds.chmod(0o600)

    # -- run ----------------------------------------------------------------
    def address(self) -> str:
        return f"127.0.0.1:{self.opts['port']}"

    def _write_config(self) -> Path:
        st = self.state
        (st / "data").mkdir(exist_ok=True)
        certs = ensure_ca_and_server_cert(st / "certs")
        auth = f"allow_anonymous false\npassword_file {st / 'passwd'}\n"
        conf = f"""# written by `python -m stack up`; edits are overwritten
# Run as whoever started the stack: as root, mosquitto would otherwise switch to
# the `mosquitto` user, which cannot write our state directory.
user {getpass.getuser()}
per_listener_settings true
persistence true
persistence_location {st / 'data'}/
autosave_interval 10
# Generous queues: a persistent session of a paused pipeline must not drop data.
max_inflight_messages 1000
max_queued_messages 100000
max_queued_bytes 0
log_dest stdout
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %Y-%m-%dT%H:%M:%S

listener {self.opts['port']} 127.0.0.1
allow_anonymous true

listener {self.opts['secure_port']} 127.0.0.1
{auth}
listener {self.opts['tls_port']} 127.0.0.1
{auth}cafile {certs['ca_crt']}
certfile {certs['server_crt']}
keyfile {certs['server_key']}
tls_version tlsv1.2
"""
        path = st / "mosquitto.conf"
        path.write_text(conf)
        return path

    def start(self) -> None:
        if not (self.state / "passwd").exists():
            self._make_credentials()
        self.spawn([BINARY, "-c", str(self._write_config())])

    def ready(self) -> bool:
        """Subscribe, publish QoS 1 and receive it back on the anonymous listener."""
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            return False
        topic = f"_stack/ready/{uuid.uuid4().hex}"
        got = threading.Event()
        subscribed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"stack-ready-{uuid.uuid4().hex[:8]}")
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = lambda c, u, msg: got.set() if msg.payload == b"ping" else None
        try:
            client.connect("127.0.0.1", int(self.opts["port"]), keepalive=10)
            client.loop_start()
            try:
                client.subscribe(topic, qos=1)
                if not subscribed.wait(3):
                    return False
                client.publish(topic, b"ping", qos=1)
                return got.wait(3)
            finally:
                client.disconnect()
                client.loop_stop()
        except OSError:
            return False

