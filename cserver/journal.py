"""The append-only journal: a twisted.logger observer that makes records durable.

The server emits its events through a :class:`twisted.logger.Logger` whose
observer is a journal.  An event that carries ``cserver_event`` becomes one
JSON Lines record; an event that also carries ``cserver_ack`` is acknowledged
through that callable -- ``ack(seq, None)`` once the record is durable under
the journal's fsync mode, or ``ack(None, reason)`` when it could not be
written (then it is not in the journal).

Records are batched per reactor turn (group commit): every record taken
during one turn goes out in one ``write(2)`` and, with ``fsync="always"``,
is acknowledged only after an ``fdatasync(2)`` that started after that write
(one sync often covers several batches).

With ``--workers``, each process appends to the one file through a
:class:`SharedFileJournal`, which numbers each batch when it writes it, under
the file's lock, from a header in shared memory.

:meth:`FileJournal.reopen` (SIGHUP) moves the journal to a new file at its
path once the old one was renamed away (log rotation); ``seq`` continues and
the new file starts with a ``reopen`` record.

Nothing here knows about sockets; :mod:`cserver.recovery` reads a journal
back at start.
"""

import errno
import fcntl
import os
import threading
from collections import deque
from contextlib import suppress
from json import dumps, loads
from json.encoder import encode_basestring as _quote
from time import perf_counter, time

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger, LogLevel
from zope.interface import Attribute, Interface, implementer

from cserver.recovery import Recovery, create_durably, fsync_directory, recover

FSYNC_MODES = ("always", "interval", "never")

#: The event key naming the record's kind: message, auth_failed, start, stop.
EVENT = "cserver_event"
#: The event key holding the acknowledgement callable ``ack(seq, reason)``.
ACK = "cserver_ack"
#: The event key holding extra fields of a record other than a message.
FIELDS = "cserver_fields"
#: How a message event reads in a text log.
MESSAGE_FORMAT = "server recvd message {text!r} from user {user}"

_log = Logger()


class JournalLogger(Logger):
    """
    A Logger for the journal's events, lean enough for one event per
    message: its ``emit`` skips the validation of the level (callers pass
    :class:`LogLevel` constants) and the trace bookkeeping, and otherwise
    makes the same event; :meth:`message` makes a message's event in one
    step.
    """

    def emit(self, level, format=None, **kwargs):
        kwargs["log_logger"] = self
        kwargs["log_level"] = level
        kwargs["log_namespace"] = self.namespace
        kwargs["log_source"] = self.source
        kwargs["log_format"] = format
        kwargs["log_time"] = time()
        self.observer(kwargs)

    def record(self, kind, fields, format):
        """
        Emit, at level info, a record other than a message (``start``,
        ``stop``, ``totals``...) with ``fields``; the Deferred fires with its
        seq once it is durable, or fails with OSError.
        """
        d = Deferred()

        def ack(seq, reason):
            if reason is None:
                d.callback(seq)
            else:
                d.errback(OSError(reason))

        self.emit(LogLevel.info, format, **{EVENT: kind, FIELDS: fields, ACK: ack}, **fields)
        return d

    def message(self, user, text, peer, ack):
        """
        Emit, at level info, the event of a message record: what
        ``emit(LogLevel.info, MESSAGE_FORMAT, cserver_event="message",
        cserver_ack=ack, user=user, text=text, peer=peer)`` emits.
        """
        self.observer(
            {
                EVENT: "message",
                ACK: ack,
                "user": user,
                "text": text,
                "peer": peer,
                "log_logger": self,
                "log_level": LogLevel.info,
                "log_namespace": self.namespace,
                "log_source": self.source,
                "log_format": MESSAGE_FORMAT,
                "log_time": time(),
            }
        )


class IJournal(Interface):
    """
    An append-only record store fed as a twisted.logger observer.
    """

    last_seq = Attribute("The seq of the newest record taken (written or not yet).")
    broken = Attribute("None, or why the journal takes no more records until restart.")

    def __call__(event):
        """
        Take one log event (:class:`twisted.logger.ILogObserver`).  Events
        without ``cserver_event`` are ignored.
        """

    def flush():
        """
        Write (and, by the fsync mode, sync) every record taken so far and
        acknowledge them now, rather than at the end of the reactor turn.
        """

    def close():
        """
        Flush, stop any periodic sync and release the storage.
        """


