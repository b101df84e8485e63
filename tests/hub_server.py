"""A small in-memory Hugging Face Hub look-alike for tests (standard library only).

Why it exists: the tests publish and load per-width model weights through the *real*
``huggingface_hub`` client and timm's ``hf-hub:`` loader, but no Hub is reachable from the test
machines and no package ships a local Hub that accepts uploads.  This server speaks just enough of
the Hub's HTTP protocol (as used by huggingface_hub 2.4 with ``HF_HUB_DISABLE_XET=1``) for
``create_repo``, ``create_commit`` / ``upload_folder`` (regular and LFS files), ``hf_hub_download``,
``snapshot_download``, ``model_info``, ``list_repo_files``/``list_repo_tree``, ``list_repo_commits``,
``list_repo_refs`` and timm's ``push_to_hf_hub`` / ``create_model("hf-hub:...")`` to run end to end
over real HTTP on 127.0.0.1.

Typical use in a test::

    with HubServer(token="hf_test_token") as hub:
        restore = configure_hub_env(hub.url, tmp_path / "hf-home", token=hub.token)
        try:
            ...  # HfApi(), hf_hub_download(), timm.create_model("hf-hub:user/repo", pretrained=True)
        finally:
            restore()

Model of the Hub kept here (deliberately small):

* Only model repos.  Every repo has a linear history; the only branch is ``main``, which points at
  the newest commit.  Each commit is a full snapshot ``{path: bytes}``.  A revision is ``main`` or a
  full 40-hex commit sha.  Like the real Hub, a new repo starts with an "initial commit" holding the
  default ``.gitattributes``.
* A commit lands atomically: it is validated completely (referenced LFS objects present, deleted
  paths present, ``parentCommit`` still the head) before the branch moves, so a failing commit
  leaves the repo exactly as it was.
* Upload mode (``preupload``): LFS for paths tracked by ``filter=lfs`` in the revision's
  ``.gitattributes`` (``*.safetensors``, ``*.bin``, ``*.pt``, ... by default), for files of 10 MiB
  or more and for binary-looking files (a NUL byte in the 512-byte sample, e.g. PNG); regular
  otherwise.
* Auth: one token.  Writes and ``whoami`` need ``Authorization: Bearer <token>``; a request carrying
  any other bearer token is answered 401 "Invalid credentials in Authorization header".  Public
  repos are readable without a token; private repos answer ``RepoNotFound`` (401 without a token,
  404 with one for missing repos) exactly as the real Hub hides them.
* ``/api/validate-yaml`` accepts every README (no YAML parser in the standard library).

Fault injection: set ``hub.fail_next_commits = n`` to make the next ``n`` calls to the commit
endpoint fail *after* their LFS uploads have landed (a server dying in the middle of a publish).
``hub.fail_mode`` picks how: ``"disconnect"`` (default) closes the connection without an answer,
so the client raises ``httpx2.RemoteProtocolError``; ``"error"`` answers HTTP 500, so the client
raises ``HfHubHTTPError``.  The commit call is not retried by huggingface_hub, so neither costs a
back-off delay.  ``hub.tamper_downloads[path] = fn`` serves ``fn(stored bytes)`` for downloads of
``path`` (a corrupted or truncated file; sizes consistent, ETag / LFS oid still the stored file's):
what a client catches only by checking the sha256 it was promised.

Run as a script (``python tests/hub_server.py --port 0``) it prints its URL on the first line of
stdout and serves until killed, which is handy for subprocess tests (e.g. with ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fnmatch
import hashlib
import importlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ['HubServer', 'configure_hub_env']

HOST = '127.0.0.1'
DEFAULT_TOKEN = 'hf_test_token'
DEFAULT_USERNAME = 'user'

# Files of this size or more are stored with LFS whatever their name (the real Hub uses 10 MB).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# Largest request body accepted; everything is held in memory.
MAX_BODY_BYTES = 1 << 30
# Bounds for the chunked-transfer decoder (lines, chunks and trailer lines per request).
_MAX_LINE_BYTES = 64 * 1024
_MAX_CHUNKS = 1 << 20
_MAX_TRAILER_LINES = 128
# Idle keep-alive connections are closed after this many seconds.
_IDLE_TIMEOUT_S = 60
# How often the accept loop checks for stop().
_POLL_INTERVAL_S = 0.02

_SHA256_RE = re.compile(r'[0-9a-f]{64}')
_COMMIT_SHA_RE = re.compile(r'[0-9a-f]{40}')
_REPO_NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,95}')

# The .gitattributes the real Hub puts in the initial commit of a new model repo.
_DEFAULT_LFS_PATTERNS = (
    '*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz'
    ' *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar'
    ' *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*'
).split()
DEFAULT_GITATTRIBUTES = ''.join(
    f'{p} filter=lfs diff=lfs merge=lfs -text\n' for p in _DEFAULT_LFS_PATTERNS
).encode()

FailMode = Literal['disconnect', 'error']


def _now() -> str:
    """Timestamp in the one format huggingface_hub's ``parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'


