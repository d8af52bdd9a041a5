"""`python -m spotline` is the `spotline` command."""

from spotline.cli import main

main()
