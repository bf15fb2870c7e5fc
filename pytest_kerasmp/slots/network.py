"""What a process listens on, and whether the network reaches it: the audit behind
``--kerasmp-private-network``.

Read from ``/proc`` for any process of this user, in whatever network namespace it runs
(psutil reads the TCP tables of the namespace of the process that asks, so it misses the
sockets of a process in a private one): the process's socket inodes (``/proc/PID/fd``)
matched against the TCP tables of its own namespace (``/proc/PID/net/tcp`` and ``tcp6``),
state LISTEN. A listening socket is reachable beyond loopback when it is bound to an address
that is not loopback (``0.0.0.0``, ``::`` or an interface's) in a namespace that has an
interface other than ``lo``. Import-light (standard library only): children use it too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Any

_LISTEN = "0A"

MODE_ENV = "PYTEST_KERASMP_PRIVATE_NETWORK"
MODES = ("auto", "require", "off")


@dataclasses.dataclass(frozen=True)
class Listener:
    """One listening TCP socket of a process."""

    address: str
    port: int
    #: Reachable from beyond this machine's loopback (see the module docstring).
    reachable: bool

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def mode(environ: dict[str, str] | None = None) -> str:
    """The session's private-network mode (``auto`` unless the plugin or the user set one);
    a value that is none of :data:`MODES` is a ValueError (it must not weaken ``require``)."""
    value = (environ if environ is not None else os.environ).get(MODE_ENV, "").strip().lower()
    if value and value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r} is invalid: use auto, require or off")
    return value or "auto"


def _address(hex_address: str) -> str:
    """``/proc/net/tcp``'s address column (hex, 32-bit words in host order) as text."""
    raw = bytes.fromhex(hex_address)
    ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
    mapped = getattr(ip, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def _table(pid: int, listen: bool = True) -> dict[int, tuple[str, int]]:
    """The TCP sockets of ``pid``'s network namespace, listening ones (inode -> local
    address, port) or the others (inode -> remote address, port)."""
    found: dict[int, tuple[str, int]] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or (fields[3] == _LISTEN) != listen:
                continue
            address, _, port = fields[1 if listen else 2].partition(":")
            found[int(fields[9])] = (_address(address), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def interfaces(pid: int | str = "self") -> list[str]:
    """The network interfaces of ``pid``'s namespace (``["lo"]`` alone: a private one)."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return []
    return [line.split(":", 1)[0].strip() for line in lines if ":" in line]


def namespace(pid: int | str = "self") -> int | None:
    """The inode of ``pid``'s network namespace (None where it cannot be read)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def listening(pid: int) -> list[Listener]:
    """Every TCP socket ``pid`` listens on, in port order (empty when it cannot be read)."""
    table = _table(pid)
    mine = sorted((table[i] for i in _socket_inodes(pid) if i in table), key=lambda a: (a[1], a[0]))
    private = interfaces(pid) == ["lo"]
    return [Listener(address, port, not private and not _loopback(address)) for address, port in mine]


def peers(pid: int) -> set[str]:
    """The remote addresses of ``pid``'s connected TCP sockets (IPv4-mapped ones as IPv4)."""
    table = _table(pid, listen=False)
    return {table[i][0].removeprefix("::ffff:") for i in _socket_inodes(pid) if i in table}


def audit(pid: int) -> dict[str, Any]:
    """What the placement records keep of ``pid``'s network: its listeners, those reachable,
    and whether it runs in a private namespace (only ``lo``, not this process's)."""
    found = listening(pid)
    theirs = namespace(pid)
    return {
        "listening": [x.describe() for x in found],
        "exposed": [x.describe() for x in found if x.reachable],
        "private": theirs is not None and theirs != namespace() and not any(x.reachable for x in found)
        and interfaces(pid) == ["lo"],
    }


__all__ = ["MODES", "MODE_ENV", "Listener", "audit", "interfaces", "listening", "mode", "namespace", "peers"]
