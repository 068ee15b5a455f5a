"""Every number-bearing table row and figure panel of the paper, mapped to the job that
measures it, run, collected and set beside the paper's value.

The registry (:data:`ROWS`) holds, per row: the paper's value (read from the paper's
text), the job that measures ours at each preset (``quick``: minutes to tens of minutes
on a laptop CPU; ``paper``: Appendix E.3's settings, for a GPU machine), and the claim
the paper draws from it. Rows that read the same experiment share one job (Table 6's
Concrete row reads the Table 5 Concrete run's correlations), kept in the folder of
the first row that names it: ``DIR/<target>/<row>/``.

:func:`run_rows` runs rows in sequence through the existing jobs (decomposition,
mislabel detection, sweeps), each resuming from what its results folder already
holds; a finished row leaves ``row.json`` (its job, run time, work) and is skipped
next time. :func:`write_report` reads the folders back and writes the side-by-side
Markdown (REPRODUCTION.md) and the figures. No experiment logic lives here.

One module per job:

- :mod:`.paper_values` the paper's numbers (Tables 2, 4-8; Figure 5's swept values and claims)
- :mod:`.rows`         what each row is: :class:`Row`, :class:`Job`, :data:`ROWS`, folders, selection
- :mod:`.runner`       running rows (resume, ``row.json``, ``failed.json``) and reading them back
- :mod:`.costs`        the cost model: the paper preset's expected time on this machine
- :mod:`.verdicts`     ours against the paper's claim, and the numbers as text
- :mod:`.figures`      the figure sections and Figure 1's scatter
- :mod:`.report`       REPRODUCTION.md
- :mod:`.command`      the ``pbrf-fast reproduce`` command
"""
from .command import reproduce
from .costs import expected_paper_seconds
from .report import write_report
from .rows import ROWS, TARGETS, Job, ReproduceError, Row, job_folder, list_rows, select_rows
from .runner import collect, run_rows

__all__ = ["Job", "Row", "ROWS", "TARGETS", "ReproduceError", "select_rows", "job_folder", "run_rows",
           "collect", "write_report", "list_rows", "expected_paper_seconds", "reproduce"]
