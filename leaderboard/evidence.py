"""The leaderboard's evidence: one JSON record per run behind the page, and each cell's config.

`bench leaderboard` reads the runs from MLflow (through `benchmark/tracking.py`),
writes them as `runs.jsonl` (gzip-compressed as `runs.jsonl.gz` past
`MAX_PLAIN_BYTES`), reads that text back and builds the page from it;
`bench leaderboard --from runs.jsonl` starts at the reading. Both take the one
path `publish(text, out)`, so a page rebuilt from the evidence file alone is
byte-for-byte the page built from the store.

The file's first line is the board's record (experiment, stage, budget); each
further line is one run: its id, method, dataset, seed and stage; its resolved
config as TOML (what `bench run --config` accepts); the config and partition
hashes, pflbench version and git commit; its params and final metrics; every
metric's per-round history; its per-client accuracies; and the tuning study
whose best config it started from. Nothing in it names a local path: the data
root is left out (a rerun takes `--data-root`), a saved partition or
checkpoint file keeps only its file name.

`configs/DATASET-SETTING-METHOD.toml` holds each cell's config, so that
`bench run --config configs/CELL.toml --seed S` reruns one of its runs.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import tomllib
from pathlib import Path, PurePath
from typing import Any, Sequence

from ..benchmark.errors import UserError
from ..benchmark.records import Artifact, Stage, Tag
from .build import Board, RunRow, build_board, write_board

FORMAT = "pflbench-leaderboard-evidence"
VERSION = 1
EVIDENCE = "runs.jsonl"
MAX_PLAIN_BYTES = 2_000_000  # past this the evidence is written gzip-compressed (EVIDENCE + ".gz")
CONFIGS = "configs"
# Where files lie on the machine that ran: the data root is dropped, a file keeps only its name.
DROPPED = ("dataset.root",)
FILE_KEYS = ("data.partition_file", "model.pretrained_path")
RUN_KEYS = ("run_id", "method", "dataset", "seed", "stage", "start_time", "end_time", "params", "metrics", "history",
            "clients")
# The keys a tuning study decides, for matching a run recorded without its study's tag to the study:
# everything but the setting (data, model, dataset, rounds, client sampling), the seed and where it ran.
_NOT_TUNED = ("seed", "device", "dataset.", "data.", "model.", "run.", "train.rounds", "train.sample_fraction",
              "train.eval_every")
_GZIP_MAGIC = b"\x1f\x8b"


# ---------------------------------------------------------------------------
# Scrubbing local paths


def _scrub_value(key: str, value: str) -> str | None:
    """A param value fit to publish: None drops it, a file path keeps its name."""
    if key in DROPPED:
        return None
    if key in FILE_KEYS and value:
        return PurePath(value).name
    return value


def scrub_params(params: dict[str, str]) -> dict[str, str]:
    """A run's params without the local paths (`DROPPED`, `FILE_KEYS`)."""
    out = {}
    for key, value in sorted(params.items()):
        kept = _scrub_value(key, value)
        if kept is not None:
            out[key] = kept
    return out


_LINE = re.compile(r"^(\w+) = (.*)$")


def scrub_config(text: str) -> str:
    """A run's `config.toml` without the local paths; `bench run --config` still accepts it."""
    out, section = [], ""
    for line in text.splitlines():
        header = re.match(r"^\[(\w+)\]$", line)
        if header:
            section = header.group(1)
        match = _LINE.match(line)
        if match:
            key = f"{section}.{match.group(1)}" if section else match.group(1)
            if key in DROPPED:
                continue
            if key in FILE_KEYS:
                value = json.loads(match.group(2))
                line = f"{match.group(1)} = {json.dumps(PurePath(value).name if value else value)}"
        out.append(line)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# Reading the store (MLflow only through benchmark/tracking.py)


