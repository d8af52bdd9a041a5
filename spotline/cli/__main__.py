"""`python -m spotline.cli`."""

from spotline.cli import main

main()
