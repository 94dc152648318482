"""Allow `python -m caprl_cli`."""

from caprl_cli.cli import main

if __name__ == "__main__":
    main()
