"""CURVE keypairs of the four parties and the files each process loads.

`make_keys(DIR)` writes one folder per party, so that each process (or container) is given only
its own folder::

    DIR/public/<name>.key                    every public key (what to hand to other operators)
    DIR/<party>/<party>.key_secret           the party's keypair, mode 0600 (folder 0700)
    DIR/<party>/public/<peer>.key            public keys of the servers this party connects to
    DIR/<party>/allow/<domain>/<peer>.key    allow-list of each socket this party listens on

Who talks to whom (the listening side's allow-list, the connecting side's known server key):

    dealer    listens on "servers"  (server_a, server_b fetch provisioning and bundles)
    server_a  listens on "peer"     (server_b) and "clients" (client); connects to dealer
    server_b  listens on "clients"  (client); connects to dealer and to server_a's "peer"
    client    connects to server_a and server_b

`make_keys` puts every party's secret in one place: a convenience for one machine (`secdfd up`).
Where the parties are run by different operators, each makes its own keypair on its own machine
(`make_party_keys`, `secdfd keys new PARTY`), hands out only the public key file, and admits the
peers' public keys it is given (`admit`, `secdfd keys admit`); no secret ever leaves its machine.

To admit another client, put its public key file into each server's `allow/clients/` (the file's
name is the name the servers log it by); to revoke it, remove the file (`revoke`). Running servers
read their allow-lists again within a second or two. The files are pyzmq/czmq certificates
(`zmq.auth.load_certificate` reads them), written here so that a secret key file is created with
mode 0600 and never exists with wider permissions.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import zmq
import zmq.auth

from secdfd.common.errors import SecDFDError
from secdfd.common.roster import CLIENT, DEALER, PARTIES, SERVER_A, SERVER_B

# party -> {listening domain -> allowed peers}
LISTENS: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "dealer": {"servers": ("server_a", "server_b")},
        "server_a": {"peer": ("server_b",), "clients": ("client",)},
        "server_b": {"clients": ("client",)},
        "client": {},
    }
)
# party -> servers it connects to (whose public key it must know)
CONNECTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "dealer": (),
        "server_a": ("dealer",),
        "server_b": ("dealer", "server_a"),
        "client": ("server_a", "server_b"),
    }
)


class KeyFileError(SecDFDError):
    """A key file is missing, unreadable or too widely readable."""


@dataclass(frozen=True)
class PartyKeys:
    """What one process needs: its own keypair, the servers' public keys, its allow-list folders."""

    name: str
    public: bytes  # z85, 40 bytes
    secret: bytes
    servers: Mapping[str, bytes]  # name -> z85 public key of each server it connects to
    allow: Mapping[str, Path]  # listening domain -> folder of allowed public keys

    def server_key(self, name: str) -> bytes:
        try:
            return self.servers[name]
        except KeyError:
            raise KeyFileError(f"{self.name} has no public key for {name}: copy {name}.key into "
                               f"its public/ folder (see `secdfd keys`)") from None

    def allow_dir(self, domain: str) -> Path:
        try:
            return self.allow[domain]
        except KeyError:
            raise KeyFileError(f"{self.name} has no allow-list for {domain!r}: expected folder "
                               f"allow/{domain} (see `secdfd keys`)") from None


def make_keys(out: Path, force: bool = False) -> dict[str, Path]:
    """Create keypairs for every party under `out`; returns each party's folder.

    Refuses to overwrite existing keys unless `force`, because replacing a key silently locks the
    other parties out.
    """
    out = Path(out)
    if not force and any((out / p / f"{p}.key_secret").exists() for p in PARTIES):
        raise KeyFileError(f"keys already exist in {out}; pass --force to replace them "
                           "(every party must then get its new folder)")
    pairs = {p: zmq.curve_keypair() for p in PARTIES}
    (out / "public").mkdir(parents=True, exist_ok=True)
    folders = {}
    for party in PARTIES:
        home = out / party
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        public, secret = pairs[party]
        _write_cert(out / "public" / f"{party}.key", public)
        _write_cert(home / f"{party}.key_secret", public, secret)
        (home / "public").mkdir(exist_ok=True)
        for server in CONNECTS[party]:
            _write_cert(home / "public" / f"{server}.key", pairs[server][0])
        for domain, peers in LISTENS[party].items():
            d = home / "allow" / domain
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob("*.key"):
                stale.unlink()
            for peer in peers:
                _write_cert(d / f"{peer}.key", pairs[peer][0])
        folders[party] = home
    return folders


