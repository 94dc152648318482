"""Allow `python -m caprl_cli`."""

from caprl_cli.cli import main

main()
