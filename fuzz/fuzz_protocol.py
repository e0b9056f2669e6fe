"""Coverage-guided fuzzing of the line protocol with atheris (libFuzzer).

Each input drives one server factory as tests/unit/test_fuzz.py builds it (a
MemoryJournal on a ``task.Clock``, the allow-list portal for alice and bob,
``--max-line`` 100) with 1-3 connections over StringTransport: an
``atheris.FuzzedDataProvider`` cuts the input into chunks, each handed to one
connection's ``dataReceived``, each followed by a journal turn or none (a
``clock.advance(0)`` whose flush succeeds, fails to write, or fails to sync).
The reference model in tests/protocol_model.py, the one the hypothesis tests
use, then checks that

- the protocol never raised and logged no failure;
- every reply line is well formed and CRLF-terminated (``HELLO cserver <v>``
  first, then ``OK...`` or ``ERR <code>...``), one per non-empty complete line
  until the connection closes, in request order, as docs/protocol.rst says;
- no ``message`` record is journaled unless an AUTH succeeded on that
  connection, and each is an acked MSG with its user, text and peer;
- the journal's seqs are contiguous from 1 and follow the order MSGs were taken.

A broken check raises, which atheris reports as a crash: it prints the
traceback, saves the input as ``crash-<sha1>`` and exits non-zero.  The
``cserver`` modules are instrumented for coverage (``instrument_imports``).

Run it from anywhere, with libFuzzer's flags; fuzz/protocol.dict is used
unless a ``-dict=`` is given::

    pip install atheris          # binary wheels: Linux x86_64, CPython 3.11-3.14
    python fuzz/fuzz_protocol.py -atheris_runs=100000
    python fuzz/fuzz_protocol.py -max_total_time=300 corpus/   # grows corpus/
    python fuzz/fuzz_protocol.py crash-<sha1>                  # replays one input
"""

import os
import sys

import atheris
from twisted.logger import globalLogBeginner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DICTIONARY = os.path.join(ROOT, "fuzz", "protocol.dict")
#: Connections per input, chunk size and steps (chunk + turn) per input.
MAX_CONNECTIONS = 3
MAX_CHUNK = 256
MAX_STEPS = 256

sys.path.insert(0, ROOT)
with atheris.instrument_imports(include=["cserver"]):
    from tests.protocol_model import TURNS, play

_TURNS = list(TURNS)  # PickValueInList takes a list only


def steps(provider, count):
    """(connection index, chunk, journal turn) triples until the input is used up."""
    for _ in range(MAX_STEPS):
        if not provider.remaining_bytes():
            return
        index = provider.ConsumeIntInRange(0, count - 1)
        chunk = provider.ConsumeBytes(provider.ConsumeIntInRange(1, MAX_CHUNK))
        yield index, chunk, provider.PickValueInList(_TURNS)


def TestOneInput(data):
    provider = atheris.FuzzedDataProvider(data)
    count = provider.ConsumeIntInRange(1, MAX_CONNECTIONS)
    play(count, steps(provider, count))


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if not any(arg.startswith("-dict=") for arg in argv[1:]):
        argv.append(f"-dict={DICTIONARY}")
    # Keep the journal's critical "fsync failed" events off stderr: each run
    # watches the log for failures itself (tests/protocol_model.play).
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
