"""The HTTP evaluator: the user's own scoring server, called once per candidate.

tureen POSTs JSON ``{"candidate": {"path": ..., "label": ...}, "ingredients": [...],
"step": n}`` and expects ``{"score": number}`` back (``"metrics": {name: number}``
optional). The candidate is a checkpoint folder on this machine (written once per candidate
when the soup is searched in memory). When the service knows its public address, the
candidate also carries ``"url"`` and ``"files"``: each file can be downloaded from
``url + name`` on tureen's own API (with the API's bearer token) while the step runs, so the
evaluator may run on another machine.

Timeouts, refused connections and 5xx answers are retried with a growing pause; a 4xx
answer or a body without a finite ``score`` fails at once, naming the URL and the problem.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge_kernels.candidates import Candidate, Score
from merge_kernels.errors import EvaluationError

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 0.5
_MAX_BODY = 1_048_576


class HttpEvaluator:
    """Scores candidates by asking a server.

    Args:
        url: where to POST.
        timeout_s: seconds to wait for one answer.
        retries: further attempts after a timeout, refused connection or 5xx answer.
        higher_is_better: whether the server's larger scores are better.
        candidate_url: where a candidate folder can be downloaded from tureen's API (the
            service sets it when it knows its public address); None: local paths only.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 600.0,
        retries: int = 2,
        higher_is_better: bool = True,
        candidate_url: Callable[[Path], str] | None = None,
    ) -> None:
        self.url = url
        self.candidate_url = candidate_url
        self.timeout_s = timeout_s
        self.retries = retries
        self.higher_is_better = higher_is_better
        self.name = f"http:{url}"

    def payload(self, candidate: Candidate) -> dict[str, Any]:
        """The JSON body sent for ``candidate``."""
        folder = candidate.folder()
        described: dict[str, Any] = {"path": str(folder), "label": candidate.label}
        if self.candidate_url is not None:
            described["url"] = self.candidate_url(folder)
            described["files"] = sorted(p.name for p in folder.iterdir() if p.is_file())
        return {
            "candidate": described,
            "ingredients": list(candidate.ingredients),
            "step": candidate.step,
        }

    def evaluate(self, candidate: Candidate) -> Score:
        """POST the candidate and read its score."""
        body = json.dumps(self.payload(candidate)).encode()
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url,
                data=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return self._score(response.read(_MAX_BODY + 1))
            except urllib.error.HTTPError as error:
                detail = error.read(2000).decode(errors="replace").strip()
                last_problem = f"answered {error.code}{': ' + detail if detail else ''}"
                if error.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                last_problem = f"could not be reached ({reason})"
            log.warning(
                "evaluator %s %s (attempt %d of %d)",
                self.url,
                last_problem,
                attempt + 1,
                self.retries + 1,
            )
        raise EvaluationError(
            f"the evaluator at {self.url} {last_problem} while scoring {candidate.label}",
            details={"url": self.url, "step": candidate.step},
        )

    def _score(self, raw: bytes) -> Score:
        if len(raw) > _MAX_BODY:
            raise EvaluationError(f"the evaluator at {self.url} answered more than 1 MiB")
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EvaluationError(
                f'the evaluator at {self.url} did not answer JSON; expected {{"score": number}}'
            ) from None
        score = answer.get("score") if isinstance(answer, dict) else None
        if (
            isinstance(score, bool)
            or not isinstance(score, int | float)
            or not math.isfinite(score)
        ):
            raise EvaluationError(
                f"the evaluator at {self.url} answered {str(answer)[:200]}; expected "
                '{"score": a finite number}'
            )
        metrics = answer.get("metrics") or {}
        clean = (
            {
                str(k): float(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if isinstance(metrics, dict)
            else {}
        )
        clean.setdefault("score", float(score))
        return Score(float(score), clean)
