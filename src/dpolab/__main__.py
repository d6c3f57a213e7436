from dpolab.cli import entry

raise SystemExit(entry())
