"""Draw the length reached against training step for several rnn_tasks.py runs on one plot.

Usage: python misc/plot_rnn.py RUN_DIR [RUN_DIR ...] --out misc/rnn_length.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiment.cli import Parser, run
from experiment.figures import draw_length_curves


def main():
    """Parse the run folders and draw."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="rnn_tasks.py run folders (with metrics.csv)")
    parser.add_argument("--out", default="misc/rnn_length.png", help="the PNG file")
    args = parser.parse_args()
    print(draw_length_curves(args.runs, args.out))


if __name__ == "__main__":
    run(main)
