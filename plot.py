"""Draw a run's loss plot, OUT/loss.png, from its OUT/metrics.jsonl: at any time, while it runs or
after (say, for a run trained before matplotlib was installed). train.py draws it as it goes.

    python plot.py out
"""
import common  # noqa: F401  (first: Ctrl-C while torch loads is one line, see common.py)
import argparse
import os

from common import check_writable_folder, run_main
from metrics import METRICS, PLOT, plot_losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the folder of a train.py run (its --out)")
    args = p.parse_args(argv)
    metrics_path, png_path = os.path.join(args.out, METRICS), os.path.join(args.out, PLOT)
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"nothing to plot: {metrics_path} does not exist (train.py writes it at every "
                                "evaluation)")
    with open(metrics_path) as f:
        if not f.read().strip():
            raise ValueError(f"nothing to plot: {metrics_path} is empty (the run stopped before its first evaluation)")
    check_writable_folder(args.out)
    if not plot_losses(metrics_path, png_path):
        raise ValueError("matplotlib is not installed; pip install matplotlib, then run this again")
    print(f"wrote {png_path}")


if __name__ == "__main__":
    run_main(main)
