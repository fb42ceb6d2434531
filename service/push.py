"""``tureen push OUT_DIR REPO_ID``: publish a merge's output folder to the Hub in one commit.

The work is :func:`service.hub.publish_folder`, imported only when the command runs, so that
the ``tureen`` command starts quickly. The token comes from ``HF_TOKEN`` or the stored
``hf auth login``, never from the command line, where other users could read it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _require_token(repo_id: str) -> None:
    """Refuse to start without a Hub token, which the Hub would answer with a bare 401.

    Raises:
        PublishError: neither ``HF_TOKEN`` nor a stored ``hf auth login`` token is found.
    """
    from huggingface_hub import get_token

    from service.hub import PublishError

    if get_token() is None:
        namespace = repo_id.partition("/")[0]
        raise PublishError(
            f"no Hugging Face token: set HF_TOKEN to a token with write access to {namespace}, "
            "or log in with `hf auth login`",
            details={"reason": "no_token", "repo_id": repo_id},
        )


def cmd_push(args: argparse.Namespace) -> int:
    """Publish OUT_DIR to the Hub repository REPO_ID in one commit and print the commit."""
    from pydantic import ValidationError

    from service.hub import PublishError, output_files, publish_folder
    from service.jobs.models import PublishOptions

    try:
        options = PublishOptions(
            repo_id=args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            create_pr=args.create_pr,
        )
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise PublishError(f"{field}: {first['msg']}", details={"field": field}) from None

    folder = Path(args.out_dir)
    if folder.is_dir() and output_files(folder):  # else publish_folder names the folder's fault
        _require_token(options.repo_id)

    def step(text: str) -> None:
        if not args.quiet:
            print(f"{text}…", file=sys.stderr, flush=True)

    commit = publish_folder(folder, options, on_step=step)
    print(
        json.dumps(
            {
                "repo_id": options.repo_id,
                "repo_url": commit.repo_url,
                "commit_url": commit.commit_url,
                "commit_sha": commit.commit_sha,
                "pr_url": commit.pr_url,
            },
            indent=2,
        )
    )
    return 0


def add_push_command(commands: Any) -> None:
    """Add ``tureen push OUT_DIR REPO_ID`` to the ``tureen`` command's subparsers."""
    push = commands.add_parser(
        "push",
        help="publish a merge's output folder to the Hugging Face Hub in one commit",
        description="Publish OUT_DIR (weights, config, tokenizer, model card and recipe) to "
        "the Hub model repository REPO_ID in one commit. The token comes from HF_TOKEN or "
        "`hf auth login`; it is never accepted on the command line.",
    )
    push.add_argument("out_dir", help="a merge's output folder")
    push.add_argument("repo_id", help="namespace/name, created when missing")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private",
        dest="private",
        action="store_const",
        const=True,
        default=None,
        help="create the repository private (the default), or refuse a public one",
    )
    visibility.add_argument(
        "--public", dest="private", action="store_const", const=False, help="create it public"
    )
    push.add_argument("--revision", help="branch to commit to (created when missing)")
    push.add_argument("--commit-message", help="the commit's message")
    push.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing"
    )
    push.add_argument("--quiet", action="store_true", help="print only the result")
    push.set_defaults(handler=cmd_push)
