"""The report of ``dsgd reproduce``, made from its ``results.json`` only (no torch, no engine):
statistics over seeds (``groups``), the graded verdicts (``verdicts``), the sweep and scaling
tables (``sweep``) and REPORT.md with its figures (``markdown``).

    python -m dsgd.report.reproduction OUT     # rewrite OUT/REPORT.md from OUT/results.json
"""

from dsgd.report.reproduction.markdown import write_report
from dsgd.report.reproduction.verdicts import grade, verdicts

__all__ = ["grade", "verdicts", "write_report"]