def _git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob: what the Hub reports as ``oid``/ETag for regular files."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Blob:
    """One file version. Hashes are computed once because every HEAD/tree call reports them."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str  # for LFS files: git id of the pointer file, as on the real Hub
    pointer_size: int

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> _Blob:
        sha256 = hashlib.sha256(data).hexdigest()
        if not lfs:
            return cls(data, False, sha256, _git_blob_sha1(data), 0)
        pointer = (
            f'version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n'.encode()
        )
        return cls(data, True, sha256, _git_blob_sha1(pointer), len(pointer))

    @property
    def etag(self) -> str:
        """What the client uses as cache key: sha256 for LFS files, git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class _Commit:
    sha: str
    title: str
    message: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    history: list[_Commit]  # oldest first; ``main`` is the last one
    lfs_objects: dict[str, bytes]  # sha256 -> content, uploaded through the LFS batch API
    announced_uploads: set[str]  # sha256 of objects the batch API granted an upload, awaiting their PUT

    @property
    def head(self) -> _Commit:
        return self.history[-1]

    def resolve(self, revision: str) -> _Commit | None:
        """``main`` or a full commit sha; anything else is unknown to this server."""
        if revision == 'main':
            return self.head
        if _COMMIT_SHA_RE.fullmatch(revision):
            for commit in self.history:
                if commit.sha == revision:
                    return commit
        return None


class _HttpError(Exception):
    """An error answer; ``code`` becomes ``X-Error-Code``, which the client maps to its exceptions."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _Disconnect(Exception):
    """Raised to close the connection without answering (fault injection)."""


def _new_commit(files: dict[str, _Blob], title: str, message: str) -> _Commit:
    return _Commit(secrets.token_hex(20), title, message, _now(), files)


def _lfs_tracked(path: str, gitattributes: bytes) -> bool:
    """Whether ``.gitattributes`` sets ``filter=lfs`` on ``path`` (last matching line wins, as in git)."""
    tracked = False
    basename = path.rsplit('/', 1)[-1]
    for line in gitattributes.decode('utf-8', 'replace').splitlines():
        fields = line.split()
        if not fields or fields[0].startswith('#'):
            continue
        pattern, attributes = fields[0], fields[1:]
        if '/' in pattern.strip('/'):
            matched = fnmatch.fnmatchcase(path, pattern.lstrip('/').replace('**/', '*'))
        else:
            matched = fnmatch.fnmatchcase(basename, pattern.strip('/'))
        if matched and 'filter=lfs' in attributes:
            tracked = True
        elif matched and ('-filter' in attributes or '!filter' in attributes):
            tracked = False
    return tracked


def _check_repo_path(path: object) -> str:
    """Reject paths that would escape the repo or are not strings, as the Hub does."""
    if not isinstance(path, str) or not path or path.startswith('/') or '..' in path.split('/'):
        raise _HttpError(400, f'Invalid path in repo: {path!r}')
    return path


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single ``bytes=`` range into ``[start, end)``; ``None`` means "ignore it, send all".

    Malformed or multi-range headers are ignored (RFC 9110 allows that); a well-formed range that
    does not overlap the file is answered 416.
    """
    unit, _, spec = header.partition('=')
    if unit.strip().lower() != 'bytes' or ',' in spec:
        return None
    first, _, last = spec.strip().partition('-')
    try:
        if first == '':
            start, end = max(size - int(last), 0), size
            if int(last) == 0:
                start = size
        else:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        raise _HttpError(416, 'Requested range not satisfiable', headers={'Content-Range': f'bytes */{size}'})
    return start, end


