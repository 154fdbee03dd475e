"""ZeroMQ plumbing shared by the services: endpoints, contexts, and CURVE security.

- Endpoints are loopback by default (`ipc://` in a run folder, or `tcp://127.0.0.1:PORT`).
  Which side binds is explicit in each `Endpoint`.
- Anything that leaves the host (tcp to a non-loopback address) must use CURVE, unless the
  user says `allow_insecure`: spikes and images are not sent in the clear by accident.
- CURVE keys live in one folder: `<identity>.key` (public) and `<identity>.key_secret`
  (secret, mode 600, kept only on the host that runs that service). The binding side of a
  socket is the CURVE server; it admits only clients whose public key is in the keys folder
  (checked by a ZAP authenticator thread). A connecting side names the peer it expects, and
  uses that peer's public key as the server key.

The lanes (publisher with handshake, validating receivers) are in `lanes.py`.
"""
from __future__ import annotations

import ipaddress
import os
import socket as _socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq

from spikevaediff.core.errors import UserError

LOOPBACK_HOST = "127.0.0.1"
_IPC_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, fewer elsewhere


def make_context(io_threads: int = 1) -> zmq.Context:
    """A fresh ZeroMQ context (never the global instance, so spawned processes stay independent)."""
    return zmq.Context(io_threads=io_threads)


