"""`python -m tinygrad_llm ...` runs the `tinygrad-llm` command line."""
import sys

from .cli import main

sys.exit(main())
