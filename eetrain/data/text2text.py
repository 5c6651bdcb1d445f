"""Text-to-text data (summarisation, translation, QA as generation) for any backbone.

Rows come from a hub dataset (`hf_name`) or local JSON/JSONL/CSV/Parquet files (`files`). The
backbone supplies the tokenizer and the collate function, so this module knows no model family.
`SplitDataModule` holds what every task's data shares (sources, splits, loaders, metrics); the
classification data (`eetrain.data.classification`) builds on it too.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from eetrain.data.sampler import ResumableDataLoader, ResumableSampler
from eetrain.errors import ConfigError, DataError, positive_int
from eetrain.hub import check_dataset_reachable
from eetrain.task_metrics import check_metrics

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: plain-text corpora also read TXT files: one document per blank-line-separated paragraph (column `text`)
TEXT_FORMATS = {**_FORMATS, ".txt": "text"}
#: the config key that names each role's split
SPLIT_KEYS = {"train": "data.train_split", "validation": "data.val_split", "test": "data.test_split"}
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def get_field(row: Mapping[str, Any], path: str) -> Any:
    """`row[path]`, or a dotted path into nested fields (`translation.en`, `answers.text`)."""
    if path in row:  # a flat column whose name has a dot wins over the nested reading
        return row[path]
    value: Any = row
    for part in path.split("."):
        value = value[part]
    return value


def _local_file(
    files: Mapping[str, Any] | None, split: str, role: str, also: Sequence[str], formats: Mapping[str, str] = _FORMATS
) -> tuple[str, str]:
    """(files key, path) of a role's file: `files[role]` (train/validation/test), else `files[split]`, else
    the file of another role with the same split (`also`).

    The role comes first so `data.files.validation` serves a hub split named `validation_matched`, and
    `data.files.test` serves a task whose hub test split is replaced by `validation`; a test split that
    is the validation split falls back to `data.files.validation`.
    """
    keys = list(dict.fromkeys((role, split, *also)))
    for name in keys:
        if files and files.get(name) is not None:
            return name, str(files[name])
    given = sorted(k for k, v in (files or {}).items() if v is not None)
    tried = ""
    if len(keys) > 1 and role in SPLIT_KEYS:
        tried = f" (nor {', '.join(f'data.files.{k}' for k in keys[1:])} for {SPLIT_KEYS[role]}={split!r})"
    raise ConfigError(
        f"data.files.{role} is not set{tried}; set data.hf_name or data.files.{role} to a "
        f"{'/'.join(sorted(formats))} file; files given: {', '.join(given) or 'none'}"
    )


def local_path(
    files: Mapping[str, Any] | None, split: str, role: str, also: Sequence[str] = (), formats: Mapping[str, str] = _FORMATS
) -> tuple[str, Path, str]:
    """(files key, path, `datasets` builder) of a split's local file (`_local_file`); a ConfigError when no
    key serves it, a DataError when the file is missing or of an unknown format."""
    key, value = _local_file(files, split, role, also, formats)
    path = Path(value).expanduser()
    if not path.exists():
        raise DataError(f"data.files.{key}={str(path)!r}: no such file")
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data.files.{key}={str(path)!r}: unknown format; allowed: {', '.join(sorted(formats))}")
    return key, path, fmt


def load_rows(
    split: str,
    hf_name: str | None,
    hf_config: str | None,
    files: Mapping[str, str] | None,
    columns: Mapping[str, str],
    role: str | None = None,
    column_keys: str = "data.source_column and data.target_column",
    also: Sequence[str] = (),
    formats: Mapping[str, str] = _FORMATS,
    text_fields: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Load one split as a list of {field: value} rows.

    columns: {field: how the config names it, for errors (e.g. "data.target_column='answers.text'")};
    a field is a column or a dotted path into a nested column. role: train/validation/test (the
    `data.files` key and the split key in errors; default: the split name). column_keys: the keys that
    name the columns, for the offline message. also: other `data.files` keys for this split (the roles
    that share its split name). formats: file suffix -> `datasets` builder (TEXT_FORMATS adds `.txt`).
    text_fields: the fields read as text from a CSV file (default: every field), whose cells pandas would
    otherwise type ("007" -> 7.0) or read as missing ("NA", "None", "nan"); only an empty cell is missing.
    """
    import datasets

    role = role or split
    if hf_name is not None:
        check_dataset_reachable(hf_name, columns=column_keys)
        try:
            ds = datasets.load_dataset(hf_name, hf_config, split=split)
        except ValueError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "Unknown split" in str(e):
                raise ConfigError(
                    f"{SPLIT_KEYS.get(role, 'split')}={split!r}: data.hf_name={hf_name!r} "
                    f"(data.hf_config={hf_config!r}) has no such split; {e}"
                ) from None
            if "BuilderConfig" in str(e) or "Config name is missing" in str(e):
                raise ConfigError(f"data.hf_config={hf_config!r} is not a config of data.hf_name={hf_name!r}: {first}") from None
            raise ConfigError(f"data.hf_name={hf_name!r} (data.hf_config={hf_config!r}) cannot be loaded: {first}; "
                              "local files load with data.hf_name=null data.files.train=... data.files.validation=... "
                              "(JSON, JSONL, CSV or Parquet)") from None
        except RuntimeError as e:
            # datasets >= 4 refuses a repository that is only a loading script (some older hub datasets)
            if "scripts are no longer supported" not in str(e):
                raise
            raise ConfigError(
                f"data.hf_name={hf_name!r} is a loading-script dataset, which datasets {datasets.__version__} "
                "no longer runs. Use files instead (e.g. exported once from the hub's Parquet conversion, "
                "branch refs/convert/parquet): data.hf_name=null data.files.train=... data.files.validation=... "
                f"data.files.test=... (JSON, JSONL, CSV or Parquet with the columns named by {column_keys})"
            ) from None
        where = f"data.hf_name={hf_name!r} split {split!r}"
    else:
        key, path, fmt = local_path(files, split, role, also, formats)
        where = f"data.files.{key}={str(path)!r}"
        if path.stat().st_size == 0:
            raise DataError(f"{where} is empty")
        try:
            # a TXT file's documents are its paragraphs: hard-wrapped lines stay in one document
            extra: dict[str, Any] = {"sample_by": "paragraph"} if fmt == "text" else {}
            if fmt == "csv":
                text = columns if text_fields is None else text_fields
                extra.update(converters={f.split(".")[0]: str for f in text}, keep_default_na=False, na_values=[""])
            ds = datasets.load_dataset(fmt, data_files={"rows": str(path)}, split="rows", **extra)
        except ValueError as e:
            # datasets reports a header-only file as "Instruction ... corresponds to no data"
            raise DataError(f"{where} is empty or unreadable as {fmt}: {e}") from e
        except datasets.exceptions.DatasetGenerationError as e:  # a malformed line, a broken file
            cause = e.__cause__ or e
            raise DataError(f"{where} is not readable as {fmt}: {str(cause).splitlines()[0][:300]}") from e
    # a nested field is read from its top-level column (translation.en -> translation)
    top = {f: f if f in ds.column_names else f.split(".")[0] for f in columns}
    missing = [f for f in columns if top[f] not in ds.column_names]
    if missing:
        named = ", ".join(columns[f] for f in missing)
        raise DataError(f"{where} has no column {named}; its columns are {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"{where} is empty")
    rows = []
    for i, raw in enumerate(ds.select_columns(list(dict.fromkeys(top.values()))).to_list()):
        row = {}
        for f, named in columns.items():
            try:
                value = get_field(raw, f)
            except (KeyError, TypeError, IndexError):
                raise DataError(
                    f"{where} row {i}: no field {named}; the row's {top[f]!r} is {str(raw[top[f]])[:200]}"
                ) from None
            if value is None or value == []:
                raise DataError(f"{where} row {i}: {named} is empty ({value!r})")
            row[f] = value
        rows.append(row)
    return rows


def truncate(ids: list[int], max_length: int, eos_id: int | None) -> list[int]:
    """Cut to `max_length`, keeping a trailing eos so the model still learns to stop."""
    if len(ids) <= max_length:
        return ids
    out = ids[:max_length]
    if eos_id is not None and ids[-1] == eos_id:
        out[-1] = eos_id
    return out


def as_completion(ids: list[int], bos_id: int | None, eos_id: int | None) -> list[int]:
    """A target's token ids as the completion of its source: without the bos that LLaMA-style tokenizers
    put first (it would sit mid-sequence after the source in a decoder-only model) and ending with eos,
    which those tokenizers do not add, so the model learns to stop. T5's targets (no bos, eos last) are
    unchanged."""
    out = list(ids)
    if out and bos_id is not None and bos_id != eos_id and out[0] == bos_id:
        out = out[1:]
    if eos_id is not None and (not out or out[-1] != eos_id):
        out.append(eos_id)
    return out


def check_headline_metric(metric: str, metrics: Sequence[str], kind: str) -> tuple[str, tuple[str, ...]]:
    """Validate `data.metrics` (names of `kind` "text" or "label") and that `data.metric` is one of them."""
    names = tuple(str(m) for m in metrics)
    check_metrics(list(names), kind, key="data.metrics")
    if metric not in names:
        raise ConfigError(f"data.metric={metric!r} is not in data.metrics; allowed: {', '.join(names)}")
    return str(metric), names


def check_own_files(files: Mapping[str, Any] | None) -> None:
    """Refuse your own training or validation file beside the shipped demo's files: a demo config's
    `data.files` keep the demo's test file when you override train and validation, and a stage would then
    decode the demo's test set and score it as yours. (The demo's training data with a test file of your
    own is allowed.)"""
    from eetrain.data.make_demo import DEMO_DIR

    given = {k: Path(str(v)).expanduser() for k, v in (files or {}).items() if v is not None}
    shipped = sorted(k for k, p in given.items() if p.resolve().is_relative_to(DEMO_DIR.resolve()))
    own = sorted(k for k in given if k not in shipped)
    if shipped and ({"train", "validation"} & set(own)):
        raise ConfigError(
            f"{', '.join(f'data.files.{k}' for k in own)} are your own file(s), and "
            f"{', '.join(f'data.files.{k}' for k in shipped)} still the shipped demo's ({given[shipped[0]].name}, ...): "
            f"set {' '.join(f'data.files.{k}=<your file>' for k in shipped)}, or =null for a split no stage reads"
        )


class SplitDataModule(L.LightningDataModule):
    """Splits by role (train / validation / test) from a hub dataset or local files, batched by the
    backbone's collate. Subclasses set `self.fields` ({field: key description}) and `self.column_keys`,
    and implement `tokenize(rows) -> (examples, stats)` and `describe(stats)`."""

    fields: dict[str, str]
    column_keys: str
    #: file suffix -> `datasets` builder of the local files this data reads
    formats: Mapping[str, str] = _FORMATS
    #: the seed of the training order (`ResumableSampler`: one permutation per epoch); train.py sets the
    #: run's `seed`
    shuffle_seed: int = 0
    #: the head the examples are for: "token" (a target text) or "sequence" (a class or a score)
    head_kind: str = "token"
    #: whether each example has a source (an encoder-decoder needs one; packed plain text has none)
    has_source: bool = True

    def __init__(
        self,
        tokenizer: Any,
        collate_fn: Callable[[list[dict[str, Any]]], Any],
        hf_name: str | None,
        hf_config: str | None,
        files: Mapping[str, str] | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        splits: Mapping[str, str],
    ):
        super().__init__()
        if hf_name is None and not any(v is not None for v in (files or {}).values()):
            raise ConfigError("set data.hf_name (a hub dataset) or data.files (local train/validation files)")
        if hf_name is None:
            check_own_files(files)
        positive_int(batch_size, "data.batch_size")
        positive_int(eval_batch_size, "data.eval_batch_size", null="data.batch_size")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r}; allowed: an integer >= 0 (0: load in the main process)")
        self.tokenizer = tokenizer
        self.collate_fn = collate_fn
        self.source = dict(hf_name=hf_name, hf_config=hf_config, files=dict(files) if files else None)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = num_workers
        #: role -> split name; setup() loads train and validation, split_examples("test") the test split
        self.splits = {role: str(name) for role, name in splits.items()}
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        #: per role: counts from tokenize (examples, truncated ...)
        self.truncation: dict[str, dict[str, int]] = {}
        self._train_sampler: ResumableSampler | None = None
        #: (epoch, batches already trained in it) from a checkpoint; applied to the next training loader
        self._resume: tuple[int, int] | None = None

    @property
    def text_fields(self) -> list[str]:
        """The fields that hold text (a CSV file's cells are read as written); default: every field."""
        return list(self.fields)

    def tokenize(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        raise NotImplementedError

    def describe(self, stats: dict[str, int]) -> str:
        return f"{stats['examples']} examples"

    def _load(self, role: str) -> None:
        split = self.splits.get(role, role)
        also = [r for r, s in self.splits.items() if s == split]
        rows = load_rows(split, columns=self.fields, role=role, column_keys=self.column_keys, also=also,
                         formats=self.formats, text_fields=self.text_fields, **self.source)
        self.loading = role  # (a label check's hint depends on the role)
        try:
            self.datasets[role], self.truncation[role] = self.tokenize(rows)
        except DataError as e:
            raise DataError(f"{SPLIT_KEYS.get(role, 'split')}={split!r}: {e}") from None

    def check_fits(self, backbone: Any) -> None:
        """Stop at once (a ConfigError naming both sides) when `backbone` cannot learn from these
        examples: classes or scores need a sequence head, target texts a token head, and an
        encoder-decoder a source for its encoder."""
        data, model = f"data ({type(self).__name__})", f"the {backbone.family} adapter"
        if self.head_kind == "sequence" and backbone.head_kind != "sequence":
            raise ConfigError(f"{data} labels each example with a class or a score, and {model} has a token head "
                              "that learns a target text: use model=bert_tiny or bert_base, or a text-to-text data config")
        if self.head_kind == "token" and backbone.head_kind == "sequence":
            raise ConfigError(f"{data} gives each example a target text, and {model} classifies whole sequences: "
                              "use a GLUE data config (data=glue_sst2, ...) or data=demo_classification")
        if not self.has_source and backbone.needs_source:
            raise ConfigError(f"{data} packs plain text for a decoder-only model (no source), and {model} is an "
                              "encoder-decoder that reads a source: use model=llama_tiny or llama_1b_lora, or a "
                              "text-to-text data config")

    def setup(self, stage: str | None = None) -> None:
        # without training (train=false: the report, the stages) the training split is loaded on first use
        for role in ("train", "validation") if stage in ("fit", None) else ("validation",):
            self._ensure(role)

    def _ensure(self, role: str) -> None:
        if role not in self.datasets:
            self._load(role)
            print(f"[data] {role}: {self.describe(self.truncation[role])}")

    def check_split(self, split: str, key: str) -> None:
        """Fail now, naming `key`, when local files have nothing for `split` (a role or a split name, as
        in `split_examples`): before training, not when a stage asks for the split after it. A hub
        dataset's splits are known only once it loads."""
        if self.source["hf_name"] is not None:
            return
        role = split if split in self.splits else next((r for r, s in self.splits.items() if s == split), split)
        name = self.splits.get(role, role)
        try:
            local_path(self.source["files"], name, role, [r for r, s in self.splits.items() if s == name], self.formats)
        except (ConfigError, DataError) as e:
            raise type(e)(f"{key}={split!r}: {e}") from None

    def split_examples(self, split: str, key: str | None = None) -> list[dict[str, Any]]:
        """The tokenised examples of one split, loaded on first use: a role (`train`, `validation`,
        `test`: the split that `data.test_split` names), a configured split name, or another split
        (`data.files.<split>` or the hub dataset's split). key: the setting that chose `split` (e.g.
        `decoding.split`), named first in a ConfigError."""
        role = split if split in self.splits else next((r for r, s in self.splits.items() if s == split), split)
        if role not in self.datasets:
            try:
                self._load(role)
            except ConfigError as e:
                if key is None:
                    raise
                raise ConfigError(f"{key}={split!r}: {e}") from None
        return self.datasets[role]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[name],
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        """A loader's own generator: a new iterator (every epoch, every validation) draws its worker base
        seed from it, not from the global RNG, so a run resumed from a checkpoint draws the same dropout
        masks as the run that wrote it (Lightning builds the resumed run's iterator before the module
        restores the global RNG)."""
        return torch.Generator().manual_seed(self.shuffle_seed)

    def _fitting(self) -> Any:
        """The trainer while it fits (then the training order is split across its ranks), else None."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit" or trainer.state.status != "running":
            return None
        return trainer

    def train_dataloader(self) -> DataLoader:
        """Batches in a seeded per-epoch order (`ResumableSampler`), split by rank while fitting; after a
        checkpoint is loaded the first epoch starts where the checkpoint's run stopped."""
        self._ensure("train")
        trainer = self._fitting()
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.datasets["train"], replicas, rank, shuffle=True, seed=self.shuffle_seed)
        if trainer is not None:
            self._train_sampler = sampler
            if self._resume is not None:
                sampler.resume(self._resume[0], self._resume[1] * self.batch_size)
        return ResumableDataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data, saved in every checkpoint: the epoch and how many batches of it
        the trainer has taken (Lightning's own count, so batches a loader fetched ahead do not count)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # the epoch whose order the batches came from (after a fit that max_steps ended mid-epoch,
        # Lightning's current_epoch has already moved on)
        epoch = self._train_sampler.epoch if self._train_sampler is not None else trainer.current_epoch
        taken = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return {"train_position": {"epoch": epoch, "batches": taken, "batch_size": self.batch_size,
                                   "world_size": trainer.world_size, "seed": self.shuffle_seed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order at a checkpoint's position (Lightning calls this on `ckpt_path`)."""
        pos = state_dict.get("train_position")
        if not pos:
            return
        now = {"batch_size": self.batch_size, "seed": self.shuffle_seed}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            now["world_size"] = trainer.world_size
        changed = {k: (pos[k], v) for k, v in now.items() if k in pos and pos[k] != v}
        if changed:
            import warnings

            warnings.warn(
                f"resuming with other data settings than the checkpoint's ({changed}, as (then, now)): the rest "
                f"of epoch {pos['epoch']} starts after {pos['batches']} batches of the new order, not exactly "
                "where the checkpoint's run was", stacklevel=2,
            )
        self._resume = (int(pos["epoch"]), int(pos["batches"]))
        loop = getattr(trainer, "fit_loop", None)
        if self._train_sampler is not None and getattr(loop, "_combined_loader", None) is not None:
            # FSDP and DeepSpeed restore after the loader is built (and loader workers may already have
            # drawn indices): Lightning builds it again, from the position
            loop._combined_loader = None

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)


def template_fields(template: str, key: str = "data.source_template") -> list[str]:
    """The columns a `str.format` template names (`{context}`, `{answers[text]}` -> answers); `key` names
    the template's config key in errors."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{key}={template!r} is not a valid format string: {e}") from None
    tops = [n.split(".")[0].split("[")[0] for n in names]
    if not tops or any(not t or t.isdigit() for t in tops):
        raise ConfigError(
            f"{key}={template!r} must name columns, e.g. 'question: {{question}} context: {{context}}'"
        )
    return list(dict.fromkeys(tops))


class Text2TextDataModule(SplitDataModule):
    """Examples {"source_ids", "target_ids", "reference"}: the reference is the raw target text, or every
    answer when the target field is a list (the first one is the training target)."""

    def __init__(
        self,
        tokenizer: Any,
        collate_fn: Callable[[list[dict[str, Any]]], Any],
        hf_name: str | None = None,
        hf_config: str | None = None,
        files: Mapping[str, str] | None = None,
        source_column: str = "source",
        target_column: str = "target",
        prefix: str = "",
        max_source_length: int = 512,
        max_target_length: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        source_template: str | None = None,
        metric: str = "rougeL",
        metrics: Sequence[str] = ROUGE,
    ):
        for key, v in (("data.max_source_length", max_source_length), ("data.max_target_length", max_target_length)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}={v!r} must be an integer >= 1 (tokens)")
        super().__init__(tokenizer, collate_fn, hf_name, hf_config, files, batch_size, eval_batch_size, num_workers,
                         {"train": train_split, "validation": val_split, "test": test_split})
        self.metric, self.metrics = check_headline_metric(metric, metrics, "text")
        self.columns = (source_column, target_column)
        self.template = source_template
        if source_template is not None:
            sources = {c: f"{c!r} (named in data.source_template)" for c in template_fields(source_template)}
            self.column_keys = f"data.source_template={source_template!r} and data.target_column={target_column!r}"
        else:
            sources = {source_column: f"data.source_column={source_column!r}"}
            self.column_keys = f"data.source_column={source_column!r} and data.target_column={target_column!r}"
        self.fields = {**sources, target_column: f"data.target_column={target_column!r}"}
        self.prefix = "" if prefix is None else str(prefix)  # null: no prefix
        self.max_lengths = (int(max_source_length), int(max_target_length))

    def sources(self, rows: list[dict[str, Any]]) -> list[str]:
        if self.template is None:
            return [self.prefix + str(r[self.columns[0]]) for r in rows]
        out = []
        for i, r in enumerate(rows):
            try:
                out.append(self.prefix + self.template.format_map(r))
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                raise DataError(f"row {i}: data.source_template={self.template!r} cannot be filled: {e!r}") from None
        return out

    def tokenize(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        values = [r[self.columns[1]] for r in rows]
        # a list target (SQuAD's answers.text): train on the first, score against all of them
        references = [[str(a) for a in v] if isinstance(v, list) else str(v) for v in values]
        targets = [r[0] if isinstance(r, list) else r for r in references]
        src_ids = self.tokenizer(self.sources(rows), add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        tgt_ids = [as_completion(t, self.tokenizer.bos_token_id, eos)
                   for t in self.tokenizer(targets, add_special_tokens=True)["input_ids"]]
        max_src, max_tgt = self.max_lengths
        stats = {
            "examples": len(rows),
            "source_truncated": sum(len(s) > max_src for s in src_ids),
            "target_truncated": sum(len(t) > max_tgt for t in tgt_ids),
        }
        examples = [
            {"source_ids": truncate(s, max_src, eos), "target_ids": truncate(t, max_tgt, eos), "reference": ref}
            for s, t, ref in zip(src_ids, tgt_ids, references, strict=True)
        ]
        return examples, stats

    def describe(self, stats: dict[str, int]) -> str:
        return (
            f"{stats['examples']} examples; truncated sources {stats['source_truncated']} "
            f"(> {self.max_lengths[0]} tokens), targets {stats['target_truncated']} (> {self.max_lengths[1]} tokens)"
        )
