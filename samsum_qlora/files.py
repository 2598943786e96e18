"""Writes that never leave a half-written result, and one run per folder at a time.

Every result is written under a temporary name beside its final one and renamed into place;
folders are staged whole and swapped in (`publish_dir`). A full disk becomes one line that says
so, and a folder another samsum-qlora process is using is refused (`hold`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from samsum_qlora.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output directory {path} is not writable")
    return path


def check_can_create(path: Path) -> None:
    """That `path` (a folder a command will write at the end) can be made, said before the work: the
    nearest folder that exists above it must be one, and writable. Nothing is created."""
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"cannot create {path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"cannot create {path}: {above} is not writable")


def ensure_writable_file(path: Path) -> Path:
    """Refuse, before any work, a file that could not be written later: its folder is made and a
    scratch file written and removed there (permission bits alone say nothing to root)."""
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a file name")
    ensure_writable_dir(path.parent)
    try:
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(scratch)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    return path


def sha256(path: Path) -> str:
    """The file's SHA-256, read in blocks (a checkpoint's or a model's files can be large)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for people to open
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_all_or_none(contents: dict[Path, bytes]) -> None:
    """Several files that belong together (a report's three): each written under a temporary
    name first, then all renamed into place, so a failure (a full disk) leaves the old ones as
    they were and none of the new."""
    staged: dict[Path, Path] = {}
    try:
        for path, data in contents.items():
            staged[path] = path.with_name(f".{path.name}.pending")
            write_bytes(staged[path], data)
        with signals_wait():  # a Ctrl-C must not land between two renames
            for path, temporary in staged.items():
                os.replace(temporary, path)
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def signals_wait() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive during the block (a few renames, a write and its mark) act
    when it ends. (Blocking them with a signal mask would not do: another thread of the process
    would take them.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread handles them
        yield
        return
    arrived: list[int] = []
    before = {
        s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in arrived:
            os.kill(os.getpid(), s)  # now, to the handler that was there


def append_whole(fd: int, data: bytes) -> None:
    """Append `data` to the open file `fd` whole or not at all: a write the disk cannot take is
    undone, so the file never ends in a record cut in half."""
    size = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def utf8_text(raw: bytes, where: str, *, bom: bool = False) -> str:
    """`raw` as UTF-8 text (`bom`: a leading byte-order mark dropped); else a one-line error naming
    `where` and the line of the first bad byte."""
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{where} line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}): save it as UTF-8") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a line cut off by a crash is dropped. Lines end at "\\n" alone: write_jsonl
    leaves U+2028, U+0085 and the like unescaped inside strings, where splitlines() would cut."""
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_whole_jsonl(path: Path) -> list[Any]:
    """A finished JSON Lines file (predictions.jsonl), which must be whole: a line that is cut off or
    not JSON is a UserError naming the file and the lines (`read_jsonl` would drop them unsaid)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # -sig: a BOM an editor added is no damage
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    out, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line and number == len(lines):
            break  # after the last line's newline
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(number)
    if bad:
        cut = " (cut off)" if bad == [len(lines)] else ""
        where = f"line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:10]))}"
        raise UserError(f"{path} is damaged at {where}: not whole JSON{cut}; rerun its eval with --overwrite")
    return out


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written folder into place; the old one (if any) goes only once the new one is."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh folder beside `final` to write into; published as `final` when the block ends
    normally, removed when it raises."""
    staging = final.with_name(f".{final.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in staging.rglob("*"):  # safetensors writes 0600; results are for people to open
            if path.is_file() and not path.is_symlink():
                path.chmod(0o666 & ~_UMASK)
        publish_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _holder(fd: int) -> str:
    """The pid the holder of the claim on `fd`'s file wrote there. It writes it just after taking
    the claim, over what an earlier, killed holder left: wait a moment for a live one."""
    deadline = time.monotonic() + 2.0
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit() and _alive(int(text)) or time.monotonic() > deadline:
            return text or "unknown"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def hold(lock: Path, command: str, folder: Path | None = None) -> Iterator[None]:
    """This process's exclusive claim, through the file `lock`, on `folder` (default: the lock's
    own folder; a run or eval folder's `.lock`, a merge's beside its --out): a second run into it
    refuses, naming this one's pid.

    The kernel drops the claim when the process ends, however it ends, so a killed run never
    leaves a stale one; a run that ends removes the file too (still holding it: a process that
    opened the file meanwhile finds it gone once it gets the claim, and tries again). Where the
    filesystem has no locks (some network mounts), runs are not kept apart, and that is said."""
    import fcntl

    ensure_writable_dir(lock.parent)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{folder or lock.parent} is in use by another samsum-qlora {command} (pid {holder}); "
                "wait for it to finish or choose another folder"
            ) from None
        except OSError:
            print(f"note: {lock.parent} cannot be locked here; make sure no other run writes into it")
        with contextlib.suppress(OSError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the claim is on the file that is there
        os.close(fd)  # the holder removed it on its way out: claim the new one
    with contextlib.suppress(OSError):  # a full disk: the claim holds all the same, unnamed
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _disk_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's and safetensors' writers report a failed write without its errno, and safetensors
    # with an exception class of its own (SafetensorError)
    if "No space left on device" in str(error):
        return True
    if "write failed" in str(error):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 256 * 1024**2
    return False


@contextlib.contextmanager
def disk_full_is_user_error(folder: Path, doing: str, then: str = "rerun the same command") -> Iterator[None]:
    """A write that fails because the disk is full becomes one line that says so, and what to do."""
    try:
        yield
    except Exception as e:
        if _disk_full(e, folder):
            raise UserError(
                f"no space left on the device of {folder} while {doing}; free some space, then {then}"
            ) from None
        raise
