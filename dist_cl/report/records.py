"""Reading a run's metrics.jsonl (written by dist_cl.report.metrics_log): its records of one kind, by epoch."""

import json
from pathlib import Path


def read_records(path: Path, kind: str = "eval") -> dict[int, dict]:
    """The records of ``kind`` ('eval' or 'epoch') by epoch, in epoch order; none where there is no file.

    A resumed run may repeat an epoch: the last record wins. A line cut by a kill is skipped. A record
    without a kind is an evaluation (runs from before the epoch lines).
    """
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                continue
            if record is not None and record.get("kind", "eval") == kind:
                records[int(record["epoch"])] = record
    return dict(sorted(records.items()))
