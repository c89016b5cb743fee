"""SHA256SUMS manifests: write them, and check a directory against one (`wren hub verify`).

The format is `sha256sum`'s: one `HASH  relative/path` line per file, sorted by path, so
`sha256sum -c SHA256SUMS` run inside the directory checks the same thing. Standard library only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from wren.atomic import atomic_write_text
from wren.errors import WrenError

SUMS_NAME = "SHA256SUMS"
# Bookkeeping huggingface_hub keeps inside a download directory; it is not part of the model.
SKIPPED_DIRS = (".cache",)
_LINE = re.compile(r"(?P<hash>[0-9a-fA-F]{64}) [ *](?P<path>.+)")
_CHUNK = 1 << 20


@dataclass
class FileDigest:
    sha256: str
    git_sha1: str  # the git blob id: what the hub reports for files not stored in LFS
    size: int


def hash_file(path: Path) -> FileDigest:
    """sha256 and git blob sha1 of a file, in one read."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            git.update(chunk)
    return FileDigest(sha256.hexdigest(), git.hexdigest(), size)


def list_files(directory: Path, sums_file: Path | None = None) -> list[str]:
    """Every regular file under `directory` as a relative POSIX path, sorted; the manifest itself and
    hub bookkeeping (.cache/) left out."""
    skip = {(sums_file or directory / SUMS_NAME).resolve()}
    files = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if relative.parts[0] in SKIPPED_DIRS or not path.is_file() or path.resolve() in skip:
            continue
        files.append(relative.as_posix())
    return sorted(files)


def write_sums(directory: Path, sha256_by_path: dict[str, str], sums_file: Path | None = None) -> Path:
    """Write the manifest (atomically) and return its path."""
    sums_file = sums_file or directory / SUMS_NAME
    for name in sha256_by_path:
        if "\n" in name or "\\" in name:
            raise WrenError(f"{directory / name}: a file name with a newline or backslash cannot be listed")
    lines = [f"{sha256_by_path[name]}  {name}\n" for name in sorted(sha256_by_path)]
    atomic_write_text(sums_file, "".join(lines))
    return sums_file


def read_sums(sums_file: Path) -> dict[str, str]:
    """relative path -> sha256 from a sha256sum-format file; errors name the file and line."""
    try:
        text = sums_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WrenError(f"{sums_file}: no such file; expected a SHA256SUMS manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WrenError(f"{sums_file}: cannot read ({exc})") from exc
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise WrenError(
                f"{sums_file}:{number}: expected 'SHA256  path' (sha256sum format), got {line[:80]!r}"
            )
        path = match["path"]
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise WrenError(f"{sums_file}:{number}: {path!r} is not a path inside the directory")
        sums[path] = match["hash"].lower()
    return sums


@dataclass
class VerifyReport:
    directory: Path
    sums_file: Path
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)

    def ok(self, strict: bool = False) -> bool:
        return not self.mismatched and not self.missing and not (strict and self.unlisted)


def verify_directory(directory: str | Path, sums_file: str | Path | None = None) -> VerifyReport:
    """Re-hash every file the manifest lists; note those that differ, are missing, or are not listed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WrenError(f"{directory}: not a directory")
    sums_path = Path(sums_file) if sums_file is not None else directory / SUMS_NAME
    expected = read_sums(sums_path)
    report = VerifyReport(directory, sums_path)
    for name, sha256 in sorted(expected.items()):
        path = directory / name
        if not path.is_file():
            report.missing.append(name)
            continue
        report.checked += 1
        if hash_file(path).sha256 != sha256:
            report.mismatched.append(name)
    report.unlisted = [name for name in list_files(directory, sums_path) if name not in expected]
    return report


def format_verify_report(report: VerifyReport, strict: bool = False) -> str:
    lines = [f"{report.directory / name}: checksum mismatch" for name in report.mismatched]
    lines += [f"{report.directory / name}: missing (listed in {report.sums_file})" for name in report.missing]
    lines += [f"{report.directory / name}: not listed in {report.sums_file}" for name in report.unlisted]
    problems = len(report.mismatched) + len(report.missing) + (len(report.unlisted) if strict else 0)
    summary = f"{report.checked} of {report.checked + len(report.missing)} listed files checked"
    if problems:
        lines.append(f"{summary}: {problems} problem{'s' if problems != 1 else ''}")
    else:
        extra = f" ({len(report.unlisted)} unlisted)" if report.unlisted else ""
        lines.append(f"{summary}: all match{extra}")
    return "\n".join(lines)
