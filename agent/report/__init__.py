"""The HTML report: from the database or from a simulate run, one self-contained file.

>>> from agent.report import collect_from_db, write_report      # doctest: +SKIP
>>> write_report(collect_from_db(db), Path("report.html"))       # doctest: +SKIP
"""

from agent.report.from_db import collect_from_db
from agent.report.model import ReportData
from agent.report.render import render_html, write_report

__all__ = ["ReportData", "collect_from_db", "render_html", "write_report"]
