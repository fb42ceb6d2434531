"""Screenshots of every view of the web console, for the README (``docs/console/*.png``).

Starts a real tureen server on loopback over tiny synthetic checkpoints, runs two merges,
adds a greedy soup's record, and photographs each view in headless Chromium (Debian's
package, or ``TUREEN_BROWSER``) through Playwright::

    python docs/console_screenshots.py [--out docs/console]   # after pip install -e .
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from merge_kernels.candidates import Score
from merge_kernels.greedy_search import SearchResult, SoupStep
from merge_kernels.synthetic import LlamaShape, write_checkpoint
from service.app import create_app
from service.jobs.models import Job, JobStatus, OutputOptions
from service.jobs.sqlite_store import SqliteJobStore
from service.settings import ServiceSettings

TOKEN = "screenshot-token"
SHAPE = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=8, vocab_size=256)
VIEWPORT = {"width": 1280, "height": 860}


def _serve(settings: ServiceSettings) -> tuple[uvicorn.Server, str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, url


def _recipe(root: Path, method: str, name: str) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / f"ft{i}"), "parameters": {"weight": 0.5, "density": 0.6}}
            for i in (1, 2, 3)
        ],
        "output": {"name": name},
    }


def _merge(client: httpx.Client, body: dict[str, Any]) -> str:
    job_id: str = client.post("/v1/merges", json=body).json()["id"]
    while client.get(f"/v1/merges/{job_id}").json()["status"] not in ("succeeded", "failed"):
        time.sleep(0.1)
    return job_id


class _Evaluator:
    name = "held_out:accuracy"
    higher_is_better = True


def _soup_record(settings: ServiceSettings) -> str:
    references = [f"org/finetune-{letter}" for letter in "abcde"]
    scores = [0.712, 0.684, 0.701, 0.655, 0.690]
    search = SearchResult(
        references=references,
        ingredient_scores=[Score(value) for value in scores],
        order=[0, 2, 4, 1, 3],
        steps=[
            SoupStep(1, references[2], Score(0.731), True, references[:1] + references[2:3]),
            SoupStep(2, references[4], Score(0.738), True, [references[i] for i in (0, 2, 4)]),
            SoupStep(3, references[1], Score(0.729), False, [references[i] for i in (0, 2, 4)]),
            SoupStep(4, references[3], Score(0.733), False, [references[i] for i in (0, 2, 4)]),
        ],
        kept=[0, 2, 4],
        best=0.738,
    )
    store = SqliteJobStore(settings.database_path)
    try:
        job, _ = store.create(
            Job(
                id="greedy-soup-example",
                status=JobStatus.SUCCEEDED,  # a record only: no output files behind it
                recipe={"merge_method": "greedy_soup", "models": references},
                output=OutputOptions(),
                created_at=datetime.now(UTC),
                finished_at=datetime.now(UTC),
                evaluation=search.report(_Evaluator(), "greedy"),  # type: ignore[arg-type]
            )
        )
    finally:
        store.close()
    return job.id


def main() -> None:
    """Write the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "console")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("TUREEN_BROWSER") or shutil.which("chromium")
    if not executable:
        raise SystemExit("no Chromium: apt-get install chromium, or set TUREEN_BROWSER")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "models"
        write_checkpoint(root / "base", SHAPE, seed=0)
        for index in (1, 2, 3):
            write_checkpoint(root / f"ft{index}", SHAPE, seed=index, base_seed=0, delta_scale=0.05)
        settings = ServiceSettings(
            data_dir=Path(scratch) / "data", allow_roots=[root], api_tokens=[TOKEN]
        )
        server, url = _serve(settings)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            ties = _merge(client, _recipe(root, "ties", "ties-soup"))
            arithmetic = _merge(client, _recipe(root, "task_arithmetic", "task-sum"))
        soup = _soup_record(settings)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            anonymous = browser.new_page(base_url=url, viewport=VIEWPORT)
            anonymous.goto("/")
            anonymous.wait_for_selector("#unauthorized")
            anonymous.screenshot(path=args.out / "unauthorized.png")
            context = browser.new_context(base_url=url, viewport=VIEWPORT)
            context.add_init_script(f"sessionStorage.setItem('tureen-token', {TOKEN!r});")
            page = context.new_page()
            shots = [
                ("jobs.png", "/#/jobs", "#page-position"),
                ("job.png", f"/#/merges/{ties}", "#model-card"),
                ("soup.png", f"/#/merges/{soup}", "#soup svg"),
                ("compare.png", f"/#/compare?a={ties}&b={arithmetic}", "#changes svg"),
            ]
            for name, path, ready in shots:
                page.goto(path)
                page.wait_for_selector(ready)
                page.screenshot(path=args.out / name, full_page=name == "compare.png")
            page.goto("/#/new")
            recipe = _recipe(root, "ties", "ties-soup")
            text = "\n".join(
                ["merge_method: ties", f"base_model: {recipe['base_model']}", "models:"]
                + [
                    f"  - model: {model['model']}\n    parameters: {{weight: 0.5, density: 0.6}}"
                    for model in recipe["models"]
                ]
            )
            page.fill("#recipe", text + "\n")
            page.wait_for_selector("#plan .ok")
            page.click(f"button:text-is('{root}')")
            page.wait_for_selector("button[data-reference]")
            page.screenshot(path=args.out / "editor.png")
            page.fill("#recipe", text.replace(f"{root}/ft3", f"{root}/ft9") + "\n")
            page.wait_for_selector("#plan .plan-error")
            page.screenshot(path=args.out / "plan-error.png")
            browser.close()
        server.should_exit = True
    for shot in sorted(args.out.glob("*.png")):
        print(f"{shot} ({shot.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