class _BatchingJournal:
    """
    Seq assignment, record formatting and group commit, over a storage that
    subclasses provide with ``_append(data)``, ``_sync()`` and
    ``_truncate(size)``.

    With ``fsync="always"`` a *syncer* makes written batches durable: by
    default :class:`InlineSyncer`, which syncs at once in the reactor thread;
    :class:`SyncThread` syncs in a thread of its own, so the reactor goes on
    reading requests and writing the next batch while the disk syncs, and
    one sync covers every batch written meanwhile; :class:`AutoSyncer` uses
    the first while syncs are quick and the second while they are slow.
    """

    def __init__(self, clock, last_seq=0, size=0, fsync="always", sync_interval=1.0,
                 syncer=None, messages=0):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        self._clock = clock
        self._fsync = fsync
        self.last_seq = last_seq
        self.size = size
        # Message records written, all time (what recovery counted, then each
        # batch written); _batch_messages counts those taken since the last flush.
        self.messages = messages
        self._batch_messages = 0
        # While a reopen waits for the old file to be durable, batches are
        # held back (taken, numbered, not written): see FileJournal.reopen.
        self._holding = False
        self._close_requested = False
        self.broken = None
        self._lines = []
        self._acks = []
        self._flush_call = None
        self._dirty = False
        self._sync_call = None
        self._closed = False
        self._closing = False
        # Batches written and not yet durable: (first_seq, last_seq, start, acks).
        self._unsynced = deque()
        self._syncer = syncer or InlineSyncer()
        self._syncer.bind(self._sync, self._durable, self._sync_failed)
        self._pid = os.getpid()
        self._quoted = {}
        if fsync == "interval":
            self._sync_call = clock.callLater(sync_interval, self._periodic_sync, sync_interval)

    # -- the observer -------------------------------------------------------

    def __call__(self, event):
        kind = event.get(EVENT)
        if kind is None:
            return
        ack = event.get(ACK)
        if self.broken is not None or self._closed:
            if ack is not None:
                _call(ack, None, self.broken or "journal closed")
            return
        seq = self.last_seq + 1
        try:
            if kind == "message":
                quoted = self._quoted
                user = event["user"]
                peer = event["peer"]
                line = (
                    f'{{"seq":{seq},"time":{event["log_time"]!r},"event":"message",'
                    f'"pid":{self._pid},"user":{quoted.get(user) or self._quote(user)},'
                    f'"text":{_quote(event["text"])},'
                    f'"peer":{quoted.get(peer) or self._quote(peer)}}}\n'
                ).encode()
                self._batch_messages += 1
            else:
                line = self._format(seq, kind, event)
        except Exception:
            _log.failure("journal: cannot make a {kind} record", kind=kind)
            if ack is not None:
                _call(ack, None, "record cannot be encoded")
            return
        self.last_seq = seq
        self._lines.append(line)
        if ack is not None:
            self._acks.append((seq, ack))
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush_turn)

    def _quote(self, value):
        """
        ``value`` as a JSON string, remembered: user names and peers recur.
        """
        quoted = self._quoted
        if len(quoted) >= 4096:
            quoted.clear()
        result = quoted[value] = _quote(value)
        return result

    def _format(self, seq, kind, event):
        """
        A record other than a message, as a UTF-8 JSON line.
        """
        return b'{"seq":%d,' % seq + self._format_tail(kind, event)

    def _format_tail(self, kind, event):
        """
        A record other than a message, as a UTF-8 JSON line without its
        leading ``{"seq":N,``.
        """
        head = f'"time":{event["log_time"]!r},"event":"{kind}","pid":{self._pid}'
        fields = event.get(FIELDS)
        if fields:
            body = dumps(fields, ensure_ascii=False, separators=(",", ":"))
            line = f"{head},{body[1:]}\n"
        else:
            line = head + "}\n"
        return line.encode("utf-8")

    def _flush_turn(self):
        self._flush_call = None
        self.flush()

    def flush(self):
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        if not self._lines or self._holding:
            return
        data = b"".join(self._lines)
        acks = self._acks
        count = len(self._lines)
        messages = self._batch_messages
        self._lines = []
        self._acks = []
        self._batch_messages = 0
        first_seq = self.last_seq - count + 1
        start = self.size
        if self.broken is not None or self._closed:
            self.last_seq = first_seq - 1
            _fail(acks, self.broken or "journal closed")
            return
        try:
            self._append(data)
        except OSError as e:
            reason = f"write failed: {_describe(e)}"
            self._undo(start, first_seq, reason)
            _log.error(
                "journal: {count} records not written ({reason})", count=count, reason=reason
            )
            _fail(acks, reason)
            return
        self.size = start + len(data)
        self.messages += messages
        if self._fsync != "always":
            self._dirty = True
            _succeed(acks)
            return
        self._unsynced.append((first_seq, self.last_seq, start, acks))
        self._syncer.request(self.last_seq)

    def _durable(self, seq):
        """
        Everything up to ``seq`` is synced: acknowledge it.
        """
        unsynced = self._unsynced
        while unsynced and unsynced[0][1] <= seq:
            _succeed(unsynced.popleft()[3])
        if self._closing and not unsynced:
            self._finish_close()

    def _sync_failed(self, seq, error):
        """
        An fsync failed: what it covered cannot be trusted to be on disk.
        Cut off (best effort) and refuse everything not yet acknowledged,
        and refuse every record after.
        """
        if not isinstance(error, OSError):
            _log.error("journal: sync failed unexpectedly: {error!r}", error=error)
            error = OSError(0, repr(error))
        reason = f"fsync failed: {_describe(error)}"
        unsynced, self._unsynced = self._unsynced, deque()
        if unsynced:
            first_seq, _last_seq, start, _acks = unsynced[0]
            self._undo(start, first_seq, reason)
            self.size = start
        self.broken = self.broken or reason
        _log.critical("journal: {reason}; no more records are taken until restart", reason=reason)
        for _first, _last, _start, acks in unsynced:
            _fail(acks, reason)
        if self._closing:
            self._finish_close()

    def _undo(self, start, first_seq, reason):
        """
        Cut a failed batch off the storage so that it stays a valid journal.
        """
        self.last_seq = first_seq - 1
        try:
            self._truncate(start)
        except OSError as e:
            self.broken = f"{reason}; truncate failed: {_describe(e)}"
            _log.critical("journal: {reason}", reason=self.broken)

    def _periodic_sync(self, interval):
        self._sync_call = self._clock.callLater(interval, self._periodic_sync, interval)
        self.sync()

    def sync(self):
        """
        Sync what is written, if anything is not yet synced.
        """
        if not self._dirty or self.broken is not None:
            return
        self._dirty = False
        try:
            self._sync()
        except OSError as e:
            self.broken = f"fsync failed: {_describe(e)}"
            _log.critical(
                "journal: {reason}; no more records are taken until restart",
                reason=self.broken,
            )

    def close(self):
        if self._closed:
            return
        if self._holding:
            # A reopen waits for the old file to be durable: close once the
            # records it holds are written to the new file.
            self._close_requested = True
            return
        while self._lines:
            # An ack may emit the next record (a pipelined MSG): take it too.
            self.flush()
        self._closed = True
        if self._unsynced:
            self._closing = True
            return
        self._finish_close()

    def _finish_close(self):
        self._closing = False
        self._syncer.stop()
        self.sync()
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._sync_call = None
        self._release()

    def _release(self):
        pass


