"""A job's log file: only the job's own records, bounded in size."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.jobs import job_log


def test_records_inside_the_block_reach_the_jobs_log_only(tmp_path: Path) -> None:
    logger = logging.getLogger("tests.job_log")
    logger.setLevel(logging.INFO)
    logger.info("before any job")
    with job_log.capturing(tmp_path, "job-a"):
        logger.info("merging for a")
    with job_log.capturing(tmp_path, "job-b"):
        logger.warning("merging for b")
    job_log.append(tmp_path, "job-a", logging.ERROR, "the worker process was killed")
    a = job_log.read(tmp_path, "job-a")
    assert "INFO merging for a" in a and "ERROR the worker process was killed" in a
    assert "before any job" not in a and "for b" not in a
    assert "WARNING merging for b" in job_log.read(tmp_path, "job-b")
    assert job_log.read(tmp_path, "job-c") == ""
    with pytest.raises(ValueError, match="not a job id"):
        job_log.log_path(tmp_path, "../escape")


def test_a_log_stops_at_its_limit_and_says_so(tmp_path: Path) -> None:
    handler = job_log.BoundedFileHandler(tmp_path / "big.log", limit=1000)
    logger = logging.getLogger("tests.job_log.big")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for index in range(200):
            logger.warning("line %d of a chatty job", index)
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = (tmp_path / "big.log").read_text()
    lines = text.splitlines()
    assert lines[0] == "line 0 of a chatty job"
    assert lines[-1].startswith("... the rest of this job's log was dropped")
    assert len(text.encode()) <= 1000 + len(lines[-1]) + 1
    assert "line 199" not in text
