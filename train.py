#!/usr/bin/env python
"""PICO training from the command line; see `python train.py --help`."""
import sys

from pico_jax.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