class InlineSyncer:
    """
    Sync each written batch at once, in the reactor thread.

    A syncer is bound to a journal's ``sync()``, ``durable(seq)`` and
    ``failed(seq, error)``; the journal calls ``request(seq)`` when it is
    written up to ``seq`` and ``stop()`` when it closes.
    """

    def bind(self, sync, durable, failed):
        self._sync = sync
        self._durable = durable
        self._failed = failed

    def request(self, seq):
        """
        The journal is written up to ``seq``: make it durable.
        """
        try:
            self._sync()
        except OSError as e:
            self._failed(seq, e)
            return
        self._durable(seq)

    def stop(self):
        pass


class SyncThread:
    """
    Sync in a thread of its own: while the file is written further than it
    is synced, fdatasync again, and report through the reactor how far is
    durable.  The reactor never waits for the disk, and no sync waits for the
    reactor to hear of the one before it.  The thread starts with the first
    request (so after twistd has daemonized) and ends at ``stop()``.

    @param call_from_thread: ``reactor.callFromThread``.
    """

    def __init__(self, call_from_thread):
        self._call_from_thread = call_from_thread
        self._condition = threading.Condition()
        self._wanted = 0
        self._stopping = False
        self._thread = None

    def bind(self, sync, durable, failed):
        self._sync = sync
        self._durable = durable
        self._failed = failed

    def request(self, seq):
        with self._condition:
            self._wanted = seq
            self._condition.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cserver-journal-sync",
                                            daemon=True)
            self._thread.start()

    def stop(self):
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self):
        done = 0
        while True:
            with self._condition:
                while self._wanted == done and not self._stopping:
                    self._condition.wait()
                if self._wanted == done:
                    return
                target = self._wanted
            try:
                self._sync()
            except BaseException as e:  # reported, and the journal refuses from now on
                self._call_from_thread(self._failed, target, e)
                return
            done = target
            self._call_from_thread(self._durable, target)