def _number(text: str) -> int | float | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_clients(text: str | None) -> list[dict[str, Any]]:
    """A run's `client_accuracy.csv` as one dict per client (numbers; None where a split is empty)."""
    if not text:
        return []
    return [{k: _number(v or "") for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A parsed TOML config flattened as MLflow params are (`str` of each value)."""
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _tuned_keys_match(best: dict[str, str], params: dict[str, str]) -> bool:
    keys = [k for k in best if not k.startswith(_NOT_TUNED)]
    return bool(keys) and all(params.get(k) == best[k] for k in keys)


def _study_of(parent, tuned_by: str) -> dict[str, Any]:
    tags, metrics = (parent.tags, parent.metrics) if parent is not None else ({}, {})
    trial = tags.get(Tag.BEST_TRIAL)
    value = metrics.get("best_val_acc_mean")
    return {"study": tags.get(Tag.STUDY, tuned_by), "best_trial": int(trial) if trial else None,
            "best_val_acc_mean": value, "trials": int(metrics["trials"]) if "trials" in metrics else None}


def _tuning(run, studies, tracking_uri) -> dict[str, Any] | None:
    """The study whose best config the run started from: by the sweep's tag, else by its tuned settings."""
    from ..benchmark.tracking import get_run_record

    if Tag.TUNED_BY in run.tags:
        parent_id = run.tags.get(Tag.TUNED_RUN, "")
        parent = next((p for p, _ in studies if p.run_id == parent_id), None) or \
            (get_run_record(tracking_uri, parent_id) if parent_id else None)
        return _study_of(parent, run.tags[Tag.TUNED_BY]) | {"found_by": "tag"}
    tags = run.tags
    matched = [p for p, best in studies if p.tags.get(Tag.METHOD) == tags.get(Tag.METHOD)
               and p.tags.get(Tag.DATASET) == tags.get(Tag.DATASET) and _tuned_keys_match(best, run.params)]
    names = {p.tags[Tag.STUDY] for p in matched}
    if len(names) != 1:  # none, or several studies that chose the same settings: not attributable
        return None
    return _study_of(matched[-1], "") | {"found_by": "config"}  # the newest parent of a resumed study


def store_records(tracking_uri: str | None, experiment: str, stage: str = Stage.FINAL) -> list[dict[str, Any]]:
    """The evidence record of every finished run of `stage` in `experiment` (sorted: dataset, method, seed)."""
    from ..benchmark.tracking import experiment_exists, find_runs, metric_histories, read_text_artifact

    if not experiment_exists(tracking_uri, experiment):
        raise UserError(f"no MLflow experiment {experiment!r} in the tracking store; "
                        "run `bench sweep SUITE.toml` first, or pass --experiment / --tracking-uri")
    runs = [r for r in find_runs(tracking_uri, experiment, stage=stage) if Tag.PARENT not in r.tags]
    if not runs:
        raise UserError(f"experiment {experiment!r} has no finished runs of stage {stage!r}; "
                        "run `bench sweep SUITE.toml` first (its runs are stage final)")
    studies = []  # (parent run, its best config flattened), oldest first
    for parent in find_runs(tracking_uri, experiment, stage=Stage.TUNE, status=None):
        if Tag.STUDY in parent.tags and Tag.PARENT not in parent.tags:
            text = read_text_artifact(tracking_uri, parent.run_id, Artifact.BEST_CONFIG)
            if text is not None:
                studies.append((parent, _flat(tomllib.loads(text))))
    records = []
    for run in runs:
        tags = run.tags
        config = read_text_artifact(tracking_uri, run.run_id, Artifact.CONFIG)
        records.append({
            "kind": "run", "run_id": run.run_id, "method": tags.get(Tag.METHOD, "?"),
            "dataset": tags.get(Tag.DATASET, "?"), "seed": int(tags.get(Tag.SEED, "0")),
            "stage": tags.get(Tag.STAGE, stage), "status": run.status,
            "start_time": run.start_time, "end_time": run.end_time,
            "config": scrub_config(config) if config is not None else None,
            "config_hash": tags.get(Tag.CONFIG_HASH, ""),
            "partition_hash": tags.get(Tag.PARTITION_HASH, ""),
            "version": tags.get(Tag.VERSION, ""), "git_commit": tags.get(Tag.GIT_COMMIT, ""),
            "parameters": _number(tags.get(Tag.PARAMETERS, "")),
            "personal_parameters": _number(tags.get(Tag.PERSONAL_PARAMETERS, "")),
            "params": scrub_params(run.params), "metrics": dict(sorted(run.metrics.items())),
            "history": {k: [list(p) for p in v] for k, v in
                        metric_histories(tracking_uri, run.run_id, list(run.metrics)).items()},
            "clients": parse_clients(read_text_artifact(tracking_uri, run.run_id, Artifact.CLIENT_ACCURACY)),
            "tuning": _tuning(run, studies, tracking_uri),
        })
    records.sort(key=lambda r: (r["dataset"], r["method"], r["seed"], r["start_time"], r["run_id"]))
    return records


# ---------------------------------------------------------------------------
# The file


def header(experiment: str, stage: str, budget: str = "", pending: bool = True) -> dict[str, Any]:
    """The board's record: what the page says beside the runs."""
    return {"kind": "board", "format": FORMAT, "version": VERSION, "experiment": experiment, "stage": stage,
            "budget": budget, "pending": pending}


def dumps(head: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The evidence as JSON lines: the board's record, then one per run (keys sorted, no NaN)."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
                   for r in [head, *records])


def loads(text: str, source: str = EVIDENCE) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parse evidence text; a malformed file is a UserError naming the line."""
    lines = text.splitlines()
    parsed = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{source} line {i} is not JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{source} line {i} is not a JSON object")
        parsed.append(record)
    if not parsed or parsed[0].get("kind") != "board" or parsed[0].get("format") != FORMAT:
        raise UserError(f"{source} is not a leaderboard evidence file (its first line is not the board's record)")
    if parsed[0].get("version") != VERSION:
        raise UserError(f"{source} is evidence version {parsed[0].get('version')!r}; this pflbench reads {VERSION}")
    for i, record in enumerate(parsed[1:], 2):
        missing = [k for k in RUN_KEYS if k not in record]
        if record.get("kind") != "run" or missing:
            raise UserError(f"{source} line {i} is not a run record"
                            + (f" (missing {', '.join(missing)})" if missing else ""))
    return parsed[0], parsed[1:]


def read_text(path: str | Path) -> str:
    """The text of an evidence file, plain or gzip-compressed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"evidence file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"evidence file {path} is a folder; pass the runs.jsonl file in it") from None
    try:
        return (gzip.decompress(data) if data.startswith(_GZIP_MAGIC) else data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"evidence file {path} is neither JSON lines nor gzip-compressed JSON lines: {err}") from None


def write_text(text: str, out: Path) -> Path:
    """Write the evidence into `out`: `runs.jsonl`, or `runs.jsonl.gz` past `MAX_PLAIN_BYTES`; its path."""
    data = text.encode("utf-8")
    path = out / evidence_name(text)
    other = EVIDENCE if path.suffix == ".gz" else EVIDENCE + ".gz"
    (out / other).unlink(missing_ok=True)  # the other form, from an earlier build
    # gzip without a timestamp: the same runs give the same bytes
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0) if path.suffix == ".gz" else data)
    return path


