"""Draw the seed's figures from run folders: classify_loss.png, grad_loss.png (log scale),
grad_cosine.png and test_acc.png, each run labelled by its method and model.

Usage: python misc/plot.py RUN_DIR [RUN_DIR ...] --out DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiment.cli import Parser, run
from experiment.figures import draw_figures


def main():
    """Parse the run folders and draw."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.csv)")
    parser.add_argument("--out", default="misc", help="folder for the PNG files")
    args = parser.parse_args()
    for path in draw_figures(args.runs, args.out):
        print(path)


if __name__ == "__main__":
    run(main)
