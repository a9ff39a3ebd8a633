"""`prunectl`: submit pruning jobs from CI, wait for them, download and verify their artifacts.

Exit codes: 0 success (job succeeded), 1 job failed or was cancelled, 2 bad input (bad flags, 4xx
from the API but 429, a non-empty --download target without --force), 3 service unreachable or busy
(connection errors, 429 and 5xx after every retry), 4 a downloaded artifact failed verification
(nothing is kept), 5 --timeout ran out while the job was still running (it goes on on the service),
6 the job succeeded but missed its quality gate (`gate` in the spec; report and artifacts are kept
and --download still fetches them).
Server and key: --url/--api-key or PRUNE_URL and PRUNE_API_KEY.

Retries: connection errors, 429 and 5xx are retried with exponential backoff (at most 8 s apart)
honouring Retry-After. `--retries` attempts per request by default; with --timeout (and always with
`submit --wait`, default 6 h) every request is retried until that total deadline instead, so a
waiting CI step rides out an API restart, a rolling deploy or a tenant at its job limit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from core.spec_cli import add_spec_options, load_spec_file, spec_body
from jobs.spec import HELD, TERMINAL, JobRequest, JobStatus
from prunectl.client import ApiError, Client, CliError, TimedOut, Unreachable, check_target
from prunectl.settings import DEFAULT_URL, ClientSettings

EXIT_OK, EXIT_JOB_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_VERIFY, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
WAIT_TIMEOUT = 6 * 3600.0
"""Default total --timeout of `submit --wait` (seconds)."""
EXIT_GATE = 6
STATUSES = tuple(JobStatus)


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line hint (the default, made explicit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--url", default=s, help=f"service URL (env PRUNE_URL, default {DEFAULT_URL})")
    p.add_argument("--api-key", default=s, help="API key sent as Bearer (env PRUNE_API_KEY)")
    p.add_argument("--json", action="store_true", default=s, help="machine-readable JSON on stdout")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=s,
        help="total seconds for the command, retries and waiting included; requests are retried until "
        f"then (default: --retries attempts; {WAIT_TIMEOUT / 3600:g} h for submit --wait)",
    )
    p.add_argument("--http-timeout", type=_seconds, default=s, help="per-request timeout (default 30 s)")
    p.add_argument(
        "--retries",
        type=int,
        default=s,
        help="attempts on connection errors/429/5xx without --timeout (default 4)",
    )
    return p


def _seconds(v: str) -> float:
    f = float(v)
    if not f > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {v}")
    return f


def _positive(v: str) -> int:
    i = int(v)
    if i < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return i


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="prunectl", description=__doc__, parents=[common],
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("submit", parents=[common], help="submit a job (optionally wait and download)")
    s.add_argument("--spec", type=Path, help="JSON/YAML run spec; the flags below override its fields")
    s.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    s.add_argument("--wait", action="store_true", help="follow progress (stderr) until the job ends")
    s.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress on stderr")
    s.add_argument(
        "--download",
        type=Path,
        metavar="DIR",
        help="with --wait: fetch the artifacts as the new directory DIR (verified against manifest.json)",
    )
    s.add_argument("--force", action="store_true", help="with --download: replace an existing DIR whole")
    s.add_argument("--poll", type=float, default=2.0, help="polling interval without SSE (seconds)")
    add_spec_options(s, JobRequest)  # every field of the job body (docs/core.md "Command-line flags")

    st = sub.add_parser("status", parents=[common], help="show a job")
    st.add_argument("job_id")
    ev = sub.add_parser("events", parents=[common], help="print a job's events")
    ev.add_argument("job_id")
    ev.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    c = sub.add_parser("cancel", parents=[common], help="cancel a job")
    c.add_argument("job_id")
    ls = sub.add_parser("list", parents=[common], help="list jobs, newest first")
    ls.add_argument("--status", choices=[str(x) for x in STATUSES])
    ls.add_argument("--limit", type=_positive, default=20)
    ls.add_argument("--after", help="cursor: `next` of the previous page")
    dl = sub.add_parser("download", parents=[common], help="download and verify a job's artifacts")
    dl.add_argument("job_id")
    dl.add_argument("dir", type=Path, help="new directory (an existing non-empty one needs --force)")
    dl.add_argument("--force", action="store_true", help="replace an existing DIR whole")
    return parser


# -- spec ----------------------------------------------------------------------------------------


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/jobs body from --spec and flags (flags win). The server validates it."""
    body = spec_body(args, load_spec_file(args.spec) if args.spec else None)
    if not isinstance(body.get("model"), dict) or not body["model"].get("source"):
        raise ValueError("a model is required: --model SOURCE or model.source in --spec")
    return body


