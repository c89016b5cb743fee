"""`wren hub download`: a model repository from the Hugging Face Hub or ModelScope into a directory,
every file checked against the hash the hub publishes for it, then a SHA256SUMS manifest written.

The hub's hashes: for a file stored in LFS (weights, mostly) the sha256 of its content; for a plain
git file its git blob id (a sha1 over "blob SIZE\\0" + content). Both are checked, so every file the
Hugging Face Hub lists is verified, not only the large ones. A file that does not match is deleted
(so a re-run fetches it again) and the download fails naming it. The manifest is written only when
everything matched, and only lists the files this download selected.

huggingface_hub (`pip install 'wrenlm[hub]'`) and modelscope are imported only when used.
"""

from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from pathlib import Path

from wren.errors import WrenError
from wren.interop.checksums import SUMS_NAME, hash_file, write_sums

SOURCES = ("hf", "modelscope")


@dataclass
class Expected:
    """What the hub says one file is; None where it says nothing."""

    sha256: str | None = None
    git_sha1: str | None = None
    size: int | None = None


@dataclass
class DownloadResult:
    out_dir: Path
    source: str
    repo_id: str
    revision: str
    files: list[str]
    verified: int  # files checked against a hash the hub published
    sums_file: Path


def download(
    repo_id: str,
    out_dir: str | Path,
    source: str = "hf",
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> DownloadResult:
    """Download the files of `repo_id` matching `include` (all if None) and not `exclude` into
    `out_dir`, check them against the hub's hashes and write `out_dir/SHA256SUMS`."""
    out_dir = Path(out_dir)
    if source == "hf":
        resolved, expected = _download_hf(repo_id, out_dir, revision, include, exclude)
    elif source == "modelscope":
        resolved, expected = _download_modelscope(repo_id, out_dir, revision, include, exclude)
    else:
        raise WrenError(f"unknown hub source {source!r}; expected one of {', '.join(SOURCES)}")
    sums, verified = check_downloads(out_dir, expected)
    sums.pop(SUMS_NAME, None)  # a repository's own SHA256SUMS is replaced by ours, which cannot list itself
    sums_file = write_sums(out_dir, sums)
    return DownloadResult(out_dir, source, repo_id, resolved, sorted(sums), verified, sums_file)


def check_downloads(out_dir: Path, expected: dict[str, Expected]) -> tuple[dict[str, str], int]:
    """sha256 of every expected file and how many matched a published hash; a WrenError naming each
    missing or mismatched file otherwise (mismatched ones are deleted)."""
    sums: dict[str, str] = {}
    problems: list[str] = []
    verified = 0
    for name in sorted(expected):
        path, want = out_dir / name, expected[name]
        if not path.is_file():
            problems.append(f"{path}: listed by the hub but not downloaded")
            continue
        digest = hash_file(path)
        if want.sha256 is not None and digest.sha256 != want.sha256.lower():
            problem = f"sha256 is {digest.sha256}, the hub lists {want.sha256.lower()}"
        elif want.sha256 is None and want.git_sha1 is not None and digest.git_sha1 != want.git_sha1:
            problem = f"git blob id is {digest.git_sha1}, the hub lists {want.git_sha1}"
        elif want.size is not None and digest.size != want.size:
            problem = f"{digest.size} bytes, the hub lists {want.size}"
        else:
            sums[name] = digest.sha256
            verified += want.sha256 is not None or want.git_sha1 is not None
            continue
        path.unlink()  # never leave a corrupt file where a later run would take it as downloaded
        problems.append(f"{path}: {problem} (deleted; download again)")
    if problems:
        raise WrenError("download check failed: " + "; ".join(problems))
    return sums, verified


def _no_files(repo_id: str, include: list[str] | None, exclude: list[str] | None) -> WrenError:
    return WrenError(
        f"{repo_id}: no files match --include {include or ['*']}"
        + (f" --exclude {exclude}" if exclude else "")
    )


def _download_hf(
    repo_id: str, out_dir: Path, revision: str | None, include: list[str] | None, exclude: list[str] | None
) -> tuple[str, dict[str, Expected]]:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.utils import filter_repo_objects
    except ImportError as exc:
        raise WrenError("--source hf needs huggingface_hub: pip install 'wrenlm[hub]'") from exc
    errors = _hf_errors()
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        siblings = {s.rfilename: s for s in info.siblings or []}
        names = list(filter_repo_objects(list(siblings), allow_patterns=include, ignore_patterns=exclude))
        if not names:
            raise _no_files(repo_id, include, exclude)
        commit = info.sha or revision or "main"
        # Download the very commit whose hashes we hold, not whatever the branch points to by then.
        snapshot_download(
            repo_id, revision=commit, allow_patterns=include, ignore_patterns=exclude, local_dir=out_dir
        )
    except errors as exc:
        raise WrenError(
            f"{repo_id}: Hugging Face Hub download failed ({_describe_hf_error(exc, revision)})"
        ) from exc
    expected = {}
    for name in names:
        sibling = siblings[name]
        if sibling.lfs is not None:
            expected[name] = Expected(sha256=sibling.lfs.sha256, size=sibling.lfs.size)
        else:
            expected[name] = Expected(git_sha1=sibling.blob_id, size=sibling.size)
    return commit, expected


def _describe_hf_error(exc: BaseException, revision: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return f"no revision {revision!r}: expected a branch, tag or commit of the repository"
    if isinstance(exc, RepositoryNotFoundError):
        return f"no such repository on {constants.ENDPOINT}; a private or gated one needs a token in HF_TOKEN"
    return _first_line(exc)


def _hf_errors() -> tuple[type[BaseException], ...]:
    """The exceptions huggingface_hub lets out for an unreachable hub, a missing repo or revision,
    or a bad repo id; its HTTP library differs between versions, so collect what is installed."""
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError

    found: list[type[BaseException]] = [HfHubHTTPError, HFValidationError, OSError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(__import__(module), name))
    return tuple(found)


def _download_modelscope(
    repo_id: str, out_dir: Path, revision: str | None, include: list[str] | None, exclude: list[str] | None
) -> tuple[str, dict[str, Expected]]:
    try:  # modelscope >= 1.38 is a shell around modelscope_hub, which downloads without importing torch
        from modelscope_hub.compat.snapshot_download import snapshot_download
    except ImportError:
        try:
            from modelscope import snapshot_download
        except ImportError as exc:
            raise WrenError("--source modelscope needs modelscope: pip install 'wrenlm[modelscope]'") from exc
    revision = revision or "master"  # list and download the same branch, whatever the library's default
    try:
        listing = _modelscope_files(repo_id, revision)
        names = [
            name
            for name in sorted(listing)
            if (include is None or any(fnmatch.fnmatch(name, p) for p in include))
            and not any(fnmatch.fnmatch(name, p) for p in exclude or [])
        ]
        if not names:
            raise _no_files(repo_id, include, exclude)
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=include,
            ignore_patterns=exclude,
            local_dir=str(out_dir),
        )
    except WrenError:
        raise
    except Exception as exc:  # modelscope's error classes moved between releases; report any as one line
        # modelscope checks sha256s itself; its error lists the files that failed and why.
        failed = getattr(exc, "failed_files", None) or {}
        detail = "; ".join(
            f"{out_dir / name}: {_first_line(error)}" for name, error in sorted(failed.items())
        )
        raise WrenError(f"{repo_id}: ModelScope download failed ({detail or _first_line(exc)})") from exc
    return revision, {name: listing[name] for name in names}


def _modelscope_files(repo_id: str, revision: str) -> dict[str, Expected]:
    """path -> Expected for every file of a ModelScope model repo (ModelScope publishes sha256s)."""
    try:  # modelscope_hub's listing keeps the sha256 (modelscope >= 1.38's compat layer drops it)
        from modelscope_hub import HubApi

        files = HubApi().list_repo_files(repo_id, "model", revision=revision)
        return {f.path: Expected(sha256=f.sha256, size=f.size) for f in files if f.type != "tree"}
    except ImportError:
        from modelscope.hub.api import HubApi as LegacyHubApi

        rows = LegacyHubApi().get_model_files(repo_id, revision=revision, recursive=True)
        return {
            row["Path"]: Expected(sha256=row.get("Sha256") or None, size=row.get("Size"))
            for row in rows
            if row.get("Type", "blob") != "tree"
        }


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
