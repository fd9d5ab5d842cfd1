"""What the experiment scripts share: an argument parser whose errors are one line and exit status 2."""
import argparse
import sys


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line naming the option, exit status 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