# -- output --------------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, obj: Any, text: str, out: TextIO) -> None:
    if args.json:
        out.write(json.dumps(obj) + "\n")
    else:
        out.write(text + "\n")
    out.flush()


def describe(job: dict[str, Any]) -> str:
    """A few human lines about a job."""
    lines = [f"{job.get('id')}  {job.get('status')}"]
    prog = job.get("progress") or {}
    if job.get("status") in HELD and prog.get("stage"):
        lines.append(f"  progress: {progress_text(prog)}")
    if job.get("error"):
        lines.append(f"  error: {job['error'].get('code')}: {job['error'].get('message')}")
    summary = job.get("summary") or {}
    if summary:
        summary = {"measured_sparsity": summary.get("sparsity"), **summary}  # an API before the rename
        keys = ("measured_sparsity", "dense_ppl", "pruned_ppl", "recovered_ppl")
        shown = [f"{k}={summary[k]}" for k in keys if summary.get(k) is not None]
        lines.append("  summary: " + ", ".join(shown))
    return "\n".join(lines)


def _eta(seconds: Any) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    return f" ETA {s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f" ETA {s // 60}m{s % 60:02d}s"


def progress_text(prog: dict[str, Any]) -> str:
    stage = prog.get("stage") or "?"
    block = f" block {prog['block']}/{prog['nblocks']}" if prog.get("block") and prog.get("nblocks") else ""
    return f"{100 * float(prog.get('fraction') or 0):5.1f}% {stage}{block}{_eta(prog.get('eta_s'))}"


class ProgressBar:
    """A one-line bar redrawn in place on a terminal; on CI logs, one line per stage or 10% step."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_key: tuple[Any, ...] | None = None

    def update(self, status: str, prog: dict[str, Any]) -> None:
        frac = float(prog.get("fraction") or 0.0)
        if self.tty:
            filled = int(frac * 30)
            bar = "#" * filled + "-" * (30 - filled)
            self.stream.write(f"\r[{bar}] {status:<10} {progress_text(prog)}\x1b[K")
        else:
            key = (status, prog.get("stage"), int(frac * 10))
            if key == self.last_key:
                return
            self.last_key = key
            self.stream.write(f"{status}: {progress_text(prog)}\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- waiting -------------------------------------------------------------------------------------


def wait_for(client: Client, job: dict[str, Any], poll: float, bar: ProgressBar | None) -> dict[str, Any]:
    """Follow the job (SSE, else polling) until it is terminal; return the final job record."""
    job_id = job["id"]
    status = job.get("status", "queued")
    if status in TERMINAL:
        return job
    try:
        for ev in client.stream_events(job_id):
            data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
            if ev.get("type") == "progress" and bar:
                bar.update(status, data)
            elif ev.get("type") == "status":
                status = data.get("status", status)
                if status in TERMINAL:
                    break
    except (NotImplementedError, Unreachable):
        pass  # no SSE, or the stream kept dropping: poll (with its own retries)
    while True:
        job = client.job(job_id)
        if job.get("status") in TERMINAL:
            break
        if bar:
            bar.update(job.get("status", "?"), job.get("progress") or {})
        left = client.remaining()
        if left is not None and left <= 0:
            if bar:
                bar.done()
            raise TimedOut(f"--timeout reached; job {job_id} is still {job.get('status')} on the service")
        client.sleep(poll if left is None else min(poll, left))
    if bar:
        bar.done()
    return job


def _finish(args: argparse.Namespace, client: Client, job: dict[str, Any], out: TextIO, err: TextIO) -> int:
    status = job.get("status")
    if status != "succeeded":
        _emit(args, job, describe(job), out)
        if job.get("error"):
            err.write(f"prunectl: job {job['id']} {status}: {job['error'].get('message')}\n")
        else:
            err.write(f"prunectl: job {job['id']} {status}\n")
        return EXIT_JOB_FAILED
    if getattr(args, "download", None):
        _download(args, client, job["id"], args.download, err)
    _emit(args, job, describe(job), out)
    gate = (job.get("summary") or {}).get("gate")
    if gate and not gate.get("passed"):
        missed = [c for c in gate["checks"] if not c["passed"]]
        failed = ", ".join(f"{c['name']} {c['value']} vs {c['limit']}" for c in missed)
        err.write(f"prunectl: job {job['id']} missed its quality gate ({failed})\n")
        return EXIT_GATE
    return EXIT_OK


def _download(args: argparse.Namespace, client: Client, job_id: str, dest: Path, err: TextIO) -> None:
    def on_file(name: str, size: int) -> None:
        if not args.json:
            err.write(f"  verified {name} ({size} bytes)\n")

    items = client.download(job_id, dest, on_file, force=getattr(args, "force", False))
    err.write(f"prunectl: {len(items)} artifacts of {job_id} verified in {dest}\n")


# -- commands ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, client: Client, out: TextIO, err: TextIO) -> int:
    cmd = args.command
    if cmd == "submit":
        try:
            body = build_body(args)
        except ValueError as exc:
            err.write(f"prunectl: {exc}\n")
            return EXIT_BAD_INPUT
        if args.download:
            check_target(args.download, args.force)  # refuse before submitting, not after the wait
        job = client.submit(body, args.idempotency_key)
        if not args.wait:
            _emit(args, job, job["id"] if not args.json else "", out)
            return EXIT_OK
        if not args.quiet:
            err.write(f"prunectl: job {job['id']} {job.get('status')}\n")
        bar = None if args.json or args.quiet else ProgressBar(err)
        final = wait_for(client, job, args.poll, bar)
        return _finish(args, client, final, out, err)
    if cmd == "status":
        job = client.job(args.job_id)
        _emit(args, job, describe(job), out)
        return EXIT_OK
    if cmd == "cancel":
        job = client.cancel(args.job_id)
        _emit(args, job, describe(job), out)
        return EXIT_OK
    if cmd == "list":
        page = client.jobs(args.status, args.limit, args.after)
        rows = [f"{j['id']}  {j['status']:<10}  {j.get('created_at', '')}  {j['request']['model']['source']}"
                for j in page.get("items", [])]  # fmt: skip
        rows += [f"{u['id']}  {u.get('status') or '?':<10}  unreadable: {u['error']['message']} (cancel it)"
                 for u in page.get("unreadable", [])]  # fmt: skip
        if page.get("next"):
            rows.append(f"(more: --after {page['next']})")
        _emit(args, page, "\n".join(rows) if rows else "(no jobs)", out)
        return EXIT_OK
    if cmd == "events":
        return _events(args, client, out)
    if cmd == "download":
        check_target(args.dir, args.force)
        job = client.job(args.job_id)
        if job.get("status") != "succeeded":
            err.write(f"prunectl: job {args.job_id} is {job.get('status')}; nothing to download\n")
            return EXIT_JOB_FAILED
        _download(args, client, args.job_id, args.dir, err)
        return EXIT_OK
    raise AssertionError(cmd)


def _events(args: argparse.Namespace, client: Client, out: TextIO) -> int:
    def show(ev: dict[str, Any]) -> None:
        text = f"{ev.get('id')}  {ev.get('type'):<9} {json.dumps(ev.get('data'), separators=(',', ':'))}"
        _emit(args, ev, text, out)

    if args.follow:
        try:
            for ev in client.stream_events(args.job_id):
                show(ev)
            return EXIT_OK
        except NotImplementedError:
            pass
    after = None
    while True:
        page = client.events_page(args.job_id, after, 1000)
        for ev in page.get("items", []):
            show(ev)
        after = page.get("next") or after
        if page.get("items"):
            continue
        if not args.follow or client.job(args.job_id).get("status") in TERMINAL:
            return EXIT_OK
        time.sleep(2.0)


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Entry point (`prunectl = prunectl.cli:main`); returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    defaults = {
        "url": None,
        "api_key": None,
        "json": False,
        "timeout": None,
        "http_timeout": 30.0,
        "retries": 4,
    }
    for name, default in defaults.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    env = ClientSettings()
    url = args.url or env.url
    key = args.api_key or env.api_key
    if getattr(args, "download", None) and args.command == "submit" and not args.wait:
        err.write("prunectl: --download needs --wait\n")
        return EXIT_BAD_INPUT
    total = args.timeout
    if total is None and args.command == "submit" and args.wait:
        total = WAIT_TIMEOUT
    deadline = None if total is None else time.monotonic() + total
    try:
        client = Client(url, key, timeout=args.http_timeout, retries=args.retries, deadline=deadline)
    except ValueError as exc:
        err.write(f"prunectl: {exc}\n")
        return EXIT_BAD_INPUT
    try:
        with client:
            return run(args, client, out, err)
    except ApiError as exc:
        err.write(f"prunectl: {exc}\n")
        return EXIT_BAD_INPUT
    except CliError as exc:
        err.write(f"prunectl: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write("prunectl: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
