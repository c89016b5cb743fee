"""`wren hub download` / `wren hub verify` against a stand-in hub: a real HTTP server on a free port
serving the endpoints huggingface_hub (model info, tree listing, resolve) and modelscope (file
listing, file download) call, with `wren` run as a real process pointed at it."""

import hashlib
import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from helpers import wren

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = bytes(range(256)) * 64  # 16 KiB of "safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class File:
    """One file of a stand-in repository: what is served, and what the hub claims it is."""

    def __init__(self, content: bytes, lfs: bool = False, claimed: bytes | None = None) -> None:
        self.content, self.lfs = content, lfs
        self.claimed = content if claimed is None else claimed  # a lying hub advertises other bytes

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": len(self.content), "oid": git_blob_id(self.claimed)}
        if self.lfs:
            entry["oid"] = git_blob_id(b"version https://git-lfs.github.com/spec/v1 ...")  # the pointer's
            entry["lfs"] = {"oid": sha256(self.claimed), "size": len(self.content), "pointerSize": 134}
        return entry

    def sibling(self, path: str) -> dict:
        entry = self.tree_entry(path)
        sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if self.lfs:
            sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
        return sibling


def tiny_repo(**changes: File) -> dict[str, File]:
    files = {
        "config.json": File(b'{"model_type": "llama"}\n'),
        "tokenizer/tokenizer.json": File(b'{"version": "1.0"}\n'),
        "README.md": File(b"# tiny\n"),
        "model.safetensors": File(WEIGHTS, lfs=True),
        "pytorch_model.bin": File(b"pickle" * 100, lfs=True),
    }
    files.update({name.replace("__", "/"): file for name, file in changes.items()})
    return files


REPOS = {
    "wren-test/tiny": tiny_repo(),
    # Same sizes, other bytes: only a hash can tell.
    "wren-test/tampered": tiny_repo(
        **{
            "model.safetensors": File(WEIGHTS[::-1], lfs=True, claimed=WEIGHTS),
            "config.json": File(b'{"model_type": "gpt2!"}\n', claimed=b'{"model_type": "llama"}\n'),
        }
    ),
}


class StandInHub(BaseHTTPRequestHandler):
    requests: list[str] = []  # noqa: RUF012 (shared by the handler instances on purpose)

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def not_found(self, code: str) -> None:
        self.send_json({"error": f"{code}: {self.path}"}, 404, {"X-Error-Code": code})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        type(self).requests.append(f"{self.command} {path}")
        for repo_id, files in REPOS.items():
            if path.startswith(f"/api/v1/models/{repo_id}/"):  # ModelScope
                return self.modelscope(path.removeprefix(f"/api/v1/models/{repo_id}/"), query, files)
            if path == f"/api/models/{repo_id}" or path.startswith(f"/api/models/{repo_id}/"):
                rest = path.removeprefix(f"/api/models/{repo_id}").removeprefix("/") or "revision/main"
                return self.hf_api(rest, repo_id, files)
            if path.startswith(f"/{repo_id}/resolve/"):
                revision, _, name = path.removeprefix(f"/{repo_id}/resolve/").partition("/")
                return self.hf_resolve(revision, name, files)
        self.not_found("RepoNotFound")

    def hf_api(self, rest: str, repo_id: str, files: dict[str, File]) -> None:
        if rest in ("revision/main", f"revision/{COMMIT}"):
            siblings = [file.sibling(name) for name, file in files.items()]
            return self.send_json({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings})
        if rest == f"tree/{COMMIT}":
            return self.send_json([file.tree_entry(name) for name, file in files.items()])
        self.not_found("RevisionNotFound")

    def hf_resolve(self, revision: str, name: str, files: dict[str, File]) -> None:
        if revision not in (COMMIT, "main"):
            return self.not_found("RevisionNotFound")
        if name not in files:
            return self.not_found("EntryNotFound")
        file = files[name]
        entry = file.tree_entry(name)
        etag = entry["lfs"]["oid"] if file.lfs else entry["oid"]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        if file.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(file.content))})
        self.send(200, file.content, headers)

    def modelscope(self, rest: str, query: dict, files: dict[str, File]) -> None:
        if rest == "repo/files":
            listing = [
                {"Path": name, "Name": name.rsplit("/", 1)[-1], "Type": "blob", "Size": len(file.content),
                 "Sha256": sha256(file.claimed)}
                for name, file in files.items()
            ]  # fmt: skip
            return self.send_json({"Code": 200, "Success": True, "Data": {"Files": listing}})
        name = query.get("FilePath", [""])[0]
        if rest == "repo" and name in files:
            return self.send(200, files[name].content, {"Content-Type": "application/octet-stream"})
        self.send_json({"Code": 404, "Success": False, "Message": "not found"}, 404)


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(hub, tmp_path):
    """The environment of a `wren` process that can reach only the stand-in hub."""
    values = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "HF_TOKEN"}
    values.update(
        HF_ENDPOINT=hub,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        MODELSCOPE_ENDPOINT=hub,
        MODELSCOPE_CACHE=str(tmp_path / "modelscope-cache"),
        MODELSCOPE_DOWNLOAD_MAX_RETRIES="0",  # a tampered file fails at once instead of after backoffs
        NO_PROXY="127.0.0.1,localhost",
    )
    StandInHub.requests.clear()
    return values


def hub_wren(env, *args):
    return wren("hub", *args, env=env, timeout=120)


