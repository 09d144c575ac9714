"""Run mamo from a checkout: ``python cli.py <command>`` is the same as the ``mamo`` console script."""

from mamo.cli import run

if __name__ == "__main__":
    run()
