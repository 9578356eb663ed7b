"""Key files: layout, permissions, loading, and refusal of unsafe or missing keys."""

from __future__ import annotations

import os
import stat

import pytest

from secdfd.common.net.keys import CONNECTS, LISTENS, PARTIES, KeyFileError, allowed_keys, load_party, make_keys


def test_layout_and_modes(tmp_path):
    folders = make_keys(tmp_path)
    assert sorted(folders) == sorted(PARTIES)
    publics = {p: load_party(tmp_path, p).public for p in PARTIES}
    assert len(set(publics.values())) == 4  # four distinct keypairs
    for p in PARTIES:
        secret = tmp_path / p / f"{p}.key_secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / p).stat().st_mode) == 0o700
        keys = load_party(tmp_path, p)
        assert len(keys.public) == 40 and len(keys.secret) == 40
        assert keys.servers == {s: publics[s] for s in CONNECTS[p]}
        for domain, peers in LISTENS[p].items():
            assert allowed_keys(keys.allow_dir(domain)) == {publics[q] for q in peers}
        assert (tmp_path / "public" / f"{p}.key").is_file()
        assert "secret" not in (tmp_path / "public" / f"{p}.key").read_text().replace("Secret", "")
    # a party's own folder, as mounted into a container, loads the same keys
    assert load_party(tmp_path / "server_b", "server_b") == load_party(tmp_path, "server_b")
    # server_b's clients may not reach server_a's peer socket: the allow-lists differ
    assert allowed_keys(tmp_path / "server_a" / "allow" / "peer") == {publics["server_b"]}


def test_refuses_overwrite_and_loose_permissions(tmp_path):
    make_keys(tmp_path)
    before = load_party(tmp_path, "dealer").public
    with pytest.raises(KeyFileError, match="--force"):
        make_keys(tmp_path)
    make_keys(tmp_path, force=True)
    assert load_party(tmp_path, "dealer").public != before
    secret = tmp_path / "client" / "client.key_secret"
    os.chmod(secret, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_party(tmp_path, "client")


def test_missing_keys_are_clear(tmp_path):
    with pytest.raises(KeyFileError, match="secdfd keys"):
        load_party(tmp_path, "server_a")
    with pytest.raises(KeyFileError, match="unknown party"):
        load_party(tmp_path, "mallory")
    make_keys(tmp_path)
    keys = load_party(tmp_path, "client")
    with pytest.raises(KeyFileError, match="dealer"):
        keys.server_key("dealer")
    with pytest.raises(KeyFileError, match="allow/peer"):
        keys.allow_dir("peer")


def test_own_keypair_admit_and_revoke(tmp_path):
    from secdfd.common.net.keys import admit, make_party_keys, revoke

    pub_a = make_party_keys(tmp_path / "a", "server_a")
    pub_b = make_party_keys(tmp_path / "b", "server_b")
    pub_d = make_party_keys(tmp_path / "d", "dealer")
    assert stat.S_IMODE((tmp_path / "a" / "server_a.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    with pytest.raises(KeyFileError, match="exists"):
        make_party_keys(tmp_path / "a", "server_a")
    # server_a admits server_b on its peer socket, knows the dealer as a server it connects to
    assert admit(tmp_path / "a", "server_a", pub_b) == [tmp_path / "a" / "allow" / "peer" / "server_b.key"]
    assert admit(tmp_path / "a", "server_a", pub_d) == [tmp_path / "a" / "public" / "dealer.key"]
    # server_b connects to server_a: a known server key, no allow-list entry
    assert admit(tmp_path / "b", "server_b", pub_a) == [tmp_path / "b" / "public" / "server_a.key"]
    keys_a = load_party(tmp_path / "a", "server_a")
    assert keys_a.servers["dealer"] == load_party(tmp_path / "d", "dealer").public
    assert allowed_keys(tmp_path / "a" / "allow" / "peer") == {load_party(tmp_path / "b", "server_b").public}
    assert revoke(tmp_path / "a", "server_b") == [tmp_path / "a" / "allow" / "peer" / "server_b.key"]
    assert allowed_keys(tmp_path / "a" / "allow" / "peer") == set()
    with pytest.raises(KeyFileError, match="dealer does not talk to a client"):
        admit(tmp_path / "d", "dealer", pub_a, name="mallory")


def test_sealed_file_opens_for_its_recipient_only(tmp_path):
    from secdfd.common.net.keys import make_party_keys
    from secdfd.common.net.sealed import open_sealed, seal

    make_party_keys(tmp_path / "a", "server_a")
    make_party_keys(tmp_path / "b", "server_b")
    ka, kb = load_party(tmp_path / "a", "server_a"), load_party(tmp_path / "b", "server_b")
    data = bytes(range(256)) * 100
    box = seal(data, ka.public)
    assert data not in box and len(box) == len(data) + 16 + 32 + 16
    assert seal(data, ka.public) != box  # a fresh ephemeral key every time
    assert open_sealed(box, ka.public, ka.secret) == data
    with pytest.raises(KeyFileError, match="another party's key"):
        open_sealed(box, kb.public, kb.secret)
    tampered = bytearray(box)
    tampered[-40] ^= 1
    with pytest.raises(KeyFileError, match="changed on the way"):
        open_sealed(bytes(tampered), ka.public, ka.secret)