class AutoSyncer:
    """
    Sync in the reactor thread while syncs are quick, in a :class:`SyncThread`
    while they are slow.

    In the reactor a sync costs no handoff between threads, and on a disk
    that syncs in a fraction of a millisecond that is the faster way; but
    the reactor serves nobody while it waits, so on a slow disk the thread
    is faster, and keeps other clients served.  Each sync's duration feeds a
    moving average (weight 1/5 for the newest); a request goes to the thread
    while that average is over ``slow`` seconds, or while the reactor has not
    yet heard the thread report on everything asked of it.  So the two never
    sync at once, a reopen's swap of the file never races a sync, and the
    journal hears of every batch in order: an inline sync that failed could
    otherwise refuse a batch that the thread had already synced.

    @param call_from_thread: ``reactor.callFromThread``.
    @param timer: seconds, for timing each sync.
    """

    def __init__(self, call_from_thread, slow=0.002, timer=perf_counter):
        self.slow = slow
        self.average = 0.0
        self._timer = timer
        self._inline = InlineSyncer()
        self._thread = SyncThread(call_from_thread)
        # The last seq asked of the thread, and the last it reported durable.
        self._asked = 0
        self._reported = 0

    def bind(self, sync, durable, failed):
        self._sync = sync
        self._durable = durable
        self._inline.bind(self._timed_sync, durable, failed)
        self._thread.bind(self._timed_sync, self._thread_durable, failed)

    def _thread_durable(self, seq):
        self._reported = max(self._reported, seq)
        self._durable(seq)

    def _timed_sync(self):
        start = self._timer()
        try:
            self._sync()
        finally:
            self.average += (self._timer() - start - self.average) / 5

    def in_thread(self):
        """
        Whether the next request goes to the thread.
        """
        return self.average > self.slow or self._reported < self._asked

    def request(self, seq):
        if self.in_thread():
            self._asked = seq
            self._thread.request(seq)
        else:
            self._inline.request(seq)

    def stop(self):
        self._thread.stop()


def _call(ack, seq, reason):
    """
    Acknowledge one record; a failing ack is logged and spares the others.
    """
    try:
        ack(seq, reason)
    except Exception:
        _log.failure("journal: acknowledging seq {seq} failed", seq=seq)


def _fail(acks, reason):
    for _seq, ack in acks:
        _call(ack, None, reason)


def _succeed(acks):
    # _call, inlined: this runs once per acknowledged message.
    for seq, ack in acks:
        try:
            ack(seq, None)
        except Exception:
            _log.failure("journal: acknowledging seq {seq} failed", seq=seq)


def _describe(error):
    name = errno.errorcode.get(error.errno, "error") if error.errno else "error"
    return f"{name} {error.strerror or error}"


