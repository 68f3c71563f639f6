"""Same as `moekit bench layer ARGS...`: python benchmarks/bench_layer.py --quick"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", *sys.argv[1:]]))
