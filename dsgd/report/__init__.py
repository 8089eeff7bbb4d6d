"""Reports from run directories: tables of mean ± std over seeds, training curves, REPORT.md.

Reads run directories only and never imports torch or an engine (STYLE.md point 12), so a
report can be made on a machine without a GPU while runs are still going.

    from dsgd.report import make_report
    make_report(["runs/"], "reports/cifar10", title="CIFAR-10 ResNet-18")

or ``python -m dsgd.report runs/ -o reports/cifar10``.
"""

from dsgd.report.report import make_report
from dsgd.report.runs import Group, Run, find_runs, flatten, group_runs, load_run
from dsgd.report.tables import markdown_table, paper_column, summarize_runs

__all__ = [
    "Group",
    "Run",
    "find_runs",
    "flatten",
    "group_runs",
    "load_run",
    "make_report",
    "markdown_table",
    "paper_column",
    "summarize_runs",
]
