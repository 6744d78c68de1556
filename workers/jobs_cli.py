"""`imgpipe submit`, `status` and `dead`: thin commands over pipeline.transport.client."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rich.console import Console

from pipeline.config import settings_from_flags
from pipeline.errors import ConfigError, InputError
from pipeline.sources import directory
from pipeline.sources.files import read_file
from pipeline.transport.contract import MAX_TEXT_CHARS

if TYPE_CHECKING:  # redis-py costs every other command a quarter second
    from pipeline.transport.client import Client

EXIT_MISSING_RESULTS = 1
# Least lifetime of a reply stream after its last refresh (--timeout when longer):
# covers the submission, and ends the stream of a client killed outright.
REPLY_TTL_S = 300.0
Handler = Callable[[argparse.Namespace, Console], int]


def add_commands(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the commands; `common` adds --config and --redis-url to each."""
    submit = commands.add_parser("submit", help="queue images as jobs for `imgpipe serve`")
    submit.add_argument("inputs", nargs="*", type=Path, help="image files or directories")
    submit.add_argument("--urls", metavar="FILE|-", help="also send URL jobs: the http(s) "
                        "URLs FILE lists, one a line (- reads standard input); the daemon "
                        "fetches them (serve.allowed_url_prefixes)")
    submit.add_argument("--recursive", action="store_true", help="descend into subdirectories")
    submit.add_argument("--paths", action="store_true", help="send paths (the daemon must see "
                        "them under serve.allowed_roots) instead of the images' bytes")
    submit.add_argument("--topk", type=int, help="predictions per image")
    submit.add_argument("--wait", action="store_true", help="print results as they arrive")
    submit.add_argument("--timeout", type=float, default=600.0,
                        help="with --wait: seconds to wait for the last result (default 600)")
    submit.add_argument("--json", action="store_true", help="with --wait: whole results, "
                        "as JSON lines")
    common(submit)
    submit.set_defaults(handler=_submit)

    status = commands.add_parser("status", help="the job queue, its consumers and dead letters")
    common(status)
    status.set_defaults(handler=_status)

    dead = commands.add_parser("dead", help="list, retry or purge dead-lettered jobs")
    dead.add_argument("action", choices=["list", "retry", "purge"])
    dead.add_argument("ids", nargs="*", help="retry: these dead letters only (default: all)")
    dead.add_argument("--count", type=int, default=100, help="list: how many (default 100)")
    common(dead)
    dead.set_defaults(handler=_dead)


def _client(args: argparse.Namespace) -> Client:
    from pipeline.transport.client import Client

    return Client.from_settings(settings_from_flags(vars(args)))


def _submit(args: argparse.Namespace, stderr: Console) -> int:
    _check_submit_flags(args)
    stdout = Console(highlight=False, soft_wrap=True)
    limit = settings_from_flags(vars(args)).serve.max_inline_bytes
    unreadable: list[str] = []
    with _client(args) as client:
        reply_to: Optional[str] = None
        try:
            # Made with an expiry and deleted however the wait ends (timeout,
            # Ctrl-C, error): killed outright, it still expires.
            reply_to = client.reply_stream(_reply_ttl_s(args)) if args.wait else None
            jobs = _jobs(args, limit, reply_to, unreadable.append)
            submitted = len(client.submit_many(jobs))
            for line in unreadable:
                stderr.print(f"imgpipe: not sent: {line}", markup=False)
            stderr.print(f"submitted {submitted} jobs to {_jobs_streams(client)}", markup=False)
            if reply_to is None:
                return 0
            return _print_results(client, reply_to, submitted, args, stdout, stderr)
        finally:
            if reply_to is not None:
                client.delete_stream(reply_to)


def _jobs_streams(client: Client) -> str:
    shards = len(client.shards)
    return client.keys.jobs if shards == 1 else f"{client.keys.jobs} ({shards} shards)"


def _check_submit_flags(args: argparse.Namespace) -> None:
    if args.topk is not None and args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, not {args.topk}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be more than 0 seconds, not {args.timeout:g}")
    if not args.inputs and args.urls is None:
        raise ConfigError("give image files or directories, or --urls FILE")
    if args.urls is not None and args.urls != "-" and not os.path.isfile(args.urls):
        raise ConfigError(f"--urls {args.urls}: no such file")


def _reply_ttl_s(args: argparse.Namespace) -> float:
    return max(args.timeout, REPLY_TTL_S)


