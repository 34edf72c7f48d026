"""`crossblock report OUT`: per-block output error along depth, RTN vs the final model."""
from __future__ import annotations

from pathlib import Path

from .errors import CrossblockError
from .export.schema import check_report, read_json

PLOT_FILE = "error_by_block.png"


def read_report(out: Path) -> dict:
    path = Path(out) / "crossblock.json"
    if not path.is_file():
        raise CrossblockError(f"{out} has no crossblock.json: not a finished crossblock output")
    report = read_json(path)
    check_report(report, path)
    return report


def error_table(report: dict) -> str:
    rows = [f"{'block':>5}  {'rel. MSE':>10}  {'RTN rel. MSE':>12}  {'ratio':>6}  {'per-token':>10}"]
    for b in report["blocks"]:
        rtn = b.get("rtn", {}).get("rel_mse")
        rtn_text = "-" if rtn is None else f"{rtn:.4g}"
        # the RTN chain covers the first sequences only: compare on those
        ratio = f"{b['rtn'].get('quantized_rel_mse', b['rel_mse']) / rtn:.3f}" if rtn else "-"
        token = f"{b['token_rel_mse']:.4g}" if "token_rel_mse" in b else "-"  # older reports lack it
        rows.append(f"{b['block']:>5}  {b['rel_mse']:>10.4g}  {rtn_text:>12}  {ratio:>6}  {token:>10}")
    return "\n".join(rows)


def write_report(out: Path, plot: bool = True) -> str:
    report = read_report(out)
    text = error_table(report)
    if plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the table is the report; the plot is its picture
            return text + (f"\nplot: not written ({Path(out) / PLOT_FILE} needs matplotlib: "
                           "pip install 'crossblock[plot]', or pass --no-plot)")
        blocks = [b["block"] for b in report["blocks"]]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if all("rtn" in b for b in report["blocks"]):
            ax.plot(blocks, [b["rtn"]["rel_mse"] for b in report["blocks"]], "o-", label="RTN")
        ax.plot(blocks, [b["rel_mse"] for b in report["blocks"]], "o-", label=report["recipe"]["name"])
        ax.set_xlabel("block")
        ax.set_ylabel("output rel. MSE vs FP")
        ax.set_yscale("log")
        grid = report["recipe"]["grid"]
        label = (f"W{grid.get('bits')} g{grid.get('group_size')}" if grid["type"] == "uniform"
                 else " ".join(str(v) for v in grid.values()))
        ax.set_title(f"{label}: error along depth")
        ax.legend()
        fig.tight_layout()
        try:
            fig.savefig(Path(out) / PLOT_FILE, dpi=100)
        except OSError as e:
            raise CrossblockError(f"cannot write {Path(out) / PLOT_FILE}: {e.strerror or e} "
                                  "(pass --no-plot for the table only)") from None
        finally:
            plt.close(fig)
        text += f"\nplot: {Path(out) / PLOT_FILE}"
    return text
