"""Command line: python -m tasks {sample,audit,relabel,undo,labelstudio}."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Annotated

from pydantic import TypeAdapter, ValidationError

from tasks.config import AuditConfig, ConfigError, load_config
from tasks.errors import USER_ERROR_EXIT, UserError

log = logging.getLogger("tasks")


def _cmd_sample(args: argparse.Namespace) -> None:
    from tasks.sample import write_sample

    truth = write_sample(args.out, args.n, args.noise, args.seed, args.noise_type, args.source)
    print(truth)


def _cmd_audit(args: argparse.Namespace) -> None:
    from tasks.audit import run_audit

    cfg = load_config(args.config, args.set)
    from tasks.decide import summary_lines
    from tasks.merge import read_summary
    from tasks.relabel import find_run

    results = run_audit(cfg, run_id=args.run_id)
    if args.relabel or cfg.autocorrect:
        _relabel(results, cfg.sensitivity, cfg.min_preds, dry_run=False, force=args.force)
    summary = read_summary(find_run(results))
    for line in summary_lines(summary) if summary else []:
        print(line)
    print(results)  # the last line: scripts read it


def _relabel(results_uri: str, sensitivity: float | None, min_preds: int | None,
             dry_run: bool, decisions_uri: str | None = None, force: bool = False) -> None:
    from tasks.relabel import relabel_results

    out = relabel_results(results_uri, sensitivity, min_preds, dry_run=dry_run,
                          decisions_uri=decisions_uri, force=force)
    if out:
        print(out)


def _config_value(option: str, key: str, value: object) -> object:
    """`value` checked against the config schema's field `key` (its type and bounds, so the
    CLI never holds a second copy of them); a ConfigError naming the option otherwise."""
    field = AuditConfig.model_fields[key]
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as err:
        why = ("Input should be a number" if value != value  # NaN passes no bound
               else "; ".join(str(e["msg"]) for e in err.errors()))
        raise ConfigError(f"{option} {value!r}: {why} (as the config key {key})") from None


def _cmd_relabel(args: argparse.Namespace) -> None:
    if args.sensitivity is not None:
        _config_value("--sensitivity", "sensitivity", args.sensitivity)
    if args.min_preds is not None:
        _config_value("--min-preds", "min_preds", args.min_preds)
    _relabel(args.results, args.sensitivity, args.min_preds, args.dry_run, args.decisions,
             force=args.force)


def _cmd_undo(args: argparse.Namespace) -> None:
    from tasks.relabel import undo

    undo(args.journal)


def _cmd_labelstudio_export(args: argparse.Namespace) -> None:
    from tasks.labelstudio import export_tasks

    written = export_tasks(args.results, args.out, args.image_root, top_n=args.top_n)
    print(written["tasks"])


def _cmd_labelstudio_import(args: argparse.Namespace) -> None:
    from tasks.decisions import write_decisions
    from tasks.labelstudio import import_export

    write_decisions(import_export(args.export, args.results), args.out)
    print(args.out)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    p = argparse.ArgumentParser(prog="python -m tasks",
                                description="Find and fix mislabelled images.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="write a sample dataset with known label noise")
    s.add_argument("--out", required=True, help="folder to create")
    s.add_argument("--n", type=int, default=2000, help="number of images")
    s.add_argument("--noise", type=float, default=0.1, help="fraction of labels to change")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--noise-type", default="symmetric", choices=["symmetric", "asymmetric"])
    s.add_argument("--source", default="auto", choices=["auto", "fashion-mnist", "digits"])
    s.set_defaults(func=_cmd_sample)

    a = sub.add_parser("audit", help="audit a dataset; prints the results CSV path last")
    a.add_argument("--config", help="YAML config (default configs/config.yaml)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    a.add_argument("--run-id", help="run id (default: derived from the dataset and config, "
                   "so the same audit resumes)")
    a.add_argument("--relabel", action="store_true", help="relabel afterwards (as autocorrect)")
    a.add_argument("--force", action="store_true", help="relabel even when the model-quality "
                   "guard says the audit cannot be trusted")
    a.set_defaults(func=_cmd_audit)

    r = sub.add_parser("relabel", help="move images whose suggestion clears the thresholds, "
                       "or exactly as a reviewer's decisions file says")
    r.add_argument("--results", required=True, help="results.csv inside a run folder")
    r.add_argument("--decisions", help="decisions.csv (from report.html or labelstudio "
                   "import): move only its accept and other rows, ignoring the thresholds")
    r.add_argument("--sensitivity", type=float, help="override the run's sensitivity (0-100)")
    r.add_argument("--min-preds", type=int, help="override the run's min_preds")
    r.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    r.add_argument("--force", action="store_true", help="relabel even when the model-quality "
                   "guard (summary.json) says the audit cannot be trusted")
    r.set_defaults(func=_cmd_relabel)

    u = sub.add_parser("undo", help="reverse a relabel journal")
    u.add_argument("--journal", required=True, help="relabel-journal.jsonl of a run")
    u.set_defaults(func=_cmd_undo)

    ls = sub.add_parser("labelstudio", help="review suspects in Label Studio and read the "
                        "result back as decisions")
    ls_sub = ls.add_subparsers(dest="labelstudio_command", required=True)
    e = ls_sub.add_parser("export", help="write a Label Studio import file (and its labeling "
                          "config beside it) for a run's suspects; prints the file")
    e.add_argument("--results", required=True, help="results.csv inside a run folder")
    e.add_argument("--out", required=True, help="the tasks JSON file to write")
    e.add_argument("--image-root", required=True, help="where Label Studio finds the images: "
                   "a folder (served as local files), an s3:// URI or an http(s):// prefix")
    e.add_argument("--top-n", type=int, help="only the N most suspicious images")
    e.set_defaults(func=_cmd_labelstudio_export)
    i = ls_sub.add_parser("import", help="turn a Label Studio JSON export into decisions.csv "
                          "(checked against the run); prints the file")
    i.add_argument("--export", required=True, help="the project's export, JSON format")
    i.add_argument("--results", required=True, help="results.csv of the run it reviewed")
    i.add_argument("--out", required=True, help="the decisions CSV to write")
    i.set_defaults(func=_cmd_labelstudio_import)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code: 2 after an error the user can fix (one `error:`
    line), 130 after Ctrl-C; any other exception is a bug and propagates with its traceback
    (exit 1)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt as err:  # Ctrl-C: one line (an audit says what it kept)
        print(f"interrupted: {err}" if str(err) else "interrupted", file=sys.stderr)
        return 130
    return 0
