"""``python -m clipstream.streams.ops.cli``: the ``clipstream`` command, for child processes
started with the running interpreter (streams/runtime/processes.py)."""

from clipstream.streams.ops.cli import main

main()