def tcp_endpoint(port: int, host: str = LOOPBACK_HOST) -> str:
    """`tcp://host:port` (loopback unless told otherwise)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{int(port)}"


def free_tcp_port(host: str = LOOPBACK_HOST) -> int:
    """A port the OS says is free now (it may be taken before use; fine for tests and local runs)."""
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def ipc_endpoint(name: str, directory: str | os.PathLike | None = None) -> str:
    """`ipc://<directory>/<name>.sock`; the folder defaults to a fresh temporary one."""
    directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="svd-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = str(directory.resolve() / f"{name}.sock")
    if len(path.encode()) > _IPC_PATH_MAX:
        raise UserError(f"ipc socket path is too long ({len(path)} > {_IPC_PATH_MAX} bytes): {path}; "
                        "use a shorter run folder or tcp")
    return f"ipc://{path}"


def is_loopback(address: str) -> bool:
    """True for ipc/inproc and for tcp on a loopback address; wildcards count as exposed."""
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    if parts.scheme != "tcp":
        raise UserError(f"unsupported ZeroMQ address '{address}' (use tcp://, ipc:// or inproc://)")
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface or a host name: reaches beyond this machine
        return False


@dataclass(frozen=True)
class Endpoint:
    """Where a socket binds or connects. `peer`: the CURVE identity of the binding side we connect to."""

    address: str
    bind: bool = False
    peer: str | None = None

    @classmethod
    def from_config(cls, value) -> "Endpoint":
        """From `"tcp://..."` (connect) or `{"address": ..., "bind": bool, "peer": name}`."""
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict) or "address" not in value:
            raise UserError(f"bad endpoint {value!r}: give an address string or a map with 'address'")
        unknown = set(value) - {"address", "bind", "peer"}
        if unknown:
            raise UserError(f"unknown endpoint option(s) {sorted(unknown)} in {value!r}")
        return cls(str(value["address"]), bool(value.get("bind", False)), value.get("peer"))


# ---------------------------------------------------------------- CURVE


def generate_keypair(keys_dir: str | os.PathLike, identity: str) -> tuple[Path, Path]:
    """Write `<identity>.key` and `<identity>.key_secret` (mode 600) into `keys_dir`."""
    import zmq.auth

    if not zmq.has("curve"):
        raise UserError("this libzmq was built without CURVE support")
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(keys_dir, identity)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


@dataclass(frozen=True)
class CurveConfig:
    """CURVE settings of one service: its identity and the folder of keys.

    `keys_dir/<identity>.key_secret` is this service's keypair; `keys_dir/*.key` are the public
    keys of every service allowed to connect (and of the servers this one connects to).
    `authorized_dir` overrides where the allowed client keys are read from.
    """

    keys_dir: Path
    identity: str
    authorized_dir: Path | None = None

    @classmethod
    def from_config(cls, value: dict, base_dir: str | os.PathLike = ".") -> "CurveConfig":
        """From `{"keys_dir", "identity", "authorized_dir"?}`; relative paths start at `base_dir`."""
        try:
            keys_dir = Path(base_dir) / value["keys_dir"]
            identity = str(value["identity"])
        except (KeyError, TypeError):
            raise UserError("curve settings need 'keys_dir' and 'identity'") from None
        authorized = value.get("authorized_dir")
        return cls(keys_dir, identity, Path(base_dir) / authorized if authorized else None)

    def _load(self, filename: str) -> tuple[bytes, bytes | None]:
        import zmq.auth

        path = self.keys_dir / filename
        if not path.is_file():
            raise UserError(f"CURVE key file not found: {path} (create keys with "
                            "spikevaediff.services.transport.generate_keypair; see docs/PROTOCOL.md)")
        try:
            return zmq.auth.load_certificate(path)
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot read CURVE key file {path}: {exc}") from None

    def own_keys(self) -> tuple[bytes, bytes]:
        public, secret = self._load(f"{self.identity}.key_secret")
        if not secret:
            raise UserError(f"{self.keys_dir / (self.identity + '.key_secret')} holds no secret key")
        return public, secret

    def peer_public_key(self, peer: str) -> bytes:
        return self._load(f"{peer}.key")[0]

    def clients_dir(self) -> Path:
        return self.authorized_dir or self.keys_dir


def secure_socket(sock: zmq.Socket, curve: CurveConfig, endpoint: Endpoint) -> None:
    """Make `sock` a CURVE server (binding side) or client (connecting side, needs `peer`)."""
    public, secret = curve.own_keys()
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    if endpoint.bind:
        sock.curve_server = True
    else:
        if not endpoint.peer:
            raise UserError(f"endpoint {endpoint.address} needs 'peer' (whose public key to expect) "
                            "when CURVE is on")
        sock.curve_serverkey = curve.peer_public_key(endpoint.peer)


def check_exposure(endpoint: Endpoint, curve: CurveConfig | None, allow_insecure: bool) -> None:
    """Refuse plain-text traffic beyond this host unless the user explicitly allowed it."""
    if curve is None and not allow_insecure and not is_loopback(endpoint.address):
        raise UserError(f"{endpoint.address} reaches beyond this host: configure CURVE keys "
                        "(see docs/PROTOCOL.md) or allow insecure transport explicitly")


class Network:
    """One service's ZeroMQ context, with CURVE (and its ZAP authenticator) when configured.

    Use as a context manager, or call `close()`; sockets made here are closed with it.
    """

    def __init__(self, curve: CurveConfig | None = None, allow_insecure: bool = False,
                 io_threads: int = 1):
        self.curve = curve
        self.allow_insecure = allow_insecure
        self.context = make_context(io_threads)
        self.authenticator = None
        if curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            clients = curve.clients_dir()
            if not clients.is_dir():
                raise UserError(f"CURVE keys folder not found: {clients}")
            self.authenticator = ThreadAuthenticator(self.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=str(clients))

    def socket(self, socket_type: int, endpoints: list[Endpoint] | Endpoint,
               options: dict[int, object] | None = None) -> zmq.Socket:
        """A socket with `options` set, secured if CURVE is on, bound/connected to `endpoints`."""
        endpoints = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
        if not endpoints:
            raise UserError("a socket needs at least one endpoint")
        if self.curve is not None and len({e.bind for e in endpoints}) > 1:
            raise UserError("with CURVE a socket either binds or connects, not both")
        for endpoint in endpoints:
            check_exposure(endpoint, self.curve, self.allow_insecure)
        sock = self.context.socket(socket_type)
        try:
            for option, value in (options or {}).items():
                sock.setsockopt(option, value)
            if self.curve is not None:
                secure_socket(sock, self.curve, endpoints[0])
            for endpoint in endpoints:
                attach(sock, endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def close(self, linger_ms: int = 1000) -> None:
        """Close every socket (waiting up to `linger_ms` to flush queued messages) and the context."""
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        if not self.context.closed:
            self.context.destroy(linger=linger_ms)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(sock: zmq.Socket, endpoint: Endpoint) -> None:
    """Bind or connect `sock`, turning ZeroMQ's errors into one clear line."""
    try:
        if endpoint.bind:
            sock.bind(endpoint.address)
        else:
            sock.connect(endpoint.address)
    except zmq.ZMQError as exc:
        verb = "bind to" if endpoint.bind else "connect to"
        raise UserError(f"cannot {verb} {endpoint.address}: {exc}") from None