@implementer(IJournal)
class FileJournal(_BatchingJournal):
    """
    A journal in a file, only ever appended to.

    Open it with :meth:`open`, which recovers the file first.  The
    ``_os_write``, ``_os_fdatasync`` and ``_os_ftruncate`` attributes are the
    system calls it uses; tests replace them to inject I/O errors.
    """

    _os_write = staticmethod(os.write)
    _os_fdatasync = staticmethod(os.fdatasync)
    _os_ftruncate = staticmethod(os.ftruncate)

    def __init__(self, path, fd, recovery, clock, fsync="always", sync_interval=1.0,
                 syncer=None):
        super().__init__(
            clock,
            last_seq=recovery.last_seq,
            size=recovery.size,
            fsync=fsync,
            sync_interval=sync_interval,
            syncer=syncer,
            messages=recovery.messages,
        )
        self.path = path
        self.recovery = recovery
        self._fd = fd
        # A reopen waiting for the old file to be durable; a reopen record
        # whose write to the new file failed, to be written again.
        self._reopen = None
        self._retry = None

    @classmethod
    def open(cls, path, clock, fsync="always", sync_interval=1.0, syncer=None):
        """
        Recover the journal at ``path`` (creating it, durably, if it does not
        exist) and open it for appending.

        @raise cserver.recovery.JournalDamaged: a record before the end of
            the file is damaged; the file is left as it was.
        """
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        recovery = recover(path)
        if recovery.created:
            fd = create_durably(path, os.O_WRONLY | os.O_APPEND)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(path, fd, recovery, clock, fsync=fsync, sync_interval=sync_interval,
                   syncer=syncer)

    def _append(self, data):
        view = memoryview(data)
        while view:
            written = self._os_write(self._fd, view)
            view = view[written:]

    def _sync(self):
        self._os_fdatasync(self._fd)

    def _truncate(self, size):
        self._os_ftruncate(self._fd, size)

    def _release(self):
        os.close(self._fd)

    # -- reopening (log rotation) -----------------------------------------------

    def reopen(self):
        """
        Reopen the journal at its path, after something (logrotate) renamed
        the file away: SIGHUP.

        1. If the path still names the open file, nothing was rotated: log
           it and fire with None.
        2. Create the new file at the path (an empty file already there,
           as logrotate's ``create`` leaves, is taken; a non-empty one is
           not) and fsync it and its directory.  If that fails, log it, go
           on writing the old file, and fail with the OSError.
        3. Write every record taken so far to the old file, and take a
           ``reopen`` record (``previous``: the old file's path now;
           ``previous_last_seq``; ``total``: message records, all time) as
           the first record for the new file.  Records taken from here on
           are numbered after it, and held.
        4. Once everything written to the old file is durable (a running
           :class:`SyncThread` sync is waited for, never cut short; the fd
           is swapped only while no sync is running or requested), sync it
           once more if the fsync mode left it unsynced, close it, and
           write the held batch, ``reopen`` record first, to the new file.

        @return: a Deferred that fires with the ``reopen`` record's seq once
            it is durable in the new file (or None, nothing rotated), or
            fails with OSError (the new file could not be made; an fsync of
            the old file failed; the journal is closed or broken).
        """
        if self._closed or self._closing or self._close_requested:
            return fail(OSError(errno.EBADF, "journal closed"))
        if self.broken is not None:
            return fail(OSError(errno.EIO, f"journal broken: {self.broken}"))
        if self._reopen is not None:
            # One at a time: this one is answered with the reopen under way.
            d = Deferred()
            self._reopen.waiters.append(d)
            return d
        if self._retry is not None:
            d = Deferred()
            self._retry.waiters.append(d)
            return d
        try:
            current = os.fstat(self._fd)
            there = os.stat(self.path)
        except FileNotFoundError:
            there = None
        except OSError as e:
            return self._reopen_failed(e)
        if there is not None and (there.st_dev, there.st_ino) == (current.st_dev,
                                                                   current.st_ino):
            _log.info("journal {path}: still the same file, nothing rotated: not reopened",
                      path=self.path)
            return succeed(None)
        try:
            fd, created = self._create_next()
        except OSError as e:
            return self._reopen_failed(e)
        previous = _fd_path(self._fd)
        while self._lines:
            # An ack may take the next record (a pipelined MSG): write it too.
            self.flush()
        if self.broken is not None:
            self._discard_next(fd, created)
            return fail(OSError(errno.EIO, f"journal broken: {self.broken}"))
        seq = self.last_seq + 1
        fields = {"previous": previous, "previous_last_seq": seq - 1, "total": self.messages}
        done = Deferred()
        reopen = self._reopen = _Reopen(fd, created, previous, seq, done)
        reopen.line = self._format(seq, "reopen", {"log_time": time(), FIELDS: fields})
        self.last_seq = seq
        self._lines.append(reopen.line)
        self._acks.append((seq, lambda seq, reason: self._reopen_acked(reopen, seq, reason)))
        self._holding = True
        if not self._unsynced:
            self._swap()
        return done

    def _create_next(self):
        """
        Create the next file at the path, durably; return its fd and whether
        it was created (rather than found empty).
        """
        flags = os.O_WRONLY | os.O_APPEND
        try:
            return create_durably(self.path, flags), True
        except FileExistsError:
            pass
        # An empty file left there (logrotate's "create") is taken as it is.
        fd = os.open(self.path, flags | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size:
                raise OSError(errno.EEXIST, f"{self.path} exists and is not empty")
            os.fsync(fd)
            fsync_directory(self.path)
        except BaseException:
            self._discard_next(fd, False)
            raise
        return fd, False

    def _discard_next(self, fd, created):
        os.close(fd)
        if created:
            with suppress(OSError):
                os.unlink(self.path)
                fsync_directory(self.path)

    def _reopen_failed(self, error):
        _log.error("journal {path}: cannot reopen ({reason}); still writing the old file",
                   path=self.path, reason=_describe(error))
        return fail(error)

    def _reopen_acked(self, reopen, seq, reason):
        """
        The ``reopen`` record is durable in the new file, or was refused.  A
        failed write (ENOSPC...) left the new file empty and the journal
        working: take the record again, first in the next batch, so that the
        new file still starts with it.
        """
        if (reason is not None and reason.startswith("write failed") and self.size == 0
                and not self._lines and self.broken is None and not self._closed):
            _log.warn("journal {path}: the reopen record was not written ({reason}); "
                      "it goes first in the next batch", path=self.path, reason=reason)
            self._retry = reopen
            seq = self.last_seq + 1
            reopen.seq = seq
            self.last_seq = seq
            self._lines.insert(0, b'{"seq":%d,' % seq + reopen.line.split(b",", 1)[1])
            self._acks.insert(0, (seq, lambda seq, reason: self._reopen_acked(reopen, seq,
                                                                              reason)))
            return
        self._retry = None
        reopen.fire(seq, reason)

    def _durable(self, seq):
        super()._durable(seq)
        if self._holding and not self._unsynced:
            self._swap()

    def _sync_failed(self, seq, error):
        super()._sync_failed(seq, error)
        if self._holding:
            self._swap()

    def _swap(self):
        """
        The old file is durable up to the ``reopen`` record (or the journal
        broke): move to the new file and write what was held.
        """
        reopen, self._reopen = self._reopen, None
        if self._dirty:
            self.sync()
        if self.broken is None:
            with suppress(OSError):  # everything in it is durable already
                os.close(self._fd)
            self._fd = reopen.fd
            self.size = 0
            _log.info("journal {path}: reopened at seq {seq}; the previous file, {previous}, "
                      "ends at seq {last}", path=self.path, seq=reopen.seq,
                      previous=reopen.previous, last=reopen.seq - 1)
        else:
            self._discard_next(reopen.fd, reopen.created)
        self._holding = False
        # Broken: the held records are refused, the reopen record's with them.
        self.flush()
        if self._close_requested:
            self._close_requested = False
            self.close()


class _Reopen:
    """
    A reopen under way: the new file, and who waits for its ``reopen``
    record (``seq``, formatted as ``line``) to be durable.
    """

    def __init__(self, fd, created, previous, seq, done):
        self.fd = fd
        self.created = created
        self.previous = previous
        self.seq = seq
        self.line = None
        self.waiters = [done]

    def fire(self, seq, reason):
        for d in self.waiters:
            if reason is None:
                d.callback(seq)
            else:
                d.errback(OSError(errno.EIO, reason))


def _fd_path(fd):
    """
    The path of the file open at ``fd`` now (after a rename: its new name),
    or None where /proc cannot tell.
    """
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    # A name that is not UTF-8 still makes a valid record.
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@implementer(IJournal)
class MemoryJournal(_BatchingJournal):
    """
    A journal kept in memory, for tests: ``data`` holds the bytes a file
    journal would hold.  Set ``fail_writes`` to an ``OSError`` to make
    writes fail, ``fail_syncs`` likewise for syncs.
    """

    def __init__(self, clock, fsync="always", recovery=None):
        recovery = recovery or Recovery()
        super().__init__(clock, last_seq=recovery.last_seq, size=0, fsync=fsync)
        self.recovery = recovery
        self.data = b""
        self.syncs = 0
        self.fail_writes = None
        self.fail_syncs = None

    def _append(self, data):
        if self.fail_writes is not None:
            raise self.fail_writes
        self.data += data

    def _sync(self):
        if self.fail_syncs is not None:
            raise self.fail_syncs
        self.syncs += 1

    def _truncate(self, size):
        self.data = self.data[:size]

    def records(self):
        """
        The records written so far, parsed.
        """
        return [loads(line) for line in self.data.splitlines()]


class _Refused(Exception):
    """
    A batch was not written; the file and the shared header are as before.
    """


@implementer(IJournal)
class SharedFileJournal(FileJournal):
    """
    One of several journals, in as many processes (``--workers``), appending
    to one file: a record gets its seq when its batch is written, from the
    journal header in shared memory (:class:`cserver.shared.Shared`), not
    when it is taken.

    Each batch is written under ``flock(LOCK_EX)`` on this journal's own open
    file description -- which is why :meth:`open` opens the file itself: an
    fd inherited from another process would share its lock and exclude
    nobody.  Under the lock:

    1. if the header's ``busy`` is set, the writer before was killed in the
       middle of a batch: if it was already publishing a whole batch
       (``commit_seq`` set) finish publishing it, else cut its partial batch
       off at ``end``;
    2. set ``busy`` to this pid, number the batch from ``last_seq + 1`` and
       ``pwrite`` it at ``end``;
    3. publish: ``commit_messages`` then ``commit_seq`` (from here on the
       batch stands), then ``end``, ``last_seq`` and ``messages``; clear
       ``commit_seq`` and ``busy``; unlock.

    The fdatasync runs outside the lock (in a :class:`SyncThread` per process
    for throughput): writes are serialized by the lock, so a sync that starts
    after this journal's write covers every batch written before it too.

    A failed write is cut back, still under the lock, and its records are
    refused; the header was not advanced.  A failed fdatasync sets the
    header's ``broken``, and every journal on that header then refuses
    records until restart.  Unlike :class:`FileJournal` nothing is cut off
    after a failed sync: batches of other processes written after this one's
    may already be acknowledged.

    ``last_seq`` is the header's: the seq of the newest record written by any
    process; records taken and not yet written have no seq yet.
    ``recovery`` is what :meth:`prepare` returned in the parent, or, in a
    worker, a :class:`Recovery` with the header's ``last_seq``, ``end`` and
    ``messages`` at open (and no ``records`` or ``users``).

    The ``_os_pwrite``, ``_os_fdatasync``, ``_os_ftruncate`` and ``_os_flock``
    attributes are the system calls it uses; tests replace them.
    """

    _os_pwrite = staticmethod(os.pwrite)
    _os_flock = staticmethod(fcntl.flock)

    def __init__(self, path, fd, recovery, clock, shared, fsync="always", sync_interval=1.0,
                 syncer=None):
        self._header = shared.header
        self._header_broken = shared.header.reader("broken")
        super().__init__(path, fd, recovery, clock, fsync=fsync, sync_interval=sync_interval,
                         syncer=syncer)
        # Message records among the records taken since the last flush.
        self._messages = 0

    @property
    def last_seq(self):
        return self._header.last_seq

    @last_seq.setter
    def last_seq(self, value):
        # _BatchingJournal keeps its own count; here the header is the count.
        pass

    @classmethod
    def prepare(cls, path, shared):
        """
        In the parent, before any journal is opened on ``shared``: recover
        the journal at ``path`` (creating it, durably, if it does not exist)
        and set the shared header from what recovery found.

        @return: the :class:`Recovery`.
        @raise cserver.recovery.JournalDamaged: a record before the end of
            the file is damaged; the file is left as it was.
        """
        recovery = recover(path)
        if recovery.created:
            os.close(create_durably(path, os.O_WRONLY))
        header = shared.header
        header.busy = 0
        header.commit_seq = 0
        header.commit_messages = 0
        header.broken = 0
        header.last_seq = recovery.last_seq
        header.end = recovery.size
        header.messages = recovery.messages
        return recovery

    @classmethod
    def open(cls, path, clock, shared, fsync="always", sync_interval=1.0, syncer=None,
             recovery=None):
        """
        Open the journal at ``path``, already prepared on ``shared``, for
        appending from this process (in a worker or in the parent).
        """
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if recovery is None:
            header = shared.header
            recovery = Recovery(size=header.end, last_seq=header.last_seq,
                                messages=header.messages)
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return cls(path, fd, recovery, clock, shared, fsync=fsync,
                       sync_interval=sync_interval, syncer=syncer)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self):
        """
        Not with ``--workers``: the parent ignores SIGHUP (see README).
        """
        return fail(OSError(errno.ENOTSUP, "reopening a shared journal is not supported"))

    # -- taking records: formatted without their seq --------------------------

    def __call__(self, event):
        kind = event.get(EVENT)
        if kind is None:
            return
        ack = event.get(ACK)
        if self.broken is not None or self._closed or self._header_broken():
            if ack is not None:
                _call(ack, None, self._refusal())
            return
        try:
            if kind == "message":
                # The base class's message line without its seq: spelled out
                # again so that each hot path stays one f-string.
                quoted = self._quoted
                user = event["user"]
                peer = event["peer"]
                tail = (
                    f'"time":{event["log_time"]!r},"event":"message",'
                    f'"pid":{self._pid},"user":{quoted.get(user) or self._quote(user)},'
                    f'"text":{_quote(event["text"])},'
                    f'"peer":{quoted.get(peer) or self._quote(peer)}}}\n'
                ).encode()
                self._messages += 1
            else:
                tail = self._format_tail(kind, event)
        except Exception:
            _log.failure("journal: cannot make a {kind} record", kind=kind)
            if ack is not None:
                _call(ack, None, "record cannot be encoded")
            return
        if ack is not None:
            # Its index in the batch: the seq is known once the batch is written.
            self._acks.append((len(self._lines), ack))
        self._lines.append(tail)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush_turn)

    def _refusal(self):
        """
        Why records are refused now; an fsync failure elsewhere breaks this
        journal too.
        """
        if self.broken is None and self._header_broken():
            self.broken = "fsync failed in another process"
        return self.broken or "journal closed"

    # -- writing a batch -----------------------------------------------------

    def flush(self):
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        if not self._lines:
            return
        tails, acks, messages = self._lines, self._acks, self._messages
        self._lines = []
        self._acks = []
        self._messages = 0
        if self.broken is not None or self._closed or self._header_broken():
            _fail(acks, self._refusal())
            return
        try:
            first, start, end = self._write_batch(tails, messages)
        except _Refused as e:
            _fail(acks, str(e))
            return
        last = first + len(tails) - 1
        acks = [(first + index, ack) for index, ack in acks]
        self.size = end
        if self._fsync != "always":
            self._dirty = True
            _succeed(acks)
            return
        self._unsynced.append((first, last, start, acks))
        self._syncer.request(last)

    def _write_batch(self, tails, messages):
        """
        Lock, repair, number, write and publish one batch of record tails.

        @return: the batch's first seq and the offsets where it starts and
            ends.
        @raise _Refused: the batch is not written.
        """
        fd = self._fd
        header = self._header
        try:
            self._os_flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            raise _Refused(f"write failed: cannot lock the journal: {_describe(e)}") from None
        try:
            if header.broken:
                raise _Refused(self._refusal())
            if header.busy:
                try:
                    self._repair(header)
                except OSError as e:
                    reason = f"write failed: cannot cut a dead writer's batch: {_describe(e)}"
                    _log.error("journal: {reason}", reason=reason)
                    raise _Refused(reason) from None
            header.busy = self._pid
            first = header.last_seq + 1
            start = header.end
            data = b"".join(
                [b'{"seq":%d,' % (first + index) + tail for index, tail in enumerate(tails)]
            )
            try:
                self._pwrite(data, start)
            except OSError as e:
                self._cut_failed_write(start, len(tails), f"write failed: {_describe(e)}")
            end = start + len(data)
            last = first + len(tails) - 1
            header.commit_messages = header.messages + messages
            header.commit_seq = last
            header.end = end
            header.last_seq = last
            header.messages = header.commit_messages
            header.commit_seq = 0
            header.busy = 0
            return first, start, end
        finally:
            self._os_flock(fd, fcntl.LOCK_UN)

    def _pwrite(self, data, offset):
        view = memoryview(data)
        while view:
            written = self._os_pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def _cut_failed_write(self, start, count, reason):
        """
        This journal's write failed: cut what it wrote off, and refuse the
        batch.  If even the cut fails, ``busy`` stays set, so that the next
        writer cuts it, and this journal takes no more records.
        """
        _log.error("journal: {count} records not written ({reason})", count=count,
                   reason=reason)
        try:
            self._os_ftruncate(self._fd, start)
        except OSError as e:
            self.broken = f"{reason}; truncate failed: {_describe(e)}"
            _log.critical("journal: {reason}", reason=self.broken)
            raise _Refused(reason) from None
        self._header.busy = 0
        raise _Refused(reason)

    def _repair(self, header):
        """
        The writer before was killed in the middle of a batch (``busy`` is
        still set).  If it had written its whole batch and was publishing it
        (``commit_seq`` set; the file then ends with that batch), finish
        publishing it; else cut its partial batch off at ``end``.
        """
        if header.commit_seq:
            header.end = os.fstat(self._fd).st_size
            header.last_seq = header.commit_seq
            header.messages = header.commit_messages
            header.commit_seq = 0
            _log.warn("journal: published the batch of writer {pid}, killed while publishing "
                      "it, up to seq {seq}", pid=header.busy, seq=header.last_seq)
        else:
            self._os_ftruncate(self._fd, header.end)
            _log.warn("journal: cut the unfinished batch of writer {pid} off at byte {end}",
                      pid=header.busy, end=header.end)

    # -- syncing ---------------------------------------------------------------

    def _sync(self):
        try:
            self._os_fdatasync(self._fd)
        except OSError:
            # At once, from the sync thread: every process refuses from now on.
            self._header.broken = 1
            raise

    def _sync_failed(self, seq, error):
        self._header.broken = 1
        super()._sync_failed(seq, error)

    def _undo(self, start, first_seq, reason):
        """
        Nothing is cut after a failed sync: batches of other processes after
        this journal's may already be acknowledged.  (A failed write is cut
        under the lock, by :meth:`_cut_failed_write`.)
        """
