"""IMAP mail source: backfill and catch-up by UID cursor, then IDLE; exactly-once storage.

For each folder: SELECT, compare UIDVALIDITY with the stored one (a change restarts the
cursor and dedupes the rescan, see :mod:`storage.ingest`), then fetch the UIDs above the
cursor in batches of ``fetch_batch`` with ``BODY.PEEK[]`` (which never sets \\Seen),
INTERNALDATE and FLAGS, parse them, and commit each batch together with the advanced
cursor. Fetching, parsing and committing overlap (the next batch is fetched and the
previous one committed while one is parsed); with ``parse_workers`` > 1 big backfills
also parse in a process pool.

    >>> src = ImapMailSource(db, account="support", connector=Connector(...),
    ...                      folders=["INBOX"])                      # doctest: +SKIP
    >>> src.sync()              # one pass over every folder: number of messages stored
    12
    >>> stop = threading.Event()
    >>> src.watch("INBOX", stop, on_new=lambda n: print(n, "new"))   # until stop.set()
"""

from __future__ import annotations

import imaplib
import random
import socket
import ssl
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError

from agent.logs import get_logger
from agent.mail.auth import Connector, close_quietly
from agent.mail.errors import FolderNotFound, MailAuthError, MailError
from agent.mail.parse import content_hash, parse_email
from storage import ingest
from storage.db import Database
from storage.types import Email

# Errors after which reconnecting may help. Auth errors are not among them: retrying a
# wrong password only gets the account locked.
NETWORK_ERRORS = (OSError, socket.timeout, ssl.SSLError, imaplib.IMAP4.abort,
                  imaplib.IMAP4.error, IMAPClientError, EOFError)
FETCH_ITEMS = [b"BODY.PEEK[]", b"INTERNALDATE", b"FLAGS"]


@dataclass(frozen=True)
class FolderSync:
    """What one pass over one folder did."""

    folder: str
    uidvalidity: int
    stored: int
    remapped: int
    last_uid: int
    reset: bool          # UIDVALIDITY changed: the pass was a deduplicating rescan


