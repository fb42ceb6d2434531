"""The HTTP evaluator against a real evaluator server on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from merge_kernels.candidates import Candidate
from merge_kernels.errors import EvaluationError, RecipeError
from merge_kernels.evaluated_merge import run_evaluated_merge
from merge_kernels.recipe import parse_recipe
from merge_kernels.runner import MergeOptions
from service.evaluation import http_evaluator
from service.evaluation.config import build_evaluator
from tests.service.evaluation.conftest import HARMFUL, HELPFUL, SoupWorld


class EvaluatorServer:
    """A scoring server: reads the candidate folder, scores −distance to a target model.

    ``failures`` makes the next requests answer 503; ``answer`` overrides the JSON body.
    """

    def __init__(self, target: dict[str, torch.Tensor]) -> None:
        self.target = target
        self.requests: list[dict[str, Any]] = []
        self.failures = 0
        self.answer: bytes | None = None
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.failures:
                    server.failures -= 1
                    self.reply(503, b'{"detail": "busy"}')
                    return
                if server.answer is not None:
                    self.reply(server.status, server.answer)
                    return
                score = server.score(Path(body["candidate"]["path"]))
                self.reply(200, json.dumps({"score": score, "metrics": {"l2": -score}}).encode())

            def reply(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def score(self, folder: Path) -> float:
        tensors = load_file(folder / "model.safetensors")
        distance = sum(
            float((tensors[name].float() - value).pow(2).sum())
            for name, value in self.target.items()
        )
        return -(distance**0.5)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(soup_world: SoupWorld) -> Iterator[EvaluatorServer]:
    running = EvaluatorServer(load_file(soup_world.target / "model.safetensors"))
    yield running
    running.close()


def test_greedy_soup_scored_by_an_http_server(
    soup_world: SoupWorld, server: EvaluatorServer, tmp_path: Path
) -> None:
    document = soup_world.recipe(evaluator={"type": "http", "url": server.url})
    recipe = parse_recipe(document)
    evaluator = build_evaluator(recipe.evaluator)
    scored = run_evaluated_merge(recipe, tmp_path / "soup", evaluator, MergeOptions())
    report = scored.report
    kept = [Path(r).name for r in report["kept"]]
    assert HARMFUL not in kept and len(kept) >= 3
    assert report["higher_is_better"] is True
    assert report["final_score"] >= report["best_single"]["score"]
    # One request per evaluation; each names its step, ingredients and a readable folder.
    assert len(server.requests) == report["evaluations"]
    assert [r["step"] for r in server.requests[:-1]] == list(range(len(server.requests) - 1))
    last_step = server.requests[len(HELPFUL) + 1]
    assert len(last_step["ingredients"]) == 2
    assert report["steps"][0]["metrics"]["l2"] == -report["steps"][0]["candidate_score"]


def candidate(world: SoupWorld) -> Candidate:
    return Candidate("ingredient 0", 0, ["ing0"], folder=world.root / "ing0")


def test_busy_servers_are_retried(
    soup_world: SoupWorld, server: EvaluatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_evaluator, "RETRY_PAUSE_S", 0.01)
    server.failures = 2
    evaluator = build_evaluator({"type": "http", "url": server.url, "retries": 2})
    score = evaluator.evaluate(candidate(soup_world))
    assert score.value < 0
    assert len(server.requests) == 3
    server.failures = 5
    with pytest.raises(EvaluationError, match="answered 503"):
        evaluator.evaluate(candidate(soup_world))


@pytest.mark.parametrize(
    ("status", "answer", "message"),
    [
        (200, b"not json", "did not answer JSON"),
        (200, b'{"value": 1}', "expected"),
        (200, b'{"score": "high"}', "expected"),
        (200, b'{"score": NaN}', "expected"),
        (422, b'{"detail": "unknown model"}', "answered 422: .*unknown model"),
    ],
)
def test_bad_answers_fail_clearly_without_retrying(
    soup_world: SoupWorld, server: EvaluatorServer, status: int, answer: bytes, message: str
) -> None:
    server.status, server.answer = status, answer
    evaluator = build_evaluator({"type": "http", "url": server.url, "retries": 3})
    with pytest.raises(EvaluationError, match=message) as caught:
        evaluator.evaluate(candidate(soup_world))
    assert caught.value.code == "evaluation_failed"
    assert len(server.requests) == 1


def test_unreachable_servers_and_timeouts(
    soup_world: SoupWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_evaluator, "RETRY_PAUSE_S", 0.01)
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: connections are refused
        evaluator = build_evaluator(
            {"type": "http", "url": f"http://127.0.0.1:{port}/", "retries": 1}
        )
        with pytest.raises(EvaluationError, match="could not be reached"):
            evaluator.evaluate(candidate(soup_world))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        evaluator = build_evaluator({"type": "http", "url": url, "retries": 0, "timeout_s": 0.3})
        with pytest.raises(EvaluationError, match="could not be reached"):
            evaluator.evaluate(candidate(soup_world))


def test_hosts_must_be_allowed() -> None:
    with pytest.raises(RecipeError, match="not allowed") as caught:
        build_evaluator({"type": "http", "url": "http://scores.example.com/score"})
    assert caught.value.field == "evaluator.url"
    build_evaluator(
        {"type": "http", "url": "http://scores.example.com/score"},
        allowed_hosts=["scores.example.com"],
    )
    with pytest.raises(RecipeError, match="not an http"):
        build_evaluator({"type": "http", "url": "file:///etc/passwd"}, allowed_hosts=["*"])
