"""``tureen demo``: the project's story in one command, on a tiny model, on the CPU.

1. Build a tiny Llama base locally (tokenizer trained here, short pre-training).
2. Start the tureen service in this process, on loopback, with a fresh data folder.
3. Through the API, train three LoRA adapters on three synthetic tasks and one DPO
   adapter on preference pairs.
4. Through the API, merge them: a uniform soup, TIES and DARE-TIES (base + the four
   adapters), and a greedy soup scored on the three tasks' held-out splits together.
5. Score every ingredient and every merge on each task's held-out split and print a table.

Whatever the numbers show is printed as it is: on a model this small, merging adapters of
different tasks may well help one task and hurt another.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SFT_TASKS = ("reverse", "add", "upper")
DPO_TASK = "title"
FINISHED = ("succeeded", "failed", "cancelled")


class DemoError(RuntimeError):
    """A step of the demo failed (the message says which and why)."""


@contextmanager
def running_service(data_dir: Path) -> Iterator[str]:
    """The tureen service on a free loopback port, in a thread of this process."""
    import uvicorn

    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(data_dir=data_dir, workers=1, host="127.0.0.1", log_level="warning")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [listener]}, name="tureen-demo", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise DemoError("the service did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        listener.close()


class Demo:
    """The demo's steps, sharing one API client and one clock."""

    def __init__(self, folder: Path, steps: int, out: Any) -> None:
        self.folder = folder
        self.inputs = folder / "data" / "inputs"
        self.steps = steps
        self.out = out
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f} s] {text}", file=self.out, flush=True)

    # -- inputs ---------------------------------------------------------------------------

    def prepare(self) -> None:
        from training.tasks import write_task
        from training.tiny_base import build_tiny_base

        self.say("building the tiny base (tokenizer trained here, short pre-training)")
        built = build_tiny_base(self.inputs / "base")
        self.say(f"  {built.parameters:,} parameters, vocabulary {built.vocab_size}")
        for task in SFT_TASKS:
            write_task(self.inputs / "tasks" / task, task, train=256, heldout=48, seed=1)
        write_task(
            self.inputs / "tasks" / DPO_TASK,
            DPO_TASK,
            train=256,
            heldout=48,
            seed=1,
            preferences=True,
        )
        # The greedy soup is scored on the three supervised tasks at once.
        lines = []
        for task in SFT_TASKS:
            lines += (self.inputs / "tasks" / task / "heldout.jsonl").read_text().splitlines()
        (self.inputs / "tasks" / "all-heldout.jsonl").write_text("\n".join(lines) + "\n")

    # -- through the API ------------------------------------------------------------------

    def wait(self, client: Any, kind: str, job_id: str, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = client.get(f"/v1/{kind}/{job_id}").json()
            if job["status"] in FINISHED:
                if job["status"] != "succeeded":
                    raise DemoError(f"{kind} job {job_id} {job['status']}: {job.get('error')}")
                return job
            if time.monotonic() > deadline:
                raise DemoError(f"{kind} job {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.1)

    def submit(self, client: Any, kind: str, body: dict[str, Any]) -> str:
        response = client.post(f"/v1/{kind}", json=body)
        if response.status_code != 202:
            raise DemoError(f"POST /v1/{kind} answered {response.status_code}: {response.text}")
        job_id: str = response.json()["id"]
        return job_id

    def train(self, client: Any) -> dict[str, str]:
        """Train the four adapters; returns their merge references by name."""
        lora = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
        bodies: dict[str, dict[str, Any]] = {
            task: {
                "kind": "lora",
                "base_model": "base",
                "data": {
                    "train": f"tasks/{task}/train.jsonl",
                    "eval": f"tasks/{task}/heldout.jsonl",
                },
                "lora": lora,
                "training": {
                    "seed": 0,
                    "max_steps": self.steps,
                    "learning_rate": 0.01,
                    "batch_size": 16,
                },
                "output": {"name": f"lora-{task}"},
            }
            for task in SFT_TASKS
        }
        bodies[f"dpo-{DPO_TASK}"] = {
            "kind": "dpo",
            "base_model": "base",
            "data": {
                "train": f"tasks/{DPO_TASK}/train.jsonl",
                "eval": f"tasks/{DPO_TASK}/heldout.jsonl",
            },
            "lora": lora,
            "training": {
                "seed": 0,
                "max_steps": max(1, self.steps // 2),
                "learning_rate": 0.005,
                "batch_size": 8,
            },
            "dpo": {"beta": 0.1, "loss_type": "sigmoid"},
            "output": {"name": f"dpo-{DPO_TASK}"},
        }
        ids = {name: self.submit(client, "trainings", body) for name, body in bodies.items()}
        references = {}
        for name, job_id in ids.items():
            job = self.wait(client, "trainings", job_id)
            held = job.get("held_out") or {}
            before, after = held.get("before", {}), held.get("after", {})
            detail = ", ".join(
                f"{metric} {before[metric]:.3f} → {after[metric]:.3f}"
                for metric in ("loss", "preference_accuracy")
                if isinstance(before.get(metric), float) and isinstance(after.get(metric), float)
            )
            self.say(f"trained {name} in {job['seconds']:.1f} s (held-out {detail})")
            references[name] = f"base+{job['adapter_reference']}"
        return references

    def merge(self, client: Any, references: dict[str, str]) -> dict[str, tuple[Path, Any]]:
        """Each ingredient alone and each merge: output folders (and greedy soup report)."""
        ingredients = [{"model": ref} for ref in references.values()]
        weighted = [{"model": ref, "parameters": {"weight": 1.0}} for ref in references.values()]
        recipes: dict[str, dict[str, Any]] = {
            name: {"merge_method": "linear", "models": [{"model": ref}]}
            for name, ref in references.items()
        }
        recipes["uniform soup"] = {"merge_method": "linear", "models": ingredients}
        recipes["TIES (d=0.5)"] = {
            "merge_method": "ties",
            "base_model": "base",
            "models": weighted,
            "parameters": {"density": 0.5},
        }
        recipes["DARE-TIES (d=0.5)"] = {
            "merge_method": "dare_ties",
            "base_model": "base",
            "models": weighted,
            "parameters": {"density": 0.5},
            "seed": 0,
        }
        recipes["greedy soup"] = {
            "merge_method": "greedy_soup",
            "models": ingredients,
            "evaluator": {"type": "held_out", "data": "tasks/all-heldout.jsonl"},
        }
        ids = {name: self.submit(client, "merges", body) for name, body in recipes.items()}
        results = {}
        for name, job_id in ids.items():
            job = self.wait(client, "merges", job_id)
            results[name] = (Path(job["output_dir"]), job.get("evaluation"))
        self.say(f"{len(results)} merges done through the API")
        return results

    # -- scoring --------------------------------------------------------------------------

    def score(self, folders: dict[str, Path]) -> dict[str, dict[str, float]]:
        from merge_kernels.candidates import Candidate
        from service.evaluation.held_out import HeldOutEvaluator
        from service.evaluation.records import load_records

        tasks = [*SFT_TASKS, DPO_TASK]
        evaluators = {}
        for task in tasks:
            path = self.inputs / "tasks" / task / "heldout.jsonl"
            if task == DPO_TASK:  # score the chosen answers as completions
                rows = [json.loads(line) for line in path.read_text().splitlines() if line]
                path = self.folder / "title-chosen.jsonl"
                path.write_text(
                    "\n".join(
                        json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) for r in rows
                    )
                    + "\n"
                )
            evaluators[task] = HeldOutEvaluator(load_records(path), metric="loss")
        table: dict[str, dict[str, float]] = {}
        for name, folder in folders.items():
            candidate = Candidate(name, 0, [name], folder=folder)
            table[name] = {t: evaluators[t].evaluate(candidate).value for t in tasks}
        return table

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def report(
        self, table: dict[str, dict[str, float]], soup_report: dict[str, Any] | None
    ) -> None:
        tasks = [*SFT_TASKS, DPO_TASK]
        header = f"{'model':<28}" + "".join(f"{t:>10}" for t in tasks) + f"{'mean':>10}"
        self.print("\nHeld-out loss per task (lower is better; title: the preferred answers)")
        self.print(header)
        self.print("-" * len(header))
        best = {t: min(row[t] for row in table.values()) for t in tasks}
        for name, row in table.items():
            cells = "".join(f"{row[t]:>9.3f}{'*' if row[t] == best[t] else ' '}" for t in tasks)
            mean = sum(row[t] for t in tasks) / len(tasks)
            self.print(f"{name:<28}{cells}{mean:>10.3f}")
        self.print("* best in its column")
        if soup_report is not None:
            kept = [ref.split("/")[-1] for ref in soup_report["kept"]]
            self.print(
                f"\nGreedy soup (scored on the three tasks' held-out splits together): kept "
                f"{', '.join(kept)}; soup {soup_report['final_score']:.3f} vs best single "
                f"{soup_report['best_single']['score']:.3f}"
            )
            for step in soup_report["steps"]:
                verdict = "kept" if step["kept"] else "rejected"
                self.print(
                    f"  step {step['step']}: + {step['ingredient'].split('/')[-1]:<16} "
                    f"{step['candidate_score']:.3f}  {verdict}"
                )


def run_demo(folder: Path, *, steps: int, out: Any) -> dict[str, dict[str, float]]:
    """Run the whole demo in ``folder``; returns the score table."""
    import httpx

    demo = Demo(folder, steps, out)
    demo.prepare()
    with running_service(folder / "data") as url, httpx.Client(base_url=url, timeout=60) as client:
        demo.say(f"service running at {url}")
        references = demo.train(client)
        results = demo.merge(client, references)
    folders = {"base": demo.inputs / "base"}
    folders.update({name: folder for name, (folder, _) in results.items()})
    demo.say("scoring every model on every task's held-out split")
    table = demo.score(folders)
    demo.report(table, results["greedy soup"][1])
    demo.say("done")
    return table


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo in a temporary folder (or ``--folder``)."""
    import sys

    from service.extras import require_extra

    require_extra("tureen demo", "training")
    from training.cli import quiet_libraries

    quiet_libraries()
    if args.folder is not None:
        Path(args.folder).mkdir(parents=True, exist_ok=False)
        run_demo(Path(args.folder), steps=args.steps, out=sys.stdout)
        return 0
    with tempfile.TemporaryDirectory(prefix="tureen-demo-") as folder:
        run_demo(Path(folder), steps=args.steps, out=sys.stdout)
    return 0


def add_demo_command(commands: Any) -> None:
    """Add ``tureen demo`` to the ``tureen`` command's subparsers."""
    demo = commands.add_parser(
        "demo", help="train adapters, merge them through the API, print held-out scores"
    )
    demo.add_argument(
        "--folder", help="keep everything in this new folder (default: a temporary one)"
    )
    demo.add_argument("--steps", type=int, default=40, help="LoRA steps per adapter")
    demo.set_defaults(handler=cmd_demo)
