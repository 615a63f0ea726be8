#!/usr/bin/env python
"""PICO inference from the command line; see `python infer.py --help`."""
import sys

from pico_jax.infer import main

if __name__ == "__main__":
    sys.exit(main())