class ImapMailSource:
    """One account's folders. Implements :class:`agent.protocols.MailSource`."""

    def __init__(self, db: Database, *, account: str, connector: Connector,
                 folders: Sequence[str] = ("INBOX",), fetch_batch: int = 100,
                 poll_interval_s: float = 30.0, idle_timeout_s: float = 25 * 60,
                 parse_workers: int = 0, pool_threshold: int = 400,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 300.0):
        self.db = db
        self.account = account
        self.connector = connector
        self.folders = list(folders)
        self.fetch_batch = fetch_batch
        self.poll_interval_s = poll_interval_s
        # RFC 2177: servers may drop an IDLE after 30 minutes; re-issue it before that.
        self.idle_timeout_s = min(idle_timeout_s, 29 * 60)
        # 0 parses inline. Parsing costs ~0.35 ms of CPU a message, about what fetching
        # and committing cost together, so a pool only pays on an otherwise idle
        # multi-core machine (see scripts/bench/ingest --parse-workers).
        self.parse_workers = parse_workers
        self.pool_threshold = pool_threshold
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.log = get_logger(component="mail", account=account)
        self.last_results: list[FolderSync] = []

    # -- MailSource ----------------------------------------------------------------------

    def sync(self) -> int:
        """One pass over every folder on one connection; returns how many were stored."""
        client = self.connector.connect()
        try:
            self.last_results = [self.sync_folder(client, f) for f in self.folders]
        finally:
            close_quietly(client)
        return sum(r.stored for r in self.last_results)

    # -- one folder ----------------------------------------------------------------------

    def sync_folder(self, client: IMAPClient, folder: str) -> FolderSync:
        """Catch ``folder`` up from its cursor (the client is left with it selected)."""
        log = self.log.bind(folder=folder)
        try:
            info = client.select_folder(folder, readonly=True)
        except IMAPClientError as e:
            if "NONEXISTENT" in str(e).upper() or "doesn't exist" in str(e).lower():
                raise FolderNotFound(f"folder {folder!r} does not exist on account "
                                     f"{self.account}; fix the account's folders list") from e
            raise
        uidvalidity = int(info[b"UIDVALIDITY"])
        cur = ingest.folder_cursor(self.db, self.account, folder,
                                   host=self.connector.host, user=self.connector.user)
        reset = False
        if cur.uidvalidity != uidvalidity:
            if cur.uidvalidity is not None:
                log.warning("UIDVALIDITY changed: rescanning the folder with deduplication",
                            old=cur.uidvalidity, new=uidvalidity)
                reset = True
            cur = ingest.set_uidvalidity(self.db, cur.mailbox_id, uidvalidity)
        dedupe = ingest.has_older_generation(self.db, cur.mailbox_id, uidvalidity)
        # "N:*" always returns the highest UID, even when it is below N: filter.
        uids = sorted(u for u in client.search(["UID", f"{cur.last_uid + 1}:*"])
                      if u > cur.last_uid)
        if not uids:
            ingest.touch(self.db, cur.mailbox_id)
            return FolderSync(folder, uidvalidity, 0, 0, cur.last_uid, reset)
        batches = [uids[i:i + self.fetch_batch] for i in range(0, len(uids), self.fetch_batch)]
        stored, remapped = self._pipeline(client, cur.mailbox_id, uidvalidity, batches, dedupe)
        log.info("folder synced", stored=stored, remapped=remapped, last_uid=uids[-1],
                 uidvalidity=uidvalidity)
        return FolderSync(folder, uidvalidity, stored, remapped, uids[-1], reset)

    def _pipeline(self, client: IMAPClient, mailbox: int, uidvalidity: int,
                  batches: list[list[int]], dedupe: bool) -> tuple[int, int]:
        """Fetch batch n+1 and commit batch n-1 while batch n is parsed.

        Fetching waits on the server and committing on SQL I/O, both outside the GIL, so
        three stages overlap on a busy machine. Commits stay in order on one thread, and
        after a failed commit no later batch is committed: the cursor never skips a batch.
        """
        if len(batches) == 1:
            # The usual IDLE catch-up: a few messages, no threads worth starting.
            fetched = _fetch(client, batches[0])
            return self._commit(mailbox, uidvalidity, fetched,
                                _parse_many([f[1] for f in fetched]), batches[0][-1], dedupe)
        pool = self._pool() if sum(map(len, batches)) >= self.pool_threshold else None
        fetcher = ThreadPoolExecutor(1, thread_name_prefix="imap-fetch")
        committer = ThreadPoolExecutor(1, thread_name_prefix="ingest-commit")
        failed: list[BaseException] = []

        def commit(fetched: list, parsed: Future | list[Email], last_uid: int) -> tuple[int, int]:
            if failed:
                raise RuntimeError("an earlier batch failed to commit") from failed[0]
            try:
                return self._commit(mailbox, uidvalidity, fetched, parsed, last_uid, dedupe)
            except BaseException as e:
                failed.append(e)
                raise

        stored = remapped = 0
        pending: list[Future] = []
        try:
            next_fetch = fetcher.submit(_fetch, client, batches[0])
            for i, chunk in enumerate(batches):
                fetched = next_fetch.result()
                if i + 1 < len(batches):
                    next_fetch = fetcher.submit(_fetch, client, batches[i + 1])
                raws = [raw for _uid, raw, _d, _f in fetched]
                parsed: Future | list[Email] = (
                    pool.submit(_parse_many, raws) if pool else _parse_many(raws))
                pending.append(committer.submit(commit, fetched, parsed, chunk[-1]))
                while len(pending) > 2 or (pending and pending[0].done()):
                    s, r = pending.pop(0).result()      # raises a commit's error here
                    stored, remapped = stored + s, remapped + r
            for f in pending:
                s, r = f.result()
                stored, remapped = stored + s, remapped + r
        finally:
            failed.append(RuntimeError("ingest pass ended"))   # commit nothing queued after
            fetcher.shutdown(wait=True, cancel_futures=True)
            committer.shutdown(wait=True, cancel_futures=True)
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        return stored, remapped

    def _commit(self, mailbox: int, uidvalidity: int, fetched: list,
                parsed: Future | list[Email], last_uid: int, dedupe: bool) -> tuple[int, int]:
        emails = parsed.result() if isinstance(parsed, Future) else parsed
        batch = [ingest.FetchedMessage(uid=uid, raw=raw, content_hash=content_hash(raw),
                                       email=e, internal_date=date, flags=flags)
                 for (uid, raw, date, flags), e in zip(fetched, emails)]
        res = ingest.store_batch(self.db, mailbox, uidvalidity, batch, last_uid=last_uid,
                                 dedupe_older=dedupe)
        return res.stored, res.remapped

    def _pool(self) -> ProcessPoolExecutor | None:
        if self.parse_workers <= 1:
            return None
        import multiprocessing as mp

        # fork only while single-threaded: in the daemon (watchers, worker threads) a
        # fork can deadlock the child on a lock held at fork time, so use forkserver.
        if threading.active_count() == 1:
            ctx = mp.get_context("fork")
        else:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["agent.mail.parse"])
        return ProcessPoolExecutor(max_workers=self.parse_workers, mp_context=ctx)

    # -- watching ------------------------------------------------------------------------

    def watch(self, folder: str, stop: threading.Event,
              on_new: Callable[[int], None] | None = None) -> None:
        """Keep ``folder`` caught up until ``stop`` is set: IDLE, or polling without it.

        Catches up at once after every (re)connect, so nothing that arrived while the
        connection was down is missed. Network and server errors reconnect with
        exponential backoff and jitter; a rejected login raises (retrying cannot fix it).
        ``on_new(n)`` is called after each pass that stored ``n > 0`` messages.
        """
        log = self.log.bind(folder=folder)
        delay = self.backoff_initial_s
        while not stop.is_set():
            client = None
            try:
                client = self.connector.connect()
                self._catch_up(client, folder, on_new)
                delay = self.backoff_initial_s   # connected and caught up: healthy again
                if client.has_capability("IDLE"):
                    self._idle_loop(client, folder, stop, on_new)
                else:
                    while not stop.wait(self.poll_interval_s):
                        self._catch_up(client, folder, on_new)
            except MailAuthError:
                raise
            except (MailError, ingest.StaleCursor, *NETWORK_ERRORS) as e:
                wait = random.uniform(0.5, 1.0) * delay   # jitter: no thundering herd
                log.warning("folder watch interrupted; reconnecting",
                            error=f"{type(e).__name__}: {e}", retry_in_s=round(wait, 2))
                delay = min(delay * 2, self.backoff_max_s)
                stop.wait(wait)
            finally:
                if client is not None:
                    close_quietly(client)

    def _catch_up(self, client: IMAPClient, folder: str,
                  on_new: Callable[[int], None] | None) -> int:
        res = self.sync_folder(client, folder)
        if res.stored and on_new is not None:
            on_new(res.stored)
        return res.stored

    def _idle_loop(self, client: IMAPClient, folder: str, stop: threading.Event,
                   on_new: Callable[[int], None] | None) -> None:
        while not stop.is_set():
            if _exists_seen(client):
                # Mail arrived while the catch-up ran: the server reported it then (as an
                # untagged EXISTS next to SEARCH/FETCH) and will not repeat it in IDLE.
                self._catch_up(client, folder, on_new)
                continue
            client.idle()
            started = time.monotonic()
            changed = False
            try:
                while not stop.is_set() and time.monotonic() - started < self.idle_timeout_s:
                    # Short checks so a stop request is honoured within a second.
                    responses = client.idle_check(timeout=1.0)
                    if any(_is_change(r) for r in responses):
                        changed = True
                        break
            finally:
                client.idle_done()
            if changed or not stop.is_set():
                self._catch_up(client, folder, on_new)


def _exists_seen(client: IMAPClient) -> bool:
    # imaplib files untagged responses that arrive with other commands here; SELECT
    # flushes them, so any EXISTS present was reported after the last catch-up's SELECT.
    return bool(client._imap.untagged_responses.get("EXISTS"))  # noqa: SLF001


def _is_change(response: tuple) -> bool:
    # EXISTS means new mail; RECENT and FETCH (flag changes) do not need a fetch, but a
    # server that only sends RECENT is rare enough to treat as a change too.
    return len(response) >= 2 and response[1] in (b"EXISTS", b"RECENT")


def _fetch(client: IMAPClient, uids: list[int]) -> list[tuple[int, bytes, object, tuple]]:
    data = client.fetch(uids, FETCH_ITEMS)
    out = []
    for uid in uids:
        item = data.get(uid)
        if item is None:
            continue   # expunged between SEARCH and FETCH
        raw = item.get(b"BODY[]") or b""
        flags = tuple(f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f)
                      for f in item.get(b"FLAGS", ()))
        out.append((uid, raw, item.get(b"INTERNALDATE"), flags))
    return out


def _parse_many(raws: list[bytes]) -> list[Email]:
    return [parse_email(r) for r in raws]
