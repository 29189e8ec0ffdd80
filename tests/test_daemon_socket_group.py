"""``socket_group``: trainers of another uid reach the daemon through a group.

Without it the socket directory is 0700 and both unix sockets (``ckptd.sock`` and
``ckptd.sock.data``) 0600, all owned by the daemon's uid; with it the directory is 0750 and
the sockets 0660, of that group. Either way the daemon refuses a directory that others may
write or that it does not own. Checked on the real files with ``os.stat``, on a real
``ckptd`` process and, as root, by connecting as another uid with and without the group.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import make_nodes

from ckptd.daemon.auth import UnsafePathError, prepare_socket_path, secure_socket
from ckptd.daemon.config import ConfigError, load_config

OTHER_UID = 65534  # nobody


def _group() -> int:
    """A gid this process may give its files: any as root (one that is not ours, to prove
    the chgrp), else one of our own groups."""
    if os.geteuid() == 0:
        return 4242
    others = [g for g in os.getgroups() if g != os.getegid()]
    return others[0] if others else os.getegid()


def _mode_gid(path: str | Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory others may traverse (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cksg-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ config


def test_config_accepts_gid_name_and_env() -> None:
    base = {"CKPTD_AUTH__ALLOW_UNAUTHENTICATED": "true"}
    assert load_config(None, base).socket_group is None
    assert load_config(None, base | {"CKPTD_SOCKET_GROUP": "4242"}).socket_group == 4242
    import grp

    name = grp.getgrgid(os.getegid()).gr_name
    assert load_config(None, base | {"CKPTD_SOCKET_GROUP": name}).socket_group == os.getegid()
    cfg = load_config(None, base | {"CKPTD_SOCKET_GROUP": "4242"})
    assert "socket_group: 4242" in cfg.to_yaml()


@pytest.mark.parametrize(("value", "message"), [
    ("no-such-group-ckptd", "no group named"), ("-3", "a gid must be in"),
    ("true", "must be a group name or a gid")])
def test_config_rejects_bad_groups(tmp_path: Path, value: str, message: str) -> None:
    path = tmp_path / "ckptd.yaml"
    path.write_text(f"socket_group: {value}\nauth: {{allow_unauthenticated: true}}\n")
    with pytest.raises(ConfigError, match="socket_group") as err:
        load_config(path, {})
    assert message in str(err.value)


# ------------------------------------------------------------------ directory and socket


@pytest.mark.parametrize("group", [None, "set"])
def test_created_directory_and_socket_modes(short_tmp: Path, group: str | None) -> None:
    gid = _group() if group else None
    path = str(short_tmp / "sock" / "ckptd.sock")
    prepare_socket_path(path, gid)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        secure_socket(path, gid)
        dir_mode, dir_uid, dir_gid = _mode_gid(short_tmp / "sock")
        sock_mode, sock_uid, sock_gid = _mode_gid(path)
    assert dir_uid == sock_uid == os.geteuid()
    if gid is None:
        assert (dir_mode, sock_mode) == (0o700, 0o600)
    else:
        assert (dir_mode, sock_mode, dir_gid, sock_gid) == (0o750, 0o660, gid, gid)
    os.unlink(path)
    prepare_socket_path(path, gid)  # an existing directory in the right state is accepted


@pytest.mark.parametrize(("mode", "gid", "expected"), [
    (0o700, "group", "must be 0750"),      # the group could not enter
    (0o770, "group", "must be 0750"),      # group members could replace the socket
    (0o755, "group", "must be 0750"),      # others may enter
    (0o777, "group", "world-writable"),
    (0o750, "other", "must be 0750 and group"),  # another group may enter
    (0o750, None, "must be 0700"),         # without socket_group: private to the uid
])
def test_refuses_unsafe_directory(short_tmp: Path, mode: int, gid: str | None,
                                  expected: str) -> None:
    group = _group()
    directory = short_tmp / "sock"
    directory.mkdir()
    directory.chmod(mode)
    if gid == "other":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory a group we are not in")
        os.chown(directory, -1, 4343)
    else:
        os.chown(directory, -1, group)
    with pytest.raises(UnsafePathError, match=expected):
        prepare_socket_path(str(directory / "ckptd.sock"), group if gid else None)


def test_refuses_directory_of_another_owner(short_tmp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to hand the directory to another uid")
    directory = short_tmp / "sock"
    directory.mkdir(mode=0o750)
    os.chown(directory, OTHER_UID, _group())
    with pytest.raises(UnsafePathError, match=f"owned by uid {OTHER_UID}"):
        prepare_socket_path(str(directory / "ckptd.sock"), _group())


# ------------------------------------------------------------------ a real daemon


def _connect_as(path: str, uid: int, groups: list[int]) -> int:
    """0 if a process of ``uid`` with ``groups`` may connect to ``path``, else the errno
    (forked child: setgroups/setgid/setuid, then connect; no interpreter to start)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
        except OSError as exc:
            code = exc.errno or 1
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("group", [None, "set"])
def test_daemon_sockets_follow_socket_group(short_tmp: Path, group: str | None) -> None:
    gid = _group() if group else None
    (node,) = make_nodes(short_tmp, 1, erasure={"n": 1, "m": 0})
    node.root.chmod(0o755)
    if gid is not None:
        node.config["socket_group"] = gid
    try:
        node.start()
        node.wait_ready()
        sock = node.socket_path
        dir_mode, dir_uid, dir_gid = _mode_gid(Path(sock).parent)
        modes = {p: _mode_gid(p) for p in (sock, sock + ".data")}
        assert all(stat.S_ISSOCK(os.lstat(p).st_mode) for p in modes)
        assert dir_uid == os.geteuid() and all(uid == os.geteuid() for _, uid, _ in
                                               modes.values())
        if gid is None:
            assert dir_mode == 0o700
            assert [m for m, _, _ in modes.values()] == [0o600, 0o600]
        else:
            assert (dir_mode, dir_gid) == (0o750, gid)
            assert [(m, g) for m, _, g in modes.values()] == [(0o660, gid)] * 2
        if os.geteuid() == 0:  # the kernel's verdict, for a uid that is not the daemon's
            for path in modes:
                member = _connect_as(path, OTHER_UID, [gid] if gid is not None else [])
                stranger = _connect_as(path, OTHER_UID, [])
                assert stranger == errno.EACCES, (path, stranger)
                assert member == (0 if gid is not None else errno.EACCES), (path, member)
    finally:
        node.stop()


def test_snapshot_buffers_follow_the_socket_group(tmp_path: Path) -> None:
    """With a group, trainers of that gid can map the shared-memory buffers to save."""
    from ckptd.daemon.snapshots import SnapshotStore

    gid = os.getgid()
    store = SnapshotStore(tmp_path / "shm", "job-g", 1 << 20, group=gid)
    try:
        w = store.slot(0).begin(1, 4096)
        st = os.stat(w.lease.path)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid)
        d = os.stat(tmp_path / "shm")
        assert (d.st_mode & 0o777, d.st_gid) == (0o750, gid)
        w.abort()
    finally:
        store.close(unlink=True)
    private = SnapshotStore(tmp_path / "shm2", "job-p", 1 << 20)
    try:
        w = private.slot(0).begin(1, 4096)
        assert os.stat(w.lease.path).st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "shm2").st_mode & 0o777 == 0o700
        w.abort()
    finally:
        private.close(unlink=True)
