"""In-process tests: no subprocesses, no servers on sockets."""
