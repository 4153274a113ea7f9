"""The test corpora that live in the repository (``tests/corpus/``), with their counts.

A corpus that is missing or short fails the run at collection with a message,
so a lost folder can never turn into tests that silently collect nothing.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
#: The WebRun delivery catalogue: ``NAME.body`` exact bytes, ``NAME.json`` mode and expected facts.
DELIVERIES = CORPUS / "deliveries"
#: csv-spectrum (BSD-2-Clause, see its NOTICE) and JSONTestSuite (MIT, see its LICENSE).
SPECTRUM = CORPUS / "csv-spectrum"
JSON_TEST_SUITE = CORPUS / "JSONTestSuite" / "test_parsing"

#: (folder, glob, how many files it must hold).
EXPECTED = (
    (DELIVERIES, "*.json", 15),
    (DELIVERIES, "*.body", 15),
    (SPECTRUM / "csvs", "*.csv", 12),
    (SPECTRUM / "json", "*.json", 12),
    (JSON_TEST_SUITE, "*.json", 318),
)


def missing_corpora() -> list[str]:
    """One line per corpus folder that is absent or holds fewer files than expected."""
    problems = []
    for folder, pattern, count in EXPECTED:
        found = len(list(folder.glob(pattern)))
        if found < count:
            problems.append(
                f"{folder.relative_to(CORPUS.parent.parent)}: {found} files matching"
                f" {pattern}, expected {count} (restore tests/corpus/ from git)"
            )
    return problems
