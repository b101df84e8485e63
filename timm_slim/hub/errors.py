"""What can go wrong talking to the Hub, said clearly: :class:`HubError`, :class:`CorruptFileError`,
and :func:`hub_errors`, which turns huggingface_hub's and the network's errors into one HubError
(never with a token)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from .config import CONFIG_FILE


class HubError(RuntimeError):
    """The Hub or the local cache could not serve a request: bad token, missing repo, failed upload."""


class CorruptFileError(ValueError):
    """A downloaded file is truncated, or its bytes differ from what the repo records for it."""


@contextlib.contextmanager
def hub_errors(repo_id: str, action: str, upload: bool = False, filename: Optional[str] = None,
                revision: Optional[str] = None) -> Iterator[None]:
    """Turn huggingface_hub's and the network's errors into one clear HubError (never with a token)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError as error:
        raise HubError(f'{filename} of {repo_id} is not in the local cache and the Hub at {constants.ENDPOINT} '
                       f'cannot be reached (HF_HUB_OFFLINE={os.environ.get("HF_HUB_OFFLINE", "")!r}); download it '
                       f'once while online') from error
    except RepositoryNotFoundError as error:
        raise HubError(f'cannot {action} {repo_id}: no such repo on {constants.ENDPOINT} (or it is private and the '
                       f'token cannot read it)') from error
    except RevisionNotFoundError as error:
        raise HubError(f'cannot {action} {repo_id}: it has no revision {revision!r}') from error
    except EntryNotFoundError as error:
        what = 'config.json: it is not a timm model repo' if filename == CONFIG_FILE else \
            f'{filename}, which its config.json lists'
        raise HubError(f'{repo_id}@{revision or "main"} has no {what}') from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, 'response', None), 'status_code', None)
        if status == 401:
            raise HubError(f'cannot {action} {repo_id}: the Hub at {constants.ENDPOINT} refused the token '
                           f'(401 Unauthorized); set HF_TOKEN or run `hf auth login` with a valid token, or pass '
                           f'token=') from error
        if status == 403:
            raise HubError(f'cannot {action} {repo_id}: the token has no write access to it (403 Forbidden)') from error
        if upload:
            raise _upload_failed(repo_id, error) from error
        raise HubError(f'cannot {action} {repo_id}: HTTP {status}: {error}') from error
    except (HubError, ValueError):
        raise
    except Exception as error:  # connection reset, timeout, a server dying mid-request
        if upload:
            raise _upload_failed(repo_id, error) from error
        raise HubError(f'cannot {action} {repo_id}: {type(error).__name__}: {error}') from error


def _upload_failed(repo_id: str, error: Exception) -> HubError:
    return HubError(f'the push to {repo_id} failed before its commit landed ({type(error).__name__}: {error}); '
                    f'nothing was published: a push is one commit, so the repo is still at its previous commit. '
                    f'Push again to retry.')
