from deepdark.cli import entry

entry()