def _jobs(args: argparse.Namespace, limit: int, reply_to: Optional[str],
          unreadable: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """One job per input file, then per listed URL; what cannot be sent is
    reported, not queued."""
    yield from _file_jobs(args, limit, reply_to, unreadable)
    if args.urls is not None:
        yield from _url_jobs(args, reply_to, unreadable)


def _url_jobs(args: argparse.Namespace, reply_to: Optional[str],
              unreadable: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """One job per line of the --urls list (blank lines skipped), read as it goes."""
    from pipeline.sources.urls import parse_url

    with contextlib.ExitStack() as stack:
        lines = sys.stdin if args.urls == "-" else stack.enter_context(
            open(args.urls, encoding="utf-8", errors="replace"))
        for number, line in enumerate(lines, 1):
            url = line.strip()
            if not url:
                continue
            try:
                shown = parse_url(url).shown()  # the query string may hold a signature
            except InputError as exc:
                unreadable(f"{args.urls} line {number}: {exc.code}: "
                           f"{exc.message.removeprefix('field url: ')}")
                continue
            job_id = shown if len(shown) <= MAX_TEXT_CHARS else None
            yield {"job_id": job_id, "topk": args.topk, "reply_to": reply_to, "url": url}


def _file_jobs(args: argparse.Namespace, limit: int, reply_to: Optional[str],
               unreadable: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    for path in _files(args.inputs, args.recursive):
        job: dict[str, Any] = {"job_id": _job_id(path), "topk": args.topk,
                               "reply_to": reply_to}
        if args.paths:
            if not _is_text(path):
                unreadable(f"{path}: the name is not valid UTF-8, which jobs carry; "
                           "send its bytes instead (without --paths)")
                continue
            job["image"] = os.path.abspath(path)
        else:
            try:
                job["data"] = read_file(path, limit)
            except InputError as exc:
                unreadable(f"{path}: {exc.code}: {exc.message}")
                continue
        yield job


def _files(inputs: list[Path], recursive: bool) -> Iterator[str]:
    for given in inputs:
        if given.is_dir():
            yield from (job.path for job in directory.walk(str(given), recursive))
        elif given.exists():
            yield str(given)
        else:
            raise ConfigError(f"{given} does not exist")


def _job_id(path: str) -> str:
    """The path itself when it fits the contract (readable results), else a fresh id."""
    from pipeline.transport.client import new_job_id

    return path if _is_text(path) and len(path) <= MAX_TEXT_CHARS else new_job_id()


def _is_text(path: str) -> bool:
    """False for a name that is not UTF-8 (os.fsdecode's \\udcXX escapes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _print_results(client: Client, stream: str, expected: int, args: argparse.Namespace,
                   stdout: Console, stderr: Console) -> int:
    received, follower = 0, client.follow(stream)
    deadline = time.monotonic() + args.timeout
    while received < expected:
        client.keep_stream(stream, _reply_ttl_s(args))
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            stderr.print(f"imgpipe: {expected - received} of {expected} results still "
                         f"missing after {args.timeout:g} s", markup=False)
            return EXIT_MISSING_RESULTS
        entries = follower.read(block_ms=min(remaining_ms, 1000))
        for _, result in entries:
            stdout.print(json.dumps(result) if args.json else _one_line(result), markup=False)
        received += len(entries)
    return 0


def _one_line(result: dict[str, Any]) -> str:
    if result["status"] == "ok":
        best = result["predictions"][0]
        return f"{result['job_id']}\t{best['label']}\t{best['score']:.3f}"
    error = result["error"]
    return f"{result['job_id']}\t{result['status']}\t{error['code']}: {error['message']}"


def _status(args: argparse.Namespace, stderr: Console) -> int:
    stdout = Console(highlight=False, soft_wrap=True)
    with _client(args) as client:
        status = client.status()
        locations = [shard.location for shard in client.shards]
    group = status.group if status.group_exists else f"{status.group} (not created yet)"
    lines = [f"{_jobs_streams(client)} at {client.location}, group {group}",
             _figures(status)]
    if status.consumers:
        lines.append("  consumers:")
        lines += [f"    {c.name}: {c.pending} in progress, idle {c.idle_ms / 1000:.1f} s"
                  for c in status.consumers]
    if status.shards:
        lines.append("  shards:")
        lines += [f"    {shard.jobs_stream} at {location}:{_figures(shard)}"
                  for shard, location in zip(status.shards, locations, strict=True)]
    for line in lines:
        stdout.print(line, markup=False)
    return 0


def _figures(status: Any) -> str:
    return (f"  waiting {status.lag}, in progress {status.pending}, "
            f"dead letters {status.dead}, results {status.results}")


def _dead(args: argparse.Namespace, stderr: Console) -> int:
    _check_dead_args(args)
    stdout = Console(highlight=False, soft_wrap=True)
    with _client(args) as client:
        if args.action == "list":
            for entry_id, letter in client.dead_list(args.count):
                stdout.print(_dead_line(entry_id, letter), markup=False)
        elif args.action == "retry":
            try:
                moved = client.dead_retry(args.ids or None)
            except ValueError as exc:  # an id without its shard, or naming none
                raise ConfigError(str(exc)) from None
            stdout.print(f"queued {moved} dead letters as jobs again", markup=False)
        else:
            stdout.print(f"removed {client.dead_purge()} dead letters", markup=False)
    return 0


def _check_dead_args(args: argparse.Namespace) -> None:
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, not {args.count}")
    if args.ids and args.action != "retry":
        raise ConfigError(f"dead {args.action} takes no ids (only dead retry does)")
    from pipeline.transport.dead_letters import DEAD_ID

    malformed = [entry_id for entry_id in args.ids if not DEAD_ID.match(entry_id)]
    if malformed:
        raise ConfigError(f"not dead letter ids: {', '.join(malformed[:5])} (ids look like "
                          "1716200000000-0, or 1/1716200000000-0 with shards; imgpipe dead "
                          "list shows them)")


def _dead_line(entry_id: str, letter: dict[str, Any]) -> str:
    error = letter.get("error") or {}
    if "url" in letter:
        from pipeline.sources.urls import shown

        source = f"url={shown(letter['url'])}"
    else:
        source = (f"image={letter['image']}" if "image" in letter
                  else f"data={letter.get('data', '?')}")
    return (f"{entry_id}\tjob {letter.get('id', letter.get('entry_id', '?'))}\t"
            f"{letter.get('deliveries', '?')} deliveries\t{source}\t"
            f"{error.get('code', '?')}: {error.get('message', '')}")