def evidence_name(text: str) -> str:
    """`runs.jsonl`, or `runs.jsonl.gz` when the text is past `MAX_PLAIN_BYTES`."""
    return EVIDENCE + (".gz" if len(text.encode("utf-8")) > MAX_PLAIN_BYTES else "")


# ---------------------------------------------------------------------------
# Records -> the page


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def to_row(record: dict[str, Any]) -> RunRow:
    """The page's view of a run record."""
    def mean(key: str) -> float:
        values = [v for _, v in record["history"].get(key, [])]
        return sum(values) / len(values) if values else math.nan

    return RunRow(
        record["run_id"], record["method"], record["dataset"], int(record["seed"]), int(record["start_time"]),
        int(record["end_time"]), dict(record["params"]), {k: float(v) for k, v in record["metrics"].items()},
        [float(c["test_acc"]) for c in record["clients"] if c.get("test_acc") is not None],
        record.get("version", ""), record.get("git_commit", ""), mean("train_samples"), mean("train_flops"),
        _nan(record.get("parameters")), _nan(record.get("personal_parameters")),
    )


def config_name(dataset: str, setting_hash: str, method: str) -> str:
    """A cell's config file name (beside the page, under `configs/`)."""
    return f"{dataset}-{setting_hash}-{method}.toml"


