"""`python -m archsae` (also what `torchrun -m archsae` runs)."""

from archsae.cli import main

main()
