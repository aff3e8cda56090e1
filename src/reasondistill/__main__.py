"""`python -m reasondistill …`: the CLI, as `accelerate launch -m reasondistill …` and torchrun start it."""

from .cli import main

main()
