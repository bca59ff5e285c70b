"""``python -m hotpatch`` runs the command line."""

from .cli import main

main()
