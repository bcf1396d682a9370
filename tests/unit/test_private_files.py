"""Private files: keys, results, receipts and logs are created 0600, atomically, never
through a symlink (teepsi.privatefile is the one recipe)."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from teepsi.cli import main
from teepsi.contract.audit import AuditLog
from teepsi.privatefile import (
    OutputPathError,
    check_output_path,
    open_private_append,
    write_private,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: whatever is created 0600 is so by its own doing."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# Modes of every file seen in a watched directory at each audit event (os.open, chmod,
# rename, write...): a file that is ever wider than 0600 shows up here.
_watch: dict[str, object] = {"directory": None, "modes": []}


def _audit_hook(event: str, _args: tuple[object, ...]) -> None:
    directory = _watch["directory"]
    if directory is None or event.startswith("os.listdir") or event == "os.scandir":
        return
    watched = Path(str(directory))
    try:
        names = os.listdir(watched)
    except OSError:
        return
    modes = _watch["modes"]
    assert isinstance(modes, list)
    for name in names:
        with contextlib.suppress(OSError):
            modes.append((event, name, stat.S_IMODE(os.lstat(watched / name).st_mode)))


sys.addaudithook(_audit_hook)


def test_keygen_never_shows_the_key_file_wider_than_0600(tmp_path, open_umask, capsys):
    """At no step of keygen (checked at every syscall-level audit event) is the private
    key readable by others; before, it was created 0666 & ~umask and chmodded after."""
    folder = tmp_path / "keys"
    folder.mkdir()
    _watch.update(directory=str(folder), modes=[])
    try:
        assert main(["keygen", "--out", str(folder / "party.key")]) == 0
    finally:
        _watch["directory"] = None
    seen = _watch["modes"]
    assert isinstance(seen, list) and seen, "the hook saw no file"
    wider = [(event, name, oct(mode)) for event, name, mode in seen if mode & 0o077]
    assert not wider, wider
    assert _mode(folder / "party.key") == 0o600
    assert list(folder.iterdir()) == [folder / "party.key"]  # no temporary left behind
    assert capsys.readouterr().out.startswith("ed25519:")


def test_keygen_force_replaces_a_planted_symlink_not_its_target(tmp_path, open_umask):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = tmp_path / "party.key"
    planted.symlink_to(victim)
    # Without --force an existing name (a symlink too) is refused: exit 2.
    assert main(["keygen", "--out", str(planted)]) == 2
    assert planted.is_symlink()
    assert main(["keygen", "--out", str(planted), "--force"]) == 0
    assert victim.read_text() == "precious\n"
    assert not planted.is_symlink()
    assert b"PRIVATE KEY" in planted.read_bytes()
    assert _mode(planted) == 0o600


def test_keygen_refuses_a_dangling_symlink_without_force(tmp_path, capsys):
    planted = tmp_path / "party.key"
    planted.symlink_to(tmp_path / "would-be-created")
    assert main(["keygen", "--out", str(planted)]) == 2
    assert not (tmp_path / "would-be-created").exists()
    assert "exists" in capsys.readouterr().err


def test_keygen_force_does_not_write_into_a_file_another_process_holds_open(tmp_path):
    """An fd opened on the old key file (while it was readable) never sees the new key."""
    out = tmp_path / "party.key"
    out.write_text("old\n")
    out.chmod(0o644)
    with open(out, "rb") as reader:
        assert main(["keygen", "--out", str(out), "--force"]) == 0
        assert reader.read() == b"old\n"
    assert b"PRIVATE KEY" in out.read_bytes()


def test_write_private_is_0600_atomic_and_never_follows_links(tmp_path, open_umask):
    target = tmp_path / "result.csv"
    write_private(target, b"a\n")
    assert _mode(target) == 0o600 and target.read_bytes() == b"a\n"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    write_private(link, b"new")
    assert victim.read_bytes() == b"keep" and not link.is_symlink()
    with pytest.raises(FileExistsError):
        write_private(target, b"b\n", replace=False)
    assert target.read_bytes() == b"a\n"
    # A failure while writing leaves the old file whole and no temporary behind.
    from teepsi.privatefile import private_writer

    with pytest.raises(RuntimeError), private_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "result.csv", "victim"]


def test_audit_log_is_created_0600_whatever_the_umask(tmp_path, open_umask):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("created", job_id="j")
    log.close()
    assert _mode(tmp_path / "audit.jsonl") == 0o600


def test_private_append_never_opens_through_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    (tmp_path / "audit.jsonl").symlink_to(victim)
    with pytest.raises(OSError):
        open_private_append(tmp_path / "audit.jsonl")


def test_output_path_check_catches_the_input_under_any_name(tmp_path, monkeypatch):
    data = tmp_path / "data.csv"
    data.write_text("id\n1\n")
    (tmp_path / "hard.csv").hardlink_to(data)
    (tmp_path / "soft.csv").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    for spelling in ("hard.csv", "soft.csv", "./data.csv", "../" + tmp_path.name + "/data.csv"):
        with pytest.raises(OutputPathError, match="is the input file"):
            check_output_path(spelling, flag="--output", inputs=[data])
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_path("nodir/a.csv", flag="--output")
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_path(tmp_path, flag="--output")
    check_output_path("fresh.csv", flag="--output", inputs=[data])