class _Store:
    """All repos, guarded by one lock so that every request sees a consistent state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, _Repo] = {}

    def create_repo(self, repo_id: str, private: bool) -> bool:
        """Create the repo with the real Hub's initial commit; False if it already exists."""
        with self.lock:
            if repo_id in self.repos:
                return False
            initial = _new_commit(
                {'.gitattributes': _Blob.make(DEFAULT_GITATTRIBUTES, lfs=False)}, 'initial commit', ''
            )
            self.repos[repo_id] = _Repo(repo_id, private, _now(), [initial], {}, set())
            return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    """Parses HTTP and routes to the Hub endpoints; all state lives in ``self.server.hub``."""

    protocol_version = 'HTTP/1.1'  # keep-alive, as the client's connection pool expects
    timeout = _IDLE_TIMEOUT_S
    server: _Server

    # -- plumbing ---------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.hub._track_connection(self.connection, add=True)

    def finish(self) -> None:
        self.server.hub._track_connection(self.connection, add=False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            sys.stderr.write(f'hub_server: {self.address_string()} {format % args}\n')

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        hub._record(self.command, split.path)
        try:
            body = self._read_body()
            self._route(split.path, parse_qs(split.query), body)
        except _Disconnect:
            self.close_connection = True
        except _HttpError as error:
            # Header values must be one line of latin-1; messages may quote paths from the request.
            one_line = ' '.join(error.message.split()).encode('ascii', 'backslashreplace').decode()
            headers = {'X-Error-Message': one_line, **error.headers}
            if error.code is not None:
                headers['X-Error-Code'] = error.code
            self._send_json(error.status, {'error': error.message}, headers)
        except OSError:  # the client went away or stalled: nobody to answer
            self.close_connection = True
        except Exception as error:  # a bug here must reach the test as an answer, not a hang
            traceback.print_exc()
            self._send_json(500, {'error': f'hub_server internal error: {error!r}'})

    def _read_body(self) -> bytes:
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            return self._read_chunked()
        try:
            length = int(self.headers.get('Content-Length') or 0)
        except ValueError:
            self.close_connection = True
            raise _HttpError(400, 'Invalid Content-Length') from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _HttpError(413, 'Request body too large')
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        """Decode ``Transfer-Encoding: chunked``; streamed uploads of unknown length use it."""
        self.close_connection = True  # until the body is fully consumed, the stream can't be reused
        parts: list[bytes] = []
        total = 0
        for _ in range(_MAX_CHUNKS):
            line = self.rfile.readline(_MAX_LINE_BYTES)
            try:
                size = int(line.split(b';', 1)[0].strip(), 16)
            except ValueError:
                raise _HttpError(400, 'Malformed chunked body') from None
            if size == 0:
                for _ in range(_MAX_TRAILER_LINES):
                    if self.rfile.readline(_MAX_LINE_BYTES) in (b'\r\n', b'\n', b''):
                        self.close_connection = False
                        return b''.join(parts)
                raise _HttpError(400, 'Too many trailer lines in chunked body')
            total += size
            if total > MAX_BODY_BYTES:
                raise _HttpError(413, 'Request body too large')
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                raise _HttpError(400, 'Truncated chunked body')
            parts.append(chunk)
            self.rfile.readline(_MAX_LINE_BYTES)  # CRLF closing the chunk
        raise _HttpError(413, 'Too many chunks')

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _send_json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), 'application/json; charset=utf-8', headers)

    def _json_body(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b'{}')
        except ValueError:
            raise _HttpError(400, 'Request body is not valid JSON') from None
        if not isinstance(payload, dict):
            raise _HttpError(400, 'Request body must be a JSON object')
        return payload

    # -- auth and lookups -------------------------------------------------------------------------

    def _authenticated(self) -> bool:
        """True with the server's token, False without any; any other token is rejected outright."""
        header = self.headers.get('Authorization')
        if header is None:
            return False
        scheme, _, token = header.partition(' ')
        if scheme.lower() == 'bearer' and secrets.compare_digest(token.strip(), self.server.hub.token):
            return True
        raise _HttpError(401, 'Invalid credentials in Authorization header')

    def _require_auth(self) -> None:
        if not self._authenticated():
            raise _HttpError(401, 'You must be authenticated to access this resource. Pass a token.')

    def _repo(self, namespace: str, name: str, check_access: bool = True) -> _Repo:
        """Look up a repo the caller may read; hidden repos look missing, as on the real Hub.

        ``check_access=False`` is for the LFS upload URL, which (like a presigned URL) carries no token.
        """
        authenticated = check_access and self._authenticated()
        repo = self.server.hub._store.repos.get(f'{unquote(namespace)}/{unquote(name)}')
        if repo is None or (check_access and repo.private and not authenticated):
            raise _HttpError(404 if authenticated else 401, 'Repository not found', code='RepoNotFound')
        return repo

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise _HttpError(404, f'Invalid rev id: {unquote(revision)}', code='RevisionNotFound')
        return commit

    # -- routing ----------------------------------------------------------------------------------

    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        """Match the raw path segment by segment: revisions and paths arrive percent-encoded."""
        method = self.command
        seg = path.split('/')[1:]
        if seg[:1] == ['api']:
            if method == 'GET' and seg == ['api', 'whoami-v2']:
                self._require_auth()
                return self._send_json(200, self._whoami())
            if method == 'GET' and seg == ['api', 'agent-harnesses']:
                return self._send_json(200, {'standardEnvVars': [], 'harnesses': {}})
            if method == 'POST' and seg == ['api', 'repos', 'create']:
                return self._create_repo(self._json_body(body))
            if method == 'POST' and seg == ['api', 'validate-yaml']:
                return self._send_json(200, {'errors': [], 'warnings': []})
            if len(seg) >= 4 and seg[1] == 'models':
                return self._route_model_api(method, seg[2], seg[3], seg[4:], query, body)
        elif method == 'PUT' and len(seg) == 4 and seg[0] == '_lfs':
            return self._lfs_put(self._repo(seg[1], seg[2], check_access=False), seg[3], body)
        elif (
            method == 'POST'
            and len(seg) == 6
            and seg[1].endswith('.git')
            and seg[2:] == ['info', 'lfs', 'objects', 'batch']
        ):
            self._require_auth()
            return self._lfs_batch(self._repo(seg[0], seg[1][: -len('.git')]), self._json_body(body))
        elif method in ('GET', 'HEAD') and len(seg) >= 5 and seg[2] == 'resolve':
            return self._resolve(self._repo(seg[0], seg[1]), seg[3], unquote('/'.join(seg[4:])))
        raise _HttpError(404, f'Not found: {method} {path}')

    def _route_model_api(
        self,
        method: str,
        namespace: str,
        name: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: bytes,
    ) -> None:
        repo = self._repo(namespace, name)
        if method == 'GET' and not rest:
            return self._model_info(repo, repo.head, query)
        if method == 'GET' and len(rest) == 2 and rest[0] == 'revision':
            return self._model_info(repo, self._commit(repo, rest[1]), query)
        if method == 'GET' and len(rest) >= 2 and rest[0] == 'tree':
            return self._tree(self._commit(repo, rest[1]), unquote('/'.join(rest[2:])), query)
        if method == 'GET' and len(rest) == 2 and rest[0] == 'commits':
            return self._commits(repo, self._commit(repo, rest[1]), query)
        if method == 'GET' and rest == ['refs']:
            return self._send_json(
                200,
                {
                    'branches': [{'name': 'main', 'ref': 'refs/heads/main', 'targetCommit': repo.head.sha}],
                    'converts': [],
                    'tags': [],
                    'pullRequests': [],
                },
            )
        if method == 'POST' and len(rest) == 2 and rest[0] == 'preupload':
            self._require_auth()
            return self._preupload(repo, self._branch_head(repo, rest[1]), self._json_body(body))
        if method == 'POST' and len(rest) == 2 and rest[0] == 'commit':
            self._require_auth()
            return self._create_commit(repo, rest[1], query, body)
        raise _HttpError(404, f'Not found: {method} {self.path}')

    def _branch_head(self, repo: _Repo, revision: str) -> _Commit:
        """Writes go to a branch; ``main`` is the only one."""
        if unquote(revision) != 'main':
            raise _HttpError(
                404,
                f"Invalid rev id: {unquote(revision)} (only branch 'main' exists)",
                code='RevisionNotFound',
            )
        return repo.head

    # -- endpoints --------------------------------------------------------------------------------

    def _whoami(self) -> dict[str, Any]:
        return {
            'type': 'user',
            'id': '0' * 24,
            'name': self.server.hub.username,
            'fullname': 'Test User',
            'orgs': [],
            'auth': {
                'type': 'access_token',
                'accessToken': {'displayName': 'hub_server token', 'role': 'write'},
            },
        }

    def _create_repo(self, payload: dict[str, Any]) -> None:
        self._require_auth()
        hub = self.server.hub
        name, organization = payload.get('name'), payload.get('organization') or hub.username
        if payload.get('type', 'model') != 'model':
            raise _HttpError(400, 'hub_server only hosts model repos')
        if not (
            isinstance(name, str)
            and _REPO_NAME_RE.fullmatch(name)
            and isinstance(organization, str)
            and _REPO_NAME_RE.fullmatch(organization)
        ):
            raise _HttpError(400, f'Invalid repo name: {organization}/{name}')
        repo_id = f'{organization}/{name}'
        private = payload.get('visibility') == 'private' or payload.get('private') is True
        url = f'{hub.url}/{repo_id}'
        if not hub._store.create_repo(repo_id, private):
            # huggingface_hub reads `url` from this body when exist_ok=True.
            message = 'You already created this model repo'
            return self._send_json(409, {'error': message, 'url': url}, {'X-Error-Message': message})
        return self._send_json(200, {'url': url, 'name': repo_id, 'id': secrets.token_hex(12)})

    def _model_info(self, repo: _Repo, commit: _Commit, query: dict[str, list[str]]) -> None:
        with_blobs = query.get('blobs', ['false'])[-1].lower() in ('1', 'true')
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {'rfilename': path}
            if with_blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    sibling['lfs'] = {
                        'size': len(blob.data),
                        'sha256': blob.sha256,
                        'pointerSize': blob.pointer_size,
                    }
            siblings.append(sibling)
        namespace = repo.repo_id.split('/', 1)[0]
        self._send_json(
            200,
            {
                '_id': hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                'id': repo.repo_id,
                'modelId': repo.repo_id,
                'author': namespace,
                'sha': commit.sha,
                'lastModified': commit.date,
                'createdAt': repo.created_at,
                'private': repo.private,
                'gated': False,
                'disabled': False,
                'downloads': 0,
                'likes': 0,
                'tags': [],
                'siblings': siblings,
                'usedStorage': sum(len(blob.data) for blob in commit.files.values()),
            },
        )

    def _tree(self, commit: _Commit, folder: str, query: dict[str, list[str]]) -> None:
        recursive = query.get('recursive', ['false'])[-1].lower() in ('1', 'true')
        prefix = f'{folder.strip("/")}/' if folder.strip('/') else ''
        below = {path: blob for path, blob in commit.files.items() if path.startswith(prefix)}
        if prefix and not below:
            raise _HttpError(
                404,
                f'Folder not found: {folder}',
                code='EntryNotFound',
                headers={'X-Repo-Commit': commit.sha},
            )
        folders: set[str] = set()
        entries: list[dict[str, Any]] = []
        for path, blob in sorted(below.items()):
            parts = path[len(prefix) :].split('/')
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            folders.update(prefix + '/'.join(parts[: i + 1]) for i in range(depth))
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {
                    'type': 'file',
                    'oid': blob.git_oid,
                    'size': len(blob.data),
                    'path': path,
                }
                if blob.lfs:
                    entry['lfs'] = {
                        'oid': blob.sha256,
                        'size': len(blob.data),
                        'pointerSize': blob.pointer_size,
                    }
                entries.append(entry)
        for path in sorted(folders):
            listing = '\n'.join(
                f'{p} {b.git_oid}' for p, b in sorted(below.items()) if p.startswith(path + '/')
            )
            entries.append(
                {
                    'type': 'directory',
                    'oid': hashlib.sha1(listing.encode()).hexdigest(),
                    'size': 0,
                    'path': path,
                }
            )
        self._send_json(200, entries)

    def _commits(self, repo: _Repo, commit: _Commit, query: dict[str, list[str]]) -> None:
        formatted = 'formatted' in query.get('expand[]', [])
        index = next(i for i, c in enumerate(repo.history) if c.sha == commit.sha)
        items = []
        for item in reversed(repo.history[: index + 1]):
            entry: dict[str, Any] = {
                'id': item.sha,
                'title': item.title,
                'message': item.message,
                'authors': [{'user': self.server.hub.username}],
                'date': item.date,
            }
            if formatted:
                entry['formatted'] = {'title': item.title, 'message': item.message}
            items.append(entry)
        self._send_json(200, items)

    def _preupload(self, repo: _Repo, head: _Commit, payload: dict[str, Any]) -> None:
        files = payload.get('files')
        if not isinstance(files, list):
            raise _HttpError(400, '`files` must be a list')
        gitattributes = head.files.get('.gitattributes')
        answers = []
        for item in files:
            if not isinstance(item, dict):
                raise _HttpError(400, 'Each file must be an object')
            path = _check_repo_path(item.get('path'))
            try:
                sample = base64.b64decode(item.get('sample', ''), validate=True)
                size = int(item.get('size', 0))
            except (binascii.Error, TypeError, ValueError):
                raise _HttpError(400, f'Invalid sample or size for {path}') from None
            lfs = (
                size >= LFS_SIZE_THRESHOLD
                or b'\0' in sample
                or (gitattributes is not None and _lfs_tracked(path, gitattributes.data))
            )
            answer: dict[str, Any] = {
                'path': path,
                'uploadMode': 'lfs' if lfs else 'regular',
                'shouldIgnore': False,
            }
            existing = head.files.get(path)
            if existing is not None:
                # The client skips unchanged files by comparing this with its sha256 / git sha1.
                answer['oid'] = existing.sha256 if existing.lfs else existing.git_oid
            answers.append(answer)
        self._send_json(200, {'files': answers, 'commitOid': head.sha})

    def _lfs_batch(self, repo: _Repo, payload: dict[str, Any]) -> None:
        """Git LFS batch API, ``basic`` transfer only: one PUT per object to a URL on this server."""
        if payload.get('operation') != 'upload':
            raise _HttpError(400, "hub_server only supports the LFS 'upload' operation")
        objects = payload.get('objects')
        if not isinstance(objects, list):
            raise _HttpError(400, '`objects` must be a list')
        hub = self.server.hub
        answers = []
        with hub._store.lock:
            for obj in objects:
                oid, size = (obj.get('oid'), obj.get('size')) if isinstance(obj, dict) else (None, None)
                if not (
                    isinstance(oid, str) and _SHA256_RE.fullmatch(oid) and isinstance(size, int) and size >= 0
                ):
                    answers.append(
                        {
                            'oid': str(oid),
                            'size': size if isinstance(size, int) else 0,
                            'error': {'code': 422, 'message': 'Invalid oid or size'},
                        }
                    )
                    continue
                answer: dict[str, Any] = {'oid': oid, 'size': size, 'authenticated': True}
                if oid not in repo.lfs_objects:
                    repo.announced_uploads.add(oid)
                    href = f'{hub.url}/_lfs/{repo.repo_id}/{oid}'
                    answer['actions'] = {'upload': {'href': href, 'expires_in': 3600}}
                answers.append(answer)
        payload = {'transfer': 'basic', 'objects': answers, 'hash_algo': 'sha256'}
        self._send(200, json.dumps(payload).encode(), 'application/vnd.git-lfs+json')

    def _lfs_put(self, repo: _Repo, oid: str, body: bytes) -> None:
        """The upload URL handed out by the batch API (like a presigned URL: no token needed)."""
        with self.server.hub._store.lock:
            if oid not in repo.announced_uploads:
                raise _HttpError(403, f'No upload of {oid} was requested through the LFS batch API')
            if hashlib.sha256(body).hexdigest() != oid:  # also catches truncated uploads
                raise _HttpError(400, f'Uploaded content does not match its oid {oid}')
            repo.lfs_objects[oid] = body
            repo.announced_uploads.discard(oid)
        self._send(200, b'', 'text/plain')

    def _create_commit(self, repo: _Repo, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        hub = self.server.hub
        if query.get('create_pr', ['0'])[-1] not in ('0', 'false', ''):
            raise _HttpError(400, 'hub_server does not support pull requests (create_pr)')
        self._branch_head(repo, revision)
        if hub._take_commit_fault():
            if hub.fail_mode == 'disconnect':
                raise _Disconnect
            raise _HttpError(500, 'Internal Error - simulated failure (hub.fail_next_commits)')
        lines = [line for line in body.split(b'\n') if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError:
            raise _HttpError(400, 'Commit payload is not valid NDJSON') from None
        if not items or not isinstance(items[0], dict) or items[0].get('key') != 'header':
            raise _HttpError(400, 'Commit payload must start with a header line')
        header = items[0].get('value') or {}
        summary = header.get('summary')
        if not isinstance(summary, str) or not summary:
            raise _HttpError(400, 'Commit summary is required')
        with hub._store.lock:
            head = repo.head
            parent = header.get('parentCommit')
            if parent is not None and parent != head.sha:
                raise _HttpError(412, 'A commit has happened since. Please refresh and try again.')
            files = dict(head.files)
            for item in items[1:]:
                self._apply_operation(repo, files, item)
            commit = _new_commit(files, summary, str(header.get('description') or ''))
            repo.history.append(commit)
        self._send_json(
            200,
            {
                'success': True,
                'commitOid': commit.sha,
                'pullRequestUrl': None,
                'commitUrl': f'{hub.url}/{repo.repo_id}/commit/{commit.sha}',
                'hookOutput': '',
            },
        )

    def _apply_operation(self, repo: _Repo, files: dict[str, _Blob], item: object) -> None:
        """Apply one NDJSON operation to the working copy ``files`` (the branch is moved later)."""
        if not isinstance(item, dict) or not isinstance(item.get('value'), dict):
            raise _HttpError(400, f'Malformed commit operation: {item!r}')
        key, value = item.get('key'), item['value']
        path = _check_repo_path(value.get('path'))
        if key == 'file':
            if value.get('encoding') != 'base64':
                raise _HttpError(400, f'Unsupported encoding for {path}: {value.get("encoding")!r}')
            try:
                content = base64.b64decode(value.get('content', ''), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise _HttpError(400, f'Invalid base64 content for {path}') from None
            files[path] = _Blob.make(content, lfs=False)
        elif key == 'lfsFile':
            oid = value.get('oid')
            data = repo.lfs_objects.get(oid) if isinstance(oid, str) else None
            if data is None:
                raise _HttpError(400, f'LFS object {oid} for {path} was never uploaded')
            if value.get('size') is not None and value.get('size') != len(data):
                raise _HttpError(
                    400, f'LFS object {oid} for {path} has size {len(data)}, not {value["size"]}'
                )
            files[path] = _Blob.make(data, lfs=True)
        elif key == 'deletedFile':
            if files.pop(path, None) is None:
                raise _HttpError(404, f"A file with this name doesn't exist: {path}", code='EntryNotFound')
        elif key == 'deletedFolder':
            prefix = path.rstrip('/') + '/'
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise _HttpError(404, f"A file with this name doesn't exist: {path}", code='EntryNotFound')
            for doomed_path in doomed:
                del files[doomed_path]
        else:
            raise _HttpError(400, f'Unsupported commit operation: {key!r}')

    def _resolve(self, repo: _Repo, revision: str, path: str) -> None:
        commit = self._commit(repo, revision)
        blob = commit.files.get(path)
        headers = {'X-Repo-Commit': commit.sha}
        if blob is None:
            raise _HttpError(404, 'Entry not found', code='EntryNotFound', headers=headers)
        tamper = self.server.hub.tamper_downloads.get(path)
        data = blob.data if tamper is None else tamper(blob.data)  # served bytes; ETags stay the stored file's
        headers.update({'ETag': f'"{blob.etag}"', 'Accept-Ranges': 'bytes'})
        if blob.lfs:
            headers.update({'X-Linked-Etag': f'"{blob.sha256}"', 'X-Linked-Size': str(len(data))})
        byte_range = _parse_range(self.headers['Range'], len(data)) if self.headers.get('Range') else None
        if byte_range is None:
            return self._send(200, data, 'application/octet-stream', headers)
        start, end = byte_range
        headers['Content-Range'] = f'bytes {start}-{end - 1}/{len(data)}'
        return self._send(206, data[start:end], 'application/octet-stream', headers)


class HubServer:
    """In-memory Hub on ``http://127.0.0.1:<free port>``; a context manager that serves in a thread.

    Instrumentation for tests: :attr:`requests`, :meth:`reset_requests`, :meth:`files`,
    :meth:`commits`; fault injection through :attr:`fail_next_commits`, :attr:`fail_mode` and
    :attr:`tamper_downloads`.
    """

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        username: str = DEFAULT_USERNAME,
        port: int = 0,
        verbose: bool = False,
    ):
        self.token = token
        self.username = username
        self.verbose = verbose
        #: Number of upcoming commit calls that fail (after their LFS uploads), see the module docs.
        self.fail_next_commits = 0
        #: ``"disconnect"``: close the connection unanswered; ``"error"``: answer HTTP 500.
        self.fail_mode: FailMode = 'disconnect'
        #: ``{path in repo: function of the stored bytes}``: downloads of that path (any repo, any
        #: revision) serve what the function returns, sizes consistent, ETags still the stored file's.
        self.tamper_downloads: dict[str, Callable[[bytes], bytes]] = {}
        self._port = port
        self._store = _Store()
        self._requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()  # guards _requests, fail_next_commits and _connections
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind 127.0.0.1 (port 0 picks a free one) and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError('HubServer already started')
        server = _Server((HOST, self._port), _Handler)
        server.hub = self
        self._server = server
        # A short poll interval keeps stop() (which waits for the accept loop to notice) fast.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(_POLL_INTERVAL_S,), name=f'hub_server:{self.port}', daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, then cut open keep-alive connections so no handler outlives the server."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError('HubServer is not running')
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:54321``."""
        return f'http://{HOST}:{self.port}'

    # -- instrumentation --------------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every request handled so far (a copy; path without query string)."""
        with self._lock:
            return list(self._requests)

    def reset_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def files(self, repo_id: str, revision: str = 'main') -> dict[str, bytes]:
        """Snapshot ``{path: content}`` of ``repo_id`` at ``revision`` (``main`` or a commit sha)."""
        with self._store.lock:
            repo = self._store.repos.get(repo_id)
            if repo is None:
                raise KeyError(f'No repo {repo_id!r} on this server')
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f'No revision {revision!r} in {repo_id!r}')
            return {path: blob.data for path, blob in commit.files.items()}

    def commits(self, repo_id: str) -> list[str]:
        """Commit shas of ``repo_id``, newest first (the first one is ``main``)."""
        with self._store.lock:
            repo = self._store.repos.get(repo_id)
            if repo is None:
                raise KeyError(f'No repo {repo_id!r} on this server')
            return [commit.sha for commit in reversed(repo.history)]

    # -- used by the handler ----------------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _take_commit_fault(self) -> bool:
        with self._lock:
            if self.fail_next_commits <= 0:
                return False
            self.fail_next_commits -= 1
            return True

    def _track_connection(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


# Module-level names huggingface_hub derives from HF_* variables; some modules copy them at import
# (``from ..constants import HF_HUB_CACHE``), so those copies are refreshed too.
_ENV_DERIVED_CONSTANTS = (
    'ENDPOINT',
    'HUGGINGFACE_CO_URL_TEMPLATE',
    'HF_URL_HOSTS',
    'HF_HOME',
    'HF_HUB_CACHE',
    'HUGGINGFACE_HUB_CACHE',
    'HF_ASSETS_CACHE',
    'HUGGINGFACE_ASSETS_CACHE',
    'HF_XET_CACHE',
    'HF_TOKEN_PATH',
    'HF_STORED_TOKENS_PATH',
    'AGENT_HARNESSES_PATH',
    'HF_HUB_DISABLE_XET',
    'HF_HUB_DISABLE_TELEMETRY',
    'HF_HUB_OFFLINE',
)


def configure_hub_env(
    url: str, cache_dir: str | os.PathLike[str], token: str | None = None
) -> Callable[[], None]:
    """Point huggingface_hub (and so timm) at ``url`` with a private cache; returns an undo function.

    huggingface_hub reads its ``HF_*`` variables once, at import, and pytest may import timm (and so
    huggingface_hub) before any fixture runs.  So besides setting the variables for later imports and
    subprocesses, this re-evaluates ``huggingface_hub.constants`` if it is already imported, refreshes
    the copies other huggingface_hub modules took of it, and re-points the module-level ``HfApi``
    behind ``huggingface_hub.model_info``/``create_repo``/... (it stored the endpoint when created).

    ``cache_dir`` becomes ``HF_HOME``; the download cache is ``cache_dir/hub``.  Xet is disabled (this
    server speaks plain LFS), telemetry and offline mode are switched off, and ``HF_TOKEN`` is set to
    ``token`` or removed, so that a developer's own token is never sent (it would be rejected).
    Call the returned function to restore the previous variables and constants.
    """
    home = Path(cache_dir)
    updates: dict[str, str | None] = {
        'HF_ENDPOINT': url.rstrip('/'),
        'HF_HOME': str(home),
        'HF_HUB_CACHE': str(home / 'hub'),
        'HF_ASSETS_CACHE': str(home / 'assets'),
        'HF_XET_CACHE': str(home / 'xet'),
        'HF_TOKEN_PATH': str(home / 'token'),
        'HF_HUB_DISABLE_XET': '1',
        'HF_HUB_DISABLE_TELEMETRY': '1',
        'HF_TOKEN': token,
        'HUGGING_FACE_HUB_TOKEN': None,
        'HF_HUB_OFFLINE': None,
        'TRANSFORMERS_OFFLINE': None,
        'HUGGINGFACE_CO_STAGING': None,
    }
    previous = {name: os.environ.get(name) for name in updates}
    _apply_env(updates)
    return lambda: _apply_env(previous)


def _apply_env(values: dict[str, str | None]) -> None:
    """Set (or unset, for ``None``) variables, then make an imported huggingface_hub see them."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    constants = sys.modules.get('huggingface_hub.constants')
    if constants is None:
        return  # not imported yet: it will read the variables itself
    stale = {name: getattr(constants, name) for name in _ENV_DERIVED_CONSTANTS}
    importlib.reload(constants)
    for module_name, module in list(sys.modules.items()):
        if module is constants or module_name.partition('.')[0] != 'huggingface_hub':
            continue
        for name, old_value in stale.items():
            if name in vars(module) and vars(module)[name] == old_value:
                setattr(module, name, getattr(constants, name))
    hf_api = sys.modules.get('huggingface_hub.hf_api')
    if hf_api is not None:
        hf_api.api.endpoint = constants.ENDPOINT


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument('--port', type=int, default=0, help='port on 127.0.0.1 (0 = any free port)')
    parser.add_argument('--token', default=DEFAULT_TOKEN, help='the only accepted bearer token')
    parser.add_argument('--username', default=DEFAULT_USERNAME, help='namespace of repos created without one')
    parser.add_argument('--verbose', action='store_true', help='log every request to stderr')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; the first stdout line is the URL (for subprocess tests)."""
    args = _parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with HubServer(token=args.token, username=args.username, port=args.port, verbose=args.verbose) as hub:
        print(hub.url, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == '__main__':
    main()
