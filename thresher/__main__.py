"""`python -m thresher` is the CLI (torchrun launches modules this way)."""

from thresher.cli import main

if __name__ == "__main__":
    main()
