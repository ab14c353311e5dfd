"""``python -m sentio_lab.evaluate CHECKPOINT [--dataset FILE] [--range validation|test|all] [--output DIR]``:
the demo-style report of a checkpoint against buy-and-hold (:mod:`sentio_lab.evaluation.agent_report`) and its
printed summary; errors are one line and a non-zero exit. The evaluation library is
:mod:`sentio_lab.evaluation.episodes`; the variant table and hooks :mod:`sentio_lab.agents.variants`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m sentio_lab.evaluate``: the demo-style report of one checkpoint (module doc).

    Writes the report (HTML with embedded figures, PNGs, stats, meta, data quality) to ``--output``, by default a
    folder next to the checkpoint, and prints the summary against buy-and-hold. A missing or damaged checkpoint,
    a dataset that does not fit it, or a range too short to evaluate is one line on stderr and exit status 1.
    """
    from sentio_lab.evaluation.agent_report import RANGES, write_checkpoint_report

    parser = argparse.ArgumentParser(
        prog="python -m sentio_lab.evaluate",
        description="Evaluate a checkpoint greedily over a range, net of costs, against buy-and-hold, and write "
                    "the demo-style report (report.html, equity.png, drawdown.png, stats.csv / .md, meta.json).",
    )
    parser.add_argument("checkpoint", help="checkpoint file written by a variant (checkpoint.pt)")
    parser.add_argument("--dataset", default=None,
                        help="apply the model to this CSV / Parquet file or bundled dataset instead of the one it "
                             "was trained on (loaded whole; its features use the checkpoint's training statistics)")
    parser.add_argument("--range", dest="range_name", choices=RANGES, default="test",
                        help="bars to evaluate: the validation or test range of the chronological split, or all "
                             "bars (the training range included: in-sample) (default: test)")
    parser.add_argument("--output", default=None,
                        help="report folder (default: report_<range>[_<dataset>] next to the checkpoint)")
    args = parser.parse_args(argv)
    try:
        comparison, paths = write_checkpoint_report(args.checkpoint, dataset=args.dataset,
                                                    range_name=args.range_name, output=args.output)
    # CheckpointError and data errors are ValueErrors; RuntimeError: the replay check (or weights that do not fit)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"error: {message}") from err
    print(comparison.describe())
    print(f"report: {paths['html'].parent}")


if __name__ == "__main__":
    main()
