"""The commands: each a short recipe over the library beside this folder (parse, build, run,
publish). `cli.py` parses options and calls one of them; no command imports another."""