def _without_seed(config: str) -> str:
    return re.sub(r"^seed = .*\n", "", config, count=1, flags=re.M)


def cell_configs(board: Board, records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each cell's config (file name -> TOML): its newest run's, with comments naming the runs and the study."""
    by_id = {r["run_id"]: r for r in records}
    out = {}
    for section in board.sections:
        for cell in section.cells:
            runs = [by_id[r.run_id] for r in cell.runs if by_id[r.run_id].get("config")]
            if not runs:
                continue
            newest = max(runs, key=lambda r: (r["start_time"], r["run_id"]))
            same = [r for r in runs if _without_seed(r["config"]) == _without_seed(newest["config"])]
            name = config_name(section.dataset, section.setting_hash, cell.method)
            lines = [f"# pflbench leaderboard: {cell.method} on {section.dataset} (setting {section.setting_hash})",
                     "# the config of these runs (seed: MLflow run id; each run's record is in runs.jsonl):",
                     *(f"#   {r['seed']}: {r['run_id']}" for r in same)]
            if len(same) < len(runs):
                lines.append(f"# {len(runs) - len(same)} other run(s) of this cell had another config: see runs.jsonl")
            tuning = newest.get("tuning")
            if tuning:
                trial = "" if tuning.get("best_trial") is None else f", best trial {tuning['best_trial']}"
                val = tuning.get("best_val_acc_mean")
                lines.append(f"# tuned by the Optuna study {tuning['study']}{trial}"
                             + ("" if val is None else f" (val_acc_mean {val:.4f})"))
            lines.append(f"# rerun one on the CPU: bench run --config {CONFIGS}/{name} --seed "
                         f"{same[0]['seed']} --device cpu [--data-root DIR]")
            out[name] = "\n".join(lines) + "\n" + same[0]["config"]  # the first seed's: `seed =` as in the comment
    return out


def publish(text: str, out: str | Path, *, budget: str | None = None,
            pending: bool | None = None) -> tuple[Board, dict[str, Path]]:
    """Build the page from evidence text and write it, the evidence and the cell configs into `out`.

    `budget` and `pending`, when given, replace what the board's record says.
    """
    head, records = loads(text)
    if budget is not None or pending is not None:
        head = head | ({} if budget is None else {"budget": budget}) | ({} if pending is None else {"pending": pending})
        text = dumps(head, records)
    board = build_board([to_row(r) for r in records], experiment=head["experiment"], stage=head["stage"],
                        budget=head.get("budget", ""), pending=head.get("pending", True))
    board.evidence = evidence_name(text)
    written = write_board(board, out)
    out = Path(out)
    evidence = write_text(text, out)
    written[evidence.name] = evidence
    folder = out / CONFIGS
    configs = cell_configs(board, records)
    if configs:
        folder.mkdir(exist_ok=True)
    for name, config in configs.items():
        (folder / name).write_text(config, encoding="utf-8")
        written[f"{CONFIGS}/{name}"] = folder / name
    return board, written
