"""The results table's entries against the committed report and records."""

import json
import os

from experiments import reproduce

RESULTS = os.path.join(reproduce.REPO, "experiments", "results")


def _entries():
  reproduce._load_more_entries()
  return reproduce.ENTRIES


def _report_rows() -> dict[str, list[list[str]]]:
  """The committed RESULTS.md's rows, per table: each row's cells."""
  tables, rows = {}, None
  for line in open(os.path.join(reproduce.REPO, "RESULTS.md")):
    line = line.rstrip("\n")
    if line.startswith("## "):
      rows = tables.setdefault(line[3:], [])
    elif rows is not None and line.startswith("| ") and not line.startswith(
        ("| method |", "| --- |")):
      rows.append([c.strip() for c in line.split(" | ")])
  return tables


def test_committed_report_shows_each_entry_with_its_published_number():
  """The committed RESULTS.md (the published numbers as the project
  documents them, with their sources) has exactly one row per registered
  entry, in its table, with the entry's method, published number (%, one
  decimal), source and config: an entry whose anchor, source, table, method
  or variant argument changes no longer matches the report (re-write it
  with ``python -m experiments.reproduce --report_only``)."""
  entries = _entries()
  tables = _report_rows()
  assert sum(len(r) for r in tables.values()) == len(entries)
  for e in entries:
    cfg = f"`{e.config}.py:{e.arg}`"
    rows = [r for r in tables.get(e.table, ())
            if r[0] == f"| {e.method}" and cfg in r]
    assert len(rows) == 1, (e.table, e.method, e.arg)
    pub = "—" if e.published is None else f"{100 * e.published:.1f}"
    assert rows[0][2:4] == [pub, e.source], e


def test_every_committed_record_is_an_entry_of_the_same_config(tmp_path,
                                                               data_dir):
  """Each record in experiments/results/ belongs to a registered entry
  (an entry whose variant argument changed leaves its record orphaned) and
  is still reused for it (its config, per-seed draw and pretraining run are
  those the record was made with): run_entry returns the record rather than
  the skip reason, without running anything."""
  by_id = {e.id: e for e in _entries()}
  names = sorted(os.listdir(RESULTS))
  assert len(names) > 100
  for name in names:
    assert name.endswith(".json") and name[:-5] in by_id, name
    e = by_id[name[:-5]]
    rec = json.load(open(os.path.join(RESULTS, name)))
    got = reproduce.run_entry(e, rec["seeds"], str(tmp_path / "w" / e.id),
                              data_dir, smoke=False, skip="not reused",
                              record=os.path.join(RESULTS, name))
    assert got == rec, (name, got)
  assert not (tmp_path / "w").exists()
