"""`python -m ttt_helpers.train`: the training command line (`cli.main`)."""

from .cli import main

if __name__ == "__main__":
    main()
