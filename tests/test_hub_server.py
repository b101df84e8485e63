"""End-to-end checks of tests/hub_server.py through the real huggingface_hub client and timm.

huggingface_hub (and timm) are imported at the top on purpose: it is the situation pytest creates,
and it proves that ``configure_hub_env`` re-points an already-imported client.  A subprocess test
covers the other order (variables set before the first import).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import timm
import torch
from hub_server import FailMode, HubServer, configure_hub_env
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

# huggingface_hub itself passes a file object as `data=` to httpx2 for LFS uploads.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TOKEN = 'hf_test_token'
HERE = Path(__file__).resolve().parent


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    """A fresh server, with huggingface_hub pointed at it and a private cache; undone afterwards."""
    with HubServer(token=TOKEN) as server:
        restore = configure_hub_env(server.url, tmp_path / 'hf-home', token=server.token)
        try:
            yield server
        finally:
            restore()


def _raw(
    hub: HubServer, method: str, path: str, body: bytes | list[bytes] | None = None, auth: bool = True
) -> tuple[int, dict[str, str], bytes]:
    """One request with the standard library; a list body is sent with chunked transfer encoding."""
    connection = http.client.HTTPConnection('127.0.0.1', hub.port, timeout=10)
    try:
        headers = {'Authorization': f'Bearer {hub.token}'} if auth else {}
        payload = iter(body) if isinstance(body, list) else body
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def _commit_ndjson(*operations: dict[str, object]) -> bytes:
    header = {'key': 'header', 'value': {'summary': 'raw commit', 'description': ''}}
    return b''.join(json.dumps(item).encode() + b'\n' for item in (header, *operations))


def test_create_repo_conflicts_unless_exist_ok(hub: HubServer) -> None:
    api = HfApi()
    url = api.create_repo('demo')
    assert url.repo_id == 'user/demo'
    assert url == f'{hub.url}/user/demo'
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo('user/demo')
    assert conflict.value.response.status_code == 409
    assert api.create_repo('user/demo', exist_ok=True).repo_id == 'user/demo'
    # Like the real Hub, a new repo starts with one commit holding the default .gitattributes.
    assert len(hub.commits('user/demo')) == 1
    assert b'*.safetensors filter=lfs' in hub.files('user/demo')['.gitattributes']


def test_regular_and_lfs_files_round_trip(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo('user/weights')
    text, weights = b'width: 0.5\n', bytes(range(256)) * 40
    weights_file = tmp_path / 'model.safetensors'
    weights_file.write_bytes(weights)  # uploaded from disk, the client's usual path
    hub.reset_requests()
    commit = api.create_commit(
        'user/weights',
        [CommitOperationAdd('notes.txt', text), CommitOperationAdd('w050/model.safetensors', weights_file)],
        commit_message='add width 0.5',
    )

    assert hub.commits('user/weights')[0] == commit.oid
    lfs_puts = [path for method, path in hub.requests if method == 'PUT']
    assert lfs_puts == [f'/_lfs/user/weights/{hashlib.sha256(weights).hexdigest()}']
    tree = {entry.path: entry for entry in api.list_repo_tree('user/weights', recursive=True)}
    assert tree['notes.txt'].lfs is None
    assert tree['w050/model.safetensors'].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert 'w050' in tree  # folders are listed too
    assert sorted(api.list_repo_files('user/weights')) == [
        '.gitattributes',
        'notes.txt',
        'w050/model.safetensors',
    ]

    assert Path(hf_hub_download('user/weights', 'notes.txt')).read_bytes() == text
    assert Path(hf_hub_download('user/weights', 'w050/model.safetensors')).read_bytes() == weights
    snapshot = Path(snapshot_download('user/weights'))
    assert snapshot.name == commit.oid
    assert (snapshot / 'notes.txt').read_bytes() == text
    assert (snapshot / 'w050' / 'model.safetensors').read_bytes() == weights

    info = api.model_info('user/weights', files_metadata=True)
    assert info.sha == commit.oid
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings}
    assert sizes['notes.txt'] == len(text) and sizes['w050/model.safetensors'] == len(weights)
    refs = api.list_repo_refs('user/weights')
    assert [(ref.name, ref.target_commit) for ref in refs.branches] == [('main', commit.oid)]


def test_new_commit_keeps_old_revision_downloadable(hub: HubServer) -> None:
    api = HfApi()
    api.create_repo('user/history')
    first = api.create_commit('user/history', [CommitOperationAdd('a.bin', b'v1' * 50)], commit_message='one')
    second = api.create_commit(
        'user/history', [CommitOperationAdd('a.bin', b'v2' * 50)], commit_message='two'
    )

    assert hub.commits('user/history')[:2] == [second.oid, first.oid]
    assert [c.commit_id for c in api.list_repo_commits('user/history')] == hub.commits('user/history')
    assert [c.title for c in api.list_repo_commits('user/history')][:2] == ['two', 'one']
    assert Path(hf_hub_download('user/history', 'a.bin')).read_bytes() == b'v2' * 50
    assert Path(hf_hub_download('user/history', 'a.bin', revision=first.oid)).read_bytes() == b'v1' * 50
    assert hub.files('user/history', first.oid)['a.bin'] == b'v1' * 50
    assert api.model_info('user/history', revision=first.oid).sha == first.oid


def test_unchanged_files_are_not_uploaded_again(hub: HubServer) -> None:
    api = HfApi()
    api.create_repo('user/same')
    api.create_commit('user/same', [CommitOperationAdd('m.safetensors', b'x' * 100)], commit_message='one')
    hub.reset_requests()
    api.create_commit('user/same', [CommitOperationAdd('m.safetensors', b'x' * 100)], commit_message='again')
    # preupload reported the oid it has, so the client skipped the upload and the empty commit.
    assert not [r for r in hub.requests if r[0] == 'PUT' or r[1].endswith('/commit/main')]
    assert len(hub.commits('user/same')) == 2


def test_wrong_token_gets_401(hub: HubServer) -> None:
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token='hf_wrong').create_repo('user/nope')
    assert error.value.response.status_code == 401
    assert 'Invalid credentials in Authorization header' in str(error.value)
    with pytest.raises(HfHubHTTPError) as whoami_error:
        HfApi(token='hf_wrong').whoami()
    assert whoami_error.value.response.status_code == 401
    assert HfApi().whoami()['name'] == 'user'
    with pytest.raises(KeyError):
        hub.commits('user/nope')


def test_missing_repo_revision_and_file(hub: HubServer) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download('user/missing', 'config.json')
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info('user/missing', token=False)
    HfApi().create_repo('user/present')
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download('user/present', 'config.json')
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download('user/present', '.gitattributes', revision='0' * 40)


def test_deletions_folders_and_stale_parent_commit(hub: HubServer) -> None:
    api = HfApi()
    api.create_repo('user/tidy')
    adds = [CommitOperationAdd(p, p.encode()) for p in ('keep.txt', 'old.txt', 'w 1/é.txt', 'w 1/sub/b.txt')]
    base = api.create_commit('user/tidy', adds, commit_message='add')
    top = {entry.path for entry in api.list_repo_tree('user/tidy')}
    assert top == {'.gitattributes', 'keep.txt', 'old.txt', 'w 1'}  # non-recursive: one level
    assert {entry.path for entry in api.list_repo_tree('user/tidy', 'w 1')} == {'w 1/é.txt', 'w 1/sub'}
    assert Path(hf_hub_download('user/tidy', 'w 1/é.txt')).read_bytes() == 'w 1/é.txt'.encode()

    api.create_commit(
        'user/tidy',
        [CommitOperationDelete('old.txt'), CommitOperationDelete('w 1/')],
        commit_message='tidy',
        parent_commit=base.oid,
    )
    assert set(hub.files('user/tidy')) == {'.gitattributes', 'keep.txt'}
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit('user/tidy', [CommitOperationDelete('old.txt')], commit_message='again')
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            'user/tidy', [CommitOperationAdd('x.txt', b'x')], commit_message='late', parent_commit=base.oid
        )
    assert stale.value.response.status_code == 412
    assert len(hub.commits('user/tidy')) == 3


def test_private_repo_is_hidden_without_token(hub: HubServer) -> None:
    api = HfApi()
    api.create_repo('user/secret', private=True)
    weights = b'\x00secret' * 10
    api.create_commit(
        'user/secret',
        [CommitOperationAdd('a.txt', b'hidden'), CommitOperationAdd('w.safetensors', weights)],
        commit_message='add',
    )
    assert api.model_info('user/secret').private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info('user/secret', token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download('user/secret', 'a.txt', token=False)
    assert Path(hf_hub_download('user/secret', 'a.txt')).read_bytes() == b'hidden'
    assert Path(hf_hub_download('user/secret', 'w.safetensors')).read_bytes() == weights


@pytest.mark.parametrize(
    ('mode', 'raised'), [('disconnect', httpx2.RemoteProtocolError), ('error', HfHubHTTPError)]
)
def test_failed_commit_leaves_repo_at_previous_commit(
    hub: HubServer, mode: FailMode, raised: type[Exception]
) -> None:
    api = HfApi()
    api.create_repo('user/flaky')
    api.create_commit('user/flaky', [CommitOperationAdd('a.txt', b'old')], commit_message='old')
    before_commits, before_files = hub.commits('user/flaky'), hub.files('user/flaky')
    weights = b'\x00\x01' * 500
    hub.fail_mode = mode
    hub.fail_next_commits = 1
    hub.reset_requests()

    with pytest.raises(raised):
        api.create_commit(
            'user/flaky',
            [CommitOperationAdd('a.txt', b'new'), CommitOperationAdd('w.safetensors', weights)],
            commit_message='new',
        )
    assert (
        'PUT',
        f'/_lfs/user/flaky/{hashlib.sha256(weights).hexdigest()}',
    ) in hub.requests  # died after upload
    assert hub.commits('user/flaky') == before_commits
    assert hub.files('user/flaky') == before_files
    assert HfApi().model_info('user/flaky').sha == before_commits[0]

    hub.reset_requests()
    retried = api.create_commit(
        'user/flaky',
        [CommitOperationAdd('a.txt', b'new'), CommitOperationAdd('w.safetensors', weights)],
        commit_message='new',
    )
    assert hub.commits('user/flaky')[0] == retried.oid
    assert hub.files('user/flaky')['w.safetensors'] == weights
    assert not [r for r in hub.requests if r[0] == 'PUT']  # the object survived the failed commit


def test_chunked_lfs_upload_and_atomic_commit(hub: HubServer) -> None:
    HfApi().create_repo('user/raw')
    data = b'chunked payload ' * 64
    oid = hashlib.sha256(data).hexdigest()
    batch = json.dumps({'operation': 'upload', 'objects': [{'oid': oid, 'size': len(data)}]}).encode()
    status, _, body = _raw(hub, 'POST', '/user/raw.git/info/lfs/objects/batch', batch)
    assert status == 200
    href = json.loads(body)['objects'][0]['actions']['upload']['href']
    put_path = href[len(hub.url) :]

    tampered = data[100:-1] + b'!'  # right size, wrong sha256
    assert _raw(hub, 'PUT', put_path, [data[:100], tampered], auth=False)[0] == 400
    assert _raw(hub, 'PUT', put_path, [data[:100]], auth=False)[0] == 400  # wrong size
    assert _raw(hub, 'PUT', put_path, [data[:100], data[100:]], auth=False)[0] == 200
    assert _raw(hub, 'PUT', '/_lfs/user/raw/' + 'f' * 64, data, auth=False)[0] == 403  # never announced

    before = hub.commits('user/raw')
    regular = {'key': 'file', 'value': {'path': 'a.txt', 'content': 'aGk=', 'encoding': 'base64'}}
    missing = {
        'key': 'lfsFile',
        'value': {'path': 'm.safetensors', 'algo': 'sha256', 'oid': 'e' * 64, 'size': 1},
    }
    status, _, _ = _raw(hub, 'POST', '/api/models/user/raw/commit/main', _commit_ndjson(regular, missing))
    assert status == 400
    assert hub.commits('user/raw') == before and 'a.txt' not in hub.files('user/raw')

    present = {
        'key': 'lfsFile',
        'value': {'path': 'm.safetensors', 'algo': 'sha256', 'oid': oid, 'size': len(data)},
    }
    assert _raw(hub, 'POST', '/api/models/user/raw/commit/main', _commit_ndjson(regular, present))[0] == 200
    assert hub.files('user/raw')['a.txt'] == b'hi'
    assert hub.files('user/raw')['m.safetensors'] == data
    assert (
        _raw(hub, 'POST', '/api/models/user/raw/commit/main', _commit_ndjson(regular), auth=False)[0] == 401
    )


def test_head_and_get_honour_range(hub: HubServer) -> None:
    api = HfApi()
    api.create_repo('user/ranged')
    weights = bytes(range(200))
    api.create_commit('user/ranged', [CommitOperationAdd('w.safetensors', weights)], commit_message='add')
    url = f'{hub.url}/user/ranged/resolve/main/w.safetensors'

    head = get_session().head(url, headers={'Range': 'bytes=10-19'})
    assert head.status_code == 206
    assert head.headers['Content-Range'] == 'bytes 10-19/200'
    assert head.headers['Content-Length'] == '10'
    assert head.headers['X-Linked-Size'] == '200'
    assert head.headers['X-Linked-Etag'] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert head.headers['X-Repo-Commit'] == hub.commits('user/ranged')[0]
    assert get_session().get(url, headers={'Range': 'bytes=10-19'}).content == weights[10:20]
    assert get_session().get(url, headers={'Range': 'bytes=-5'}).content == weights[-5:]
    assert get_session().get(url, headers={'Range': 'bytes=195-'}).content == weights[195:]
    assert get_session().get(url, headers={'Range': 'bytes=500-'}).status_code == 416
    assert get_session().get(url).content == weights


def test_timm_push_and_load_hf_hub_model(hub: HubServer) -> None:
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=10).eval()
    timm.models.push_to_hf_hub(model, 'user/tiny-resnet', token=hub.token, safe_serialization=True)
    assert {'config.json', 'model.safetensors', 'README.md'} <= set(hub.files('user/tiny-resnet'))

    loaded = timm.create_model('hf-hub:user/tiny-resnet', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_configure_hub_env_repoints_imported_client_and_restores(hub: HubServer, tmp_path: Path) -> None:
    # The fixture configured the already-imported client: module-level functions use the server.
    assert huggingface_hub.constants.ENDPOINT == hub.url
    assert huggingface_hub.constants.HF_HUB_DISABLE_XET is True
    HfApi().create_repo('user/module-level')
    assert huggingface_hub.model_info('user/module-level').sha == hub.commits('user/module-level')[0]

    restore = configure_hub_env('http://127.0.0.1:9', tmp_path / 'other')
    assert huggingface_hub.hf_api.api.endpoint == 'http://127.0.0.1:9'
    restore()
    assert huggingface_hub.constants.ENDPOINT == hub.url
    assert huggingface_hub.hf_api.api.endpoint == hub.url
    assert huggingface_hub.constants.HF_HUB_CACHE == str(tmp_path / 'hf-home' / 'hub')


def test_configure_hub_env_before_first_import(hub: HubServer, tmp_path: Path) -> None:
    HfApi().create_repo('user/fresh')
    HfApi().create_commit('user/fresh', [CommitOperationAdd('a.txt', b'fresh')], commit_message='add')
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from hub_server import configure_hub_env
        configure_hub_env({hub.url!r}, {str(tmp_path / 'fresh-home')!r})
        assert "huggingface_hub" not in sys.modules
        from huggingface_hub import hf_hub_download, model_info
        print(open(hf_hub_download("user/fresh", "a.txt"), "rb").read().decode())
        print(model_info("user/fresh").sha)
        """
    )
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['fresh', hub.commits('user/fresh')[0]]


def test_script_mode_prints_url_and_serves_until_terminated() -> None:
    process = subprocess.Popen(
        [sys.executable, str(HERE / 'hub_server.py'), '--port', '0', '--token', 'hf_script'],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith('http://127.0.0.1:')
        connection = http.client.HTTPConnection(url.removeprefix('http://'), timeout=10)
        connection.request('GET', '/api/whoami-v2', headers={'Authorization': 'Bearer hf_script'})
        assert json.loads(connection.getresponse().read())['name'] == 'user'
        connection.close()
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