def make_party_keys(home: Path, party: str, force: bool = False) -> Path:
    """Make `party`'s own keypair in `home` (its folder on its own machine): the secret key
    (0600, folder 0700), empty public/ and allow/<domain>/ folders, and HOME/<party>.key, the
    public key to hand to the other operators. Returns that public key file."""
    if party not in PARTIES:
        raise KeyFileError(f"unknown party {party!r}; parties are {', '.join(PARTIES)}")
    home = Path(home)
    secret_file = home / f"{party}.key_secret"
    if secret_file.exists() and not force:
        raise KeyFileError(f"{secret_file} exists; pass --force to replace it (every peer must then admit the "
                           "new public key)")
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    public, secret = zmq.curve_keypair()
    _write_cert(secret_file, public, secret)
    _write_cert(home / f"{party}.key", public)
    (home / "public").mkdir(exist_ok=True)
    for domain in LISTENS[party]:
        (home / "allow" / domain).mkdir(parents=True, exist_ok=True)
    return home / f"{party}.key"


def peer_role(name: str) -> str:
    """The role of a peer named `name`: dealer, server_a or server_b by name, anyone else a client."""
    return name if name in (DEALER, SERVER_A, SERVER_B) else CLIENT


def admit(home: Path, party: str, public_file: Path, name: str | None = None) -> list[Path]:
    """Put a peer's public key where `party` (its folder is `home`) needs it, under the peer's name
    (default: the file's name): public/<name>.key for a server this party connects to, and
    allow/<domain>/<name>.key for each of this party's sockets the peer connects to. Returns the
    files written; KeyFileError if this party never talks to such a peer."""
    name = name or Path(public_file).stem
    if not name.replace("-", "").replace("_", "").isalnum():
        raise KeyFileError(f"a peer name is letters, digits, - and _; got {name!r}")
    key = read_public(public_file)
    role = peer_role(name)
    targets = []
    if role in CONNECTS[party]:
        targets.append(Path(home) / "public" / f"{name}.key")
    for domain, peers in LISTENS[party].items():
        if role in peers:
            targets.append(Path(home) / "allow" / domain / f"{name}.key")
    if not targets:
        connects = ", ".join(CONNECTS[party]) or "no one"
        admits = ", ".join(sorted({p for ps in LISTENS[party].values() for p in ps})) or "no one"
        raise KeyFileError(f"{party} does not talk to a {role} (it connects to {connects} and admits {admits})")
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        _write_cert(t, key)
    return targets


def revoke(home: Path, name: str) -> list[Path]:
    """Remove `name`'s public key from every allow-list in `home`; returns the files removed."""
    removed = [f for f in sorted((Path(home) / "allow").glob(f"*/{name}.key"))]
    for f in removed:
        f.unlink()
    return removed


def load_party(keys_dir: Path, name: str) -> PartyKeys:
    """Load party `name`'s keys from `keys_dir/<name>/` (as made by make_keys) or from `keys_dir`
    itself when it is that party's folder (as mounted into a container)."""
    if name not in PARTIES:
        raise KeyFileError(f"unknown party {name!r}; parties are {', '.join(PARTIES)}")
    keys_dir = Path(keys_dir)
    home = keys_dir / name if (keys_dir / name).is_dir() else keys_dir
    secret_file = home / f"{name}.key_secret"
    if not secret_file.is_file():
        raise KeyFileError(f"no secret key for {name} at {secret_file}: run `secdfd keys --out DIR` "
                           "and point --keys at DIR")
    mode = stat.S_IMODE(secret_file.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"secret key {secret_file} is readable by others (mode {mode:o}): "
                           f"chmod 600 {secret_file}")
    public, secret = _load(secret_file)
    if secret is None:
        raise KeyFileError(f"{secret_file} holds no secret key")
    servers = {}
    for server in CONNECTS[name]:
        f = home / "public" / f"{server}.key"
        if f.is_file():
            servers[server] = _load(f)[0]
    allow = {}
    for domain in LISTENS[name]:
        d = home / "allow" / domain
        if d.is_dir():
            allow[domain] = d
    return PartyKeys(name=name, public=public, secret=secret, servers=servers, allow=allow)


def allowed_keys(folder: Path) -> set[bytes]:
    """The z85 public keys in an allow-list folder (every `*.key` file)."""
    return {_load(f)[0] for f in sorted(Path(folder).glob("*.key"))}


def read_public(path: Path) -> bytes:
    """The z85 public key in one certificate file."""
    return _load(Path(path))[0]


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot read key file {path}: {e}") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeyFileError(f"key file {path} is not a CURVE certificate (z85 keys are 40 characters)")
    return public, secret


def _write_cert(path: Path, public: bytes, secret: bytes | None = None) -> None:
    # Secret files are created with 0600 from the start: no window where others can read them.
    mode = 0o600 if secret is not None else 0o644
    lines = [
        f"#   ****  Generated on {datetime.datetime.now().isoformat(timespec='seconds')} by secdfd  ****",
        "#   ZeroMQ CURVE " + ("Secret" if secret is not None else "Public") + " Certificate",
        "#   " + ("Keep this file private; never copy it off this party's machine."
                  if secret is not None else "Exchange securely and verify the key after exchange."),
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, mode)  # umask may have narrowed a public file; secrets stay 0600
