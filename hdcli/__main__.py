"""``python -m hdcli`` (and ``accelerate launch -m hdcli`` / ``torchrun -m hdcli``) runs the CLI."""

from hdcli.cli import main

if __name__ == "__main__":
    main()