def test_download_selected_files_checks_them_and_writes_sha256sums(tmp_path, env):
    out = tmp_path / "tiny"
    args = ["--include", "*.safetensors", "--include", "*.json", "--revision", "main"]
    result = hub_wren(env, "download", "wren-test/tiny", "--out", out, *args)
    assert result.returncode == 0, result.stderr
    assert "3 files of wren-test/tiny@" + COMMIT in result.stdout
    assert "3 checked against the hub's hashes" in result.stdout

    files = REPOS["wren-test/tiny"]
    wanted = ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    for name in wanted:
        assert (out / name).read_bytes() == files[name].content
    assert not (out / "pytorch_model.bin").exists() and not (out / "README.md").exists()
    assert not any("pytorch_model.bin" in r for r in StandInHub.requests)  # never fetched, not just removed
    # The files come from the commit "main" resolved to, not from whatever "main" is later.
    resolves = [r for r in StandInHub.requests if "/resolve/" in r]
    assert resolves and all(f"/resolve/{COMMIT}/" in r for r in resolves)

    sums = (out / "SHA256SUMS").read_text()
    assert sums == "".join(f"{sha256(files[name].content)}  {name}\n" for name in wanted)
    if shutil.which("sha256sum"):  # the coreutils tool agrees with the manifest
        subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=out, check=True)

    result = hub_wren(env, "verify", out)
    assert result.returncode == 0, result.stdout
    assert "3 of 3 listed files checked: all match" in result.stdout


def test_verify_names_corrupted_missing_and_unlisted_files(tmp_path, env):
    out = tmp_path / "tiny"
    result = hub_wren(env, "download", "wren-test/tiny", "--out", out, "--exclude", "*.bin")
    assert result.returncode == 0, result.stderr

    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[1000] ^= 0x01  # one flipped bit
    (out / "model.safetensors").write_bytes(bytes(weights))
    (out / "config.json").unlink()
    (out / "notes.txt").write_text("added later\n")

    result = hub_wren(env, "verify", out)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"{out / 'model.safetensors'}: checksum mismatch" in lines
    assert any(line.startswith(f"{out / 'config.json'}: missing") for line in lines)
    assert any(line.startswith(f"{out / 'notes.txt'}: not listed") for line in lines)
    assert not any("README.md" in line or "tokenizer.json" in line for line in lines)  # those are intact

    # A manifest kept elsewhere, and --strict counting unlisted files as problems.
    (out / "model.safetensors").write_bytes(REPOS["wren-test/tiny"]["model.safetensors"].content)
    (out / "config.json").write_bytes(REPOS["wren-test/tiny"]["config.json"].content)
    elsewhere = tmp_path / "tiny.sums"
    shutil.move(out / "SHA256SUMS", elsewhere)
    assert hub_wren(env, "verify", out, "--sums", elsewhere).returncode == 0
    assert hub_wren(env, "verify", out, "--sums", elsewhere, "--strict").returncode == 1
    elsewhere.write_text("not a checksum line\n")
    result = hub_wren(env, "verify", out, "--sums", elsewhere)
    assert result.returncode == 2 and f"{elsewhere}:1: expected 'SHA256  path'" in result.stderr


def test_download_fails_when_a_file_does_not_match_its_published_hash(tmp_path, env):
    out = tmp_path / "tampered"
    result = hub_wren(env, "download", "wren-test/tampered", "--out", out, "--include", "*.safetensors",
                      "--include", "*.json")  # fmt: skip
    assert result.returncode == 2, result.stdout
    error = result.stderr
    assert (
        f"{out / 'model.safetensors'}: sha256 is {sha256(WEIGHTS[::-1])}, the hub lists {sha256(WEIGHTS)}"
        in error
    )
    assert f"{out / 'config.json'}: git blob id is" in error  # a plain git file, checked by its blob id
    assert "tokenizer.json" not in error and "Traceback" not in error
    # Nothing corrupt is left to be mistaken for a finished download, and no manifest vouches for it.
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert not (out / "SHA256SUMS").exists()


def test_unknown_repo_and_revision_are_one_line_errors(tmp_path, env):
    result = hub_wren(env, "download", "wren-test/absent", "--out", tmp_path / "x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "wren-test/absent: Hugging Face Hub download failed (no such repository on http://127.0.0.1:" in (
        result.stderr
    )
    result = hub_wren(env, "download", "wren-test/tiny", "--out", tmp_path / "x", "--revision", "nope")
    assert result.returncode == 2 and "no revision 'nope'" in result.stderr
    result = hub_wren(env, "download", "wren-test/tiny", "--out", tmp_path / "x", "--include", "*.gguf")
    assert result.returncode == 2 and "no files match --include ['*.gguf']" in result.stderr


def test_modelscope_source(tmp_path, env):
    pytest.importorskip("modelscope")
    out = tmp_path / "ms"
    result = hub_wren(env, "download", "wren-test/tiny", "--source", "modelscope", "--out", out,
                      "--include", "*.safetensors", "--include", "*.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "3 checked against the hub's hashes" in result.stdout
    assert any(r.startswith("GET /api/v1/models/wren-test/tiny/repo") for r in StandInHub.requests)
    files = REPOS["wren-test/tiny"]
    names = ["config.json", "model.safetensors", "tokenizer/tokenizer.json"]
    expected = "".join(f"{sha256(files[n].content)}  {n}\n" for n in names)
    assert (out / "SHA256SUMS").read_text() == expected
    assert hub_wren(env, "verify", out).returncode == 0

    bad = tmp_path / "bad"
    result = hub_wren(env, "download", "wren-test/tampered", "--source", "modelscope", "--out", bad,
                      "--include", "*.safetensors")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{bad / 'model.safetensors'}: " in result.stderr and "mismatch" in result.stderr.lower()
    assert not (bad / "SHA256SUMS").exists() and not (bad / "model.safetensors").exists()
