"""`--push-to-hub ORG/NAME`: upload a finished output with huggingface_hub's own API.

Two steps, so that nothing heavy runs for a push that cannot happen:
  1. `check_push` (before the model is read): a token is at hand, the repo id is well formed, and
     the repo does not exist yet unless `--overwrite` (one request).
  2. `push` (after the local output is complete and renamed into place): create the repo (and the
     branch), upload the folder or the single file. The model card written into the folder
     (README.md) becomes the repo's card. The local output is never touched: an upload that fails
     leaves it complete where it is, and the error names the repo.
huggingface_hub does the transfer (LFS or Xet, large files, retries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import FormatError, UsageError

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclass(frozen=True)
class PushRequest:
    repo_id: str
    token: str
    private: bool = False
    branch: str | None = None  # None: the repo's default branch
    overwrite: bool = False  # push into a repo that already exists


def resolve_token(token: str | None) -> str | None:
    """--token / $HF_TOKEN, else the token `hf auth login` stored."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def check_push(repo_id: str, *, token: str | None, private: bool = False, branch: str | None = None,
               overwrite: bool = False) -> PushRequest:
    """Everything that can refuse a push, checked before any weight is read."""
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"--push-to-hub {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    tok = resolve_token(token)
    if not tok:
        raise UsageError(f"--push-to-hub {repo_id}: no Hub token; set HF_TOKEN, pass --token or run `hf auth login`")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        exists = HfApi(token=tok).repo_exists(repo_id)
    except HfHubHTTPError as e:
        raise FormatError(f"--push-to-hub {repo_id}: the Hub refused the check: {_one_line(e)}") from None
    except OSError as e:
        raise FormatError(f"--push-to-hub {repo_id}: cannot reach the Hub: {_one_line(e)}") from None
    if exists and not overwrite:
        raise UsageError(f"--push-to-hub {repo_id}: the repo exists; add --overwrite to upload into it")
    return PushRequest(repo_id, tok, private, branch, overwrite)


def check_push_flags(repo_id: str | None, token: str | None, private: bool, branch: str | None,
                     overwrite: bool) -> PushRequest | None:
    """The CLI's --push-to-hub/--private/--push-branch/--token: None when no push was asked."""
    if repo_id is None:
        if private or branch:
            raise UsageError(f"{'--private' if private else '--push-branch'}: given without --push-to-hub")
        return None
    return check_push(repo_id, token=token, private=private, branch=branch, overwrite=overwrite)


def push(path: Path, req: PushRequest, *, commit_message: str | None = None, progress: bool = False) -> dict:
    """Upload the complete output at `path`; returns {"repo", "url", "commit", "files"}. `progress`:
    huggingface_hub's own transfer bars (off for --json / --quiet)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    api = HfApi(token=req.token)
    message = commit_message or f"Upload {path.name} with qtool"
    try:
        url = api.create_repo(req.repo_id, private=req.private, exist_ok=req.overwrite)
        if req.branch:
            api.create_branch(req.repo_id, branch=req.branch, exist_ok=True)
        if path.is_dir():
            info = api.upload_folder(repo_id=req.repo_id, folder_path=path, revision=req.branch, commit_message=message)
            files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        else:
            info = api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=req.repo_id,
                                   revision=req.branch, commit_message=message)
            files = [path.name]
    except HfHubHTTPError as e:
        raise FormatError(f"--push-to-hub {req.repo_id}: upload failed ({_one_line(e)}); the local output {path} is complete") from None
    except (OSError, ValueError, RuntimeError) as e:  # ValueError: the card's metadata refused; RuntimeError: a transfer failed
        raise FormatError(f"--push-to-hub {req.repo_id}: upload failed ({_one_line(e)}); the local output {path} is complete") from None
    return {"repo": req.repo_id, "url": str(url), "commit": getattr(info, "oid", None), "branch": req.branch, "files": files}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300]
