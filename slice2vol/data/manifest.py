"""Cohorts: a CSV manifest or a folder/BIDS glob -> subjects with image paths and labels.

A manifest is a CSV with a ``subject_id`` column, one column per image modality (values are paths
ending in ``.nii``, ``.nii.gz``, ``.nii.bz2`` or ``.nii.zst``, relative to the manifest's folder; a
column holds paths when some cell is a NIfTI file name and at least half of its cells name files), an
optional segmentation column (``seg``), optional other label maps (columns whose name contains ``mask``,
``lesion``, ``seg`` or ``parc``),
and any label columns. Rows that cannot be used (duplicate IDs, missing files, one scan under two IDs
as a link or a byte-identical copy) are recorded in
``Cohort.failures`` and left out; the other subjects load normally. The delimiter is sniffed from
the header line (comma, semicolon, tab or ``|``: spreadsheets in many locales write ``;``).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import logging
import os
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd

from slice2vol.data.io import (Volume, VolumeConfig, VolumeError, file_problem, file_sha256, load_volume,
                               printable_path)
from slice2vol.inputs import InputFileError, read_input_bytes

log = logging.getLogger(__name__)
LabelType = Literal["categorical", "continuous"]
#: file names nibabel reads as NIfTI (.zst needs the package backports.zstd)
_NIFTI = re.compile(r"\.nii(\.gz|\.bz2|\.zst)?$", re.IGNORECASE)
_NIFTI_NAMES = ".nii, .nii.gz, .nii.bz2 or .nii.zst"


class ManifestError(ValueError):
    """A manifest that cannot be read at all (the message names the file)."""


@dataclass
class Subject:
    subject_id: str
    images: dict[str, Path]
    seg: Path | None = None
    maps: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    #: line of the manifest file that lists this subject (1 = the header), for messages; None for a
    #: cohort built from files (``cohort_from_glob``) or by hand
    row: int | None = field(default=None, compare=False)


@dataclass
class Failure:
    subject_id: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject_id}: {self.message}"

    @classmethod
    def of(cls, subject: "Subject", err: BaseException) -> "Failure":
        """The failure of one subject whose files raised ``err``: a :class:`VolumeError`'s own one-line
        message, anything else as ``"<first image>: <ErrorType>: <message>"`` (batch loops catch every
        exception a subject's files cause, so one bad file never ends a job)."""
        if isinstance(err, VolumeError):
            return cls(subject.subject_id, err.path, str(err))
        first = str(next(iter(subject.images.values()), ""))
        message = " ".join(str(err).split())[:200]
        return cls(subject.subject_id, first, f"{first}: {type(err).__name__}: {message}")


@dataclass
class Cohort:
    """Subjects that can be loaded, label metadata, and the rows that could not.

    Attributes:
        subjects: usable subjects in manifest order.
        label_types: label column -> ``categorical`` or ``continuous``.
        failures: rows left out, with the reason.
        source: the manifest file or folder.
    """

    subjects: list[Subject]
    label_types: dict[str, LabelType]
    failures: list[Failure] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def ids(self) -> list[str]:
        return [s.subject_id for s in self.subjects]

    @property
    def modalities(self) -> list[str]:
        return list(self.subjects[0].images) if self.subjects else []

    def subset(self, ids: Sequence[str]) -> "Cohort":
        wanted = set(ids)
        return Cohort([s for s in self.subjects if s.subject_id in wanted], dict(self.label_types),
                      list(self.failures), self.source)

    def labels(self) -> pd.DataFrame:
        """Label table indexed by subject_id (one column per label)."""
        rows = [{"subject_id": s.subject_id, **s.labels} for s in self.subjects]
        return pd.DataFrame(rows, columns=["subject_id", *self.label_types]).set_index("subject_id")

    def iter_volumes(
        self, cfg: VolumeConfig | None = None, *, with_seg: bool = True
    ) -> Iterator[Volume]:
        """Loads subjects one by one; a subject that fails is appended to ``failures`` and skipped."""
        for subject in self.subjects:
            try:
                yield load_subject(subject, cfg, with_seg=with_seg)
            except Exception as err:  # noqa: BLE001 - one subject's files must not end the cohort
                self.failures.append(Failure.of(subject, err))

    def failure_report(self) -> str:
        if not self.failures:
            return "no failures"
        lines = [f"{len(self.failures)} subject(s) failed:"]
        lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


def load_subject(subject: Subject, cfg: VolumeConfig | None = None, *, with_seg: bool = True) -> Volume:
    """Loads one manifest subject (all modalities as channels, plus seg and other maps)."""
    return load_volume(
        subject.images,
        cfg,
        seg=subject.seg if with_seg else None,
        maps=subject.maps if with_seg else None,
        subject_id=subject.subject_id,
    )


def infer_label_type(values: pd.Series, max_classes: int = 10) -> LabelType:
    """Non-numeric, boolean, or integers with at most ``max_classes`` distinct values that repeat (no
    more distinct values than half the cells) -> categorical; else continuous."""
    values = values.dropna()
    if values.empty:
        return "categorical"
    if values.dtype == bool or not pd.api.types.is_numeric_dtype(values):
        return "categorical"
    as_float = values.astype(float)
    # codes (sex 1/2, a site number) repeat; whole-year ages of a small cohort hardly do and were
    # benchmarked as 10 classes of one subject each
    n_values = as_float.nunique()
    if np.all(np.equal(np.mod(as_float, 1), 0)) and n_values <= max_classes and n_values <= len(as_float) / 2:
        return "categorical"
    return "continuous"


#: a cell that names a file (a NIfTI name with a typo, another image format, a path), not a label value
_PATH_LIKE = re.compile(r"[/\\]|\.(nii|gz|bz2|zst|mgz|mgh|img|hdr|nrrd|nhdr|mha|mhd|dcm)\w*$", re.IGNORECASE)


def _is_path_column(series: pd.Series) -> bool:
    """Whether a column holds image paths: some cell is a NIfTI file name and at least half of the
    non-empty cells name files.

    Not all: one broken cell (a typo, ``missing``) must fail its row, not silently turn a modality
    column into a label column (which drops that modality, or the whole manifest, without a word).
    """
    values = series.dropna().astype(str).str.strip()  # resolve() strips the cells too
    values = values[values != ""]
    if values.empty or not values.map(lambda v: bool(_NIFTI.search(v))).any():
        return False
    return float(values.map(lambda v: bool(_NIFTI.search(v) or _PATH_LIKE.search(v))).mean()) >= 0.5


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _exists(path: Path) -> bool:
    """Whether ``path`` names a file or folder; False for any error (``Path.exists`` raises for a name
    over the system's length limit, or a folder it may not search, which ended the whole manifest in a
    traceback): :func:`_absent` then says what is wrong."""
    try:
        return path.exists()
    except OSError:
        return False


#: a URL in a path cell, as Path() leaves it (``https:/host/x`` under the manifest's folder)
_URL = re.compile(r"(?:^|/)((https?|s?ftp|s3|gs|file):/+)(.*)", re.IGNORECASE)


def _absent(column: str, path: Path | None) -> str:
    """``t1 (path)`` for a missing file; a dangling link names its target (``ls`` lists the link itself),
    a link loop or a name the system refuses says so, in the words the file given alone gets."""
    if path is None:
        return f"{column} (empty)"
    # io's wording: a loop was called "a link to X, which does not exist" for an X that is there
    problem = file_problem(path)
    if problem is not None and problem != "file not found":
        return f"{column} ({path}: {problem})"
    text = str(path)
    url = _URL.search(text)
    if url:
        # Path() folds 'https://host' into 'https:/host' under the manifest's folder: the URL is shown
        # as written, from its scheme on
        scheme = url.group(2).lower()
        shown = f"{url.group(2)}://{'/' if scheme == 'file' else ''}{url.group(3)}"
        advice = ("drop file:// and give the path" if scheme == "file"
                  else "download the file and give its local path")
        return f"{column} ({shown}: a URL, not a path: the manifest takes local paths; {advice})"
    if "\\" in text:
        return f"{column} ({path}: Windows '\\' separators; write the path with '/')"
    return f"{column} ({path})"


def load_manifest(
    path: str | Path,
    *,
    id_column: str = "subject_id",
    image_columns: Sequence[str] | None = None,
    seg_column: str | None = "seg",
    label_columns: Sequence[str] | None = None,
    label_types: dict[str, LabelType] | None = None,
) -> Cohort:
    """Reads a CSV manifest into a :class:`Cohort`.

    Args:
        path: the CSV file; relative image paths are resolved against its folder (for a pipe such as
            ``<(grep ... m.csv)`` or ``/dev/stdin``, against the working directory).
        id_column: column holding unique subject IDs.
        image_columns: modality columns in channel order; default: every column of NIfTI paths
            that is not the segmentation or a mask/lesion map.
        seg_column: segmentation column, if present.
        label_columns: label columns; default: every remaining column.
        label_types: overrides for the inferred label types.

    Raises:
        ManifestError: unreadable file, missing id column or no image column.
    """
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"{path}: is a directory, not a manifest CSV (for a BIDS folder use cohort_from_glob)")
    try:
        # read once and parse from memory: a pipe (<(...), /dev/stdin) cannot be read a second time
        raw = read_input_bytes(path, "manifest")
        problem = binary_problem(raw)
        if problem:
            raise ManifestError(f"{path}: {problem}, not a text table; the manifest is a CSV/TSV file of subject "
                                "IDs, image paths and labels")
        text = decode_text(raw)
        sep = _sniff(text)
        lines, unnamed = _check_layout(path, text, sep)
        # index_col=False: a row with a trailing delimiter must not turn the first column into the index
        # (pandas then shifts every column name by one)
        table = pd.read_csv(io.StringIO(text), dtype={id_column: str}, sep=sep, index_col=False)
        # IDs such as NA, None or nan are IDs, not missing values (pandas' default reading of them)
        ids = pd.read_csv(io.StringIO(text), dtype=str, sep=sep, index_col=False,
                          keep_default_na=False, usecols=lambda c: str(c).strip() == id_column)
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except InputFileError as err:
        raise ManifestError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: cannot read the manifest: {err.reason}") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError, csv.Error) as err:
        raise ManifestError(f"{path}: cannot read manifest ({' '.join(str(err).split())[:120]})") from None
    # pandas skips blank lines (before the header too) and a quoted cell may span lines: the index
    # + 2 is a file line only without either
    line_of = dict(zip(table.index, lines)) if len(lines) == len(table) else None
    # a header cell left empty (most often a trailing delimiter: 'subject_id,t1,age,') over an empty
    # column: pandas calls it 'Unnamed: 3', which became a label (a column with values was refused above)
    empty = [i for i in unnamed if i < table.shape[1] and re.fullmatch(rf"Unnamed: {i}|\s*", str(table.columns[i]))]
    if empty:
        log.info("%s: column(s) %s have no name in the header and no values; ignored", path,
                 ", ".join(str(i + 1) for i in empty))
        table = table.iloc[:, [i for i in range(table.shape[1]) if i not in empty]]
    table.columns = [str(c).strip() for c in table.columns]
    if id_column not in table.columns:
        raise ManifestError(f"{path}: no {id_column!r} column (columns: {list(table.columns)})")
    if ids.shape[1] == 1 and len(ids) == len(table):
        table[id_column] = ids.iloc[:, 0].to_numpy()
    # rows with every cell empty (a spreadsheet's ";;;" padding) are no subjects: dropped, not failed
    blank = table.apply(lambda row: all(pd.isna(v) or str(v).strip() == "" for v in row), axis=1)
    if blank.any():
        table = table[~blank]
    # ';' files from spreadsheets in decimal-comma locales, and quoted "23,35" in ',' or tab files:
    # read as text, such a column became a label of one class per subject
    _read_decimal_commas(table, skip=id_column)
    if table.empty:
        raise ManifestError(f"{path}: the manifest has a header ({', '.join(map(str, table.columns))}) "
                            "but no subject rows")
    # a pipe's folder (/dev/fd, /proc/self/fd) holds no images: its rows are read like the user's shell would
    root = path.parent if path.is_file() else Path.cwd()
    linked_root = path.resolve().parent if path.is_file() else None
    if linked_root is not None and linked_root == root.resolve():
        linked_root = None
    path_columns = [c for c in table.columns if c != id_column and _is_path_column(table[c])]
    if seg_column not in table.columns:
        seg_column = None
    elif seg_column not in path_columns:
        cells = table[seg_column].dropna().astype(str).str.strip()
        cells = cells[cells != ""]
        if len(cells) and not cells.map(lambda v: bool(_NIFTI.search(v) or _PATH_LIKE.search(v))).any():
            # a label that happens to be called 'seg' failed every row, one line each
            raise ManifestError(f"{path}: column {seg_column!r} is read as segmentation files by its name, but none of "
                                f"its cells names a file (e.g. {cells.iloc[0]!r}); rename the column to use it as a label")
    # label maps, not image channels: a column named aseg, seg_path or brain_mask must not become a channel
    map_columns = [c for c in path_columns if c != seg_column and re.search("mask|lesion|seg|parc", c, re.I)]
    if image_columns is None:
        image_columns = [c for c in path_columns if c != seg_column and c not in map_columns]
    missing_cols = [c for c in image_columns if c not in table.columns]
    if missing_cols:
        raise ManifestError(f"{path}: image column(s) {missing_cols} not in {list(table.columns)}")
    if not image_columns:
        raise ManifestError(f"{path}: no image column: no column other than {id_column!r} holds mostly "
                            f"paths ending in {_NIFTI_NAMES} (columns: {list(table.columns)})")
    if label_columns is None:
        label_columns = [c for c in table.columns if c not in {id_column, seg_column, *path_columns}]
    for column in label_columns:
        _clean_text_cells(table, column)
        _mostly_numbers(table, column, id_column, path)
    for column in label_columns:
        named = sum(bool(_NIFTI.search(str(v).strip())) for v in table[column].dropna())
        if named:
            log.warning("%s: column %r is read as a label although %d of its cells name NIfTI files; name it in "
                        "image_columns to read it as images", path, column, named)
    types = {c: infer_label_type(table[c]) for c in label_columns}
    for column, kind in (label_types or {}).items():
        # a typo ('ordinal') or continuous over text cells ended in float()'s message much later
        if kind not in ("categorical", "continuous"):
            raise ManifestError(f"{path}: label type {kind!r} of {column!r} is not 'categorical' or 'continuous'")
        if column not in label_columns:
            raise ManifestError(f"{path}: a label type is given for {column!r}, which is not a label column "
                                f"({', '.join(map(repr, label_columns)) or 'none'})")
        if kind == "continuous":
            numbers = pd.to_numeric(table[column], errors="coerce")
            bad = table[column][numbers.isna() & table[column].notna()]
            if len(bad):
                raise ManifestError(f"{path}: label {column!r} is given as continuous, but {len(bad)} cell(s) are not "
                                    f"numbers (e.g. {str(bad.iloc[0])!r}); make it categorical or clean the column")
    types.update(label_types or {})
    return _build_cohort(table, root, str(path), id_column, list(image_columns), seg_column,
                         map_columns, types, lines=line_of, linked_root=linked_root)


def _read_decimal_commas(table: pd.DataFrame, skip: str) -> None:
    """Columns of numbers written with a decimal comma (``31,5``: spreadsheets that save ``;``-separated
    files in those locales) become numbers, in place; the ``skip`` column (the IDs) stays text."""
    decimal = re.compile(r"^[+-]?\d+(,\d+)?$")
    for column in (c for c in table.columns if c != skip):
        values = table[column].dropna().astype(str).str.strip()
        values = values[values != ""]
        if (table[column].dtype == object or pd.api.types.is_string_dtype(table[column])) and not values.empty \
                and values.str.contains(",").any() and values.map(lambda v: bool(decimal.match(v))).all():
            table[column] = pd.to_numeric(table[column].astype(str).str.strip().str.replace(",", ".", regex=False)
                                          .replace({"": None, "nan": None, "None": None, "<NA>": None}))


def text_encoding(path: str | Path) -> str:
    """``utf-16`` for a file starting with a UTF-16 byte-order mark (spreadsheets' "Unicode Text"),
    ``utf-16-le``/``-be`` for UTF-16 without the mark, else ``utf-8-sig`` (UTF-8 with or without its mark)."""
    with open(path, "rb") as fh:
        return _encoding_of(fh.read(64))


def _encoding_of(start: bytes) -> str:
    # UTF-32 first: its little-endian mark starts like UTF-16's, and decoded as UTF-16 every
    # character came with a NUL, which read as rows of the wrong length
    if start[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff"):
        return "utf-32"
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    quad = start[:len(start) - len(start) % 4]
    if len(quad) >= 8:  # UTF-32 without the mark: ASCII column names, each followed or led by 3 NULs
        if all(quad[0::4]) and not any(quad[1::4] + quad[2::4] + quad[3::4]):
            return "utf-32-le"
        if all(quad[3::4]) and not any(quad[0::4] + quad[1::4] + quad[2::4]):
            return "utf-32-be"
    # UTF-16 without a byte-order mark (iconv -t UTF-16LE): ASCII column names alternate with NUL
    # bytes; read as UTF-8 the NULs stayed inside the names ("no 's\x00u\x00b\x00...' column")
    head = start[:64] if len(start) % 2 == 0 else start[:63]
    if len(head) >= 4:
        if not any(head[1::2]) and all(head[0::2]):
            return "utf-16-le"
        if not any(head[0::2]) and all(head[1::2]):
            return "utf-16-be"
    return "utf-8-sig"


#: leading bytes of files that are no text table
_BINARY_STARTS = (
    (b"\x1f\x8b", "gzip-compressed data (decompress it first: gunzip)"),
    (b"BZh", "bzip2-compressed data (decompress it first: bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed data (decompress it first: xz -d)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it first: zstd -d)"),
    (b"PK\x03\x04", "a zip archive (an .xlsx workbook? save the sheet as CSV)"),
    (b"\xd0\xcf\x11\xe0", "an old Office file (an .xls workbook? save the sheet as CSV)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a feature store?)"),
    (b"\x5c\x01\x00\x00", "a NIfTI image"), (b"\x00\x00\x01\x5c", "a NIfTI image"),
    (b"\x1c\x02\x00\x00", "a NIfTI-2 image"), (b"\x00\x00\x02\x1c", "a NIfTI-2 image"),
)


def binary_problem(raw: bytes) -> str | None:
    """What binary data ``raw`` (a table or list file's bytes) holds, or None for text: compressed
    data, a spreadsheet workbook, a feature store, a NIfTI image, or NUL bytes in what is not UTF-16/32
    (read as text, each came out as "byte 0x8b ... is not UTF-8 (a Latin-1 export?)"); NUL bytes count
    in the first line or when over a tenth of the bytes."""
    if raw.startswith(b"\x1f\x8b"):
        try:  # a .nii.gz given as the table says so
            inner = zlib.decompressobj(wbits=31).decompress(raw[:1024], 4)
        except zlib.error:
            inner = b""
        named = next((what for start, what in _BINARY_STARTS if "NIfTI" in what and inner.startswith(start)), None)
        if named:
            return f"{named} (gzip-compressed)"
    for start, what in _BINARY_STARTS:
        if raw.startswith(start):
            return what
    head = raw[:1 << 16]
    # NULs in the header line, or many: a NUL inside one cell is that row's problem (the row is left out)
    if _encoding_of(raw[:64]) == "utf-8-sig" and (b"\0" in head.split(b"\n", 1)[0] or head.count(b"\0") > 0.1 * len(head)):
        return "binary data (NUL bytes)"
    return None


def decode_text(raw: bytes) -> str:
    """The text of a table or list file's bytes: UTF-16 (with a byte-order mark, or ASCII-led text
    without one), else UTF-8 (its mark, if any, dropped).

    Raises:
        UnicodeDecodeError: with a reason that says to save the file as UTF-8 (a Latin-1 or
            Windows-1252 export: ``byte 0xfc at position 41 is not UTF-8``).
    """
    encoding = _encoding_of(raw[:64])
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        byte = raw[err.start:err.start + 1].hex()
        raise UnicodeDecodeError(err.encoding, err.object, err.start, err.end,
                                 f"byte 0x{byte} at position {err.start} is not {encoding.upper().replace('-SIG', '')} "
                                 "text (a Latin-1 or Windows-1252 export?); save the file as UTF-8") from None


def read_id_list(path: str | Path, flag: str) -> list[str]:
    """Subject IDs of a text file, one per line (``flag`` names the option, for the messages).

    Blank lines and ``#`` comments are skipped, spaces and CR stripped, and a byte-order mark (UTF-8
    or UTF-16, as spreadsheets and Windows editors write them) dropped: it used to stay glued to the
    first ID, which then matched no subject. IDs are returned in NFC, as :func:`load_manifest` stores
    them. Every problem is one line starting with the file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; the {flag} file holds one subject ID per line")
    try:
        raw = read_input_bytes(path, flag)
        problem = binary_problem(raw)
        if problem:
            raise ValueError(f"{path}: {problem}, not a text file; the {flag} file holds one subject ID per line")
        lines = decode_text(raw).splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {flag} file not found (one subject ID per line)") from None
    except InputFileError as err:
        raise ValueError(str(err)) from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: cannot read the {flag} file: {err.reason}") from None
    # NFC, as a manifest's IDs are stored (_build_cohort): a list typed on macOS names the same subjects
    ids = [unicodedata.normalize("NFC", ln.strip()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not ids:
        raise ValueError(f"{path}: no subject IDs in the {flag} file (one per line)")
    duplicated = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
    if duplicated:
        raise ValueError(f"{path}: duplicate subject IDs in the {flag} file, e.g. {duplicated[:3]}")
    return ids


def check_ids_known(path: str | Path, ids: Sequence[str], known: Sequence[str], where: str) -> None:
    """Refuses IDs of the list file ``path`` that are not among ``known`` (the store's, the cohort's)."""
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} subject ID(s) not in {where}, e.g. {unknown[:3]}")


def _unclosed_quote(text: str, sep: str) -> int | None:
    """The line (1-based) of the record whose quoted value is still open at the end of ``text``, or
    None. A ``"`` inside an unquoted value is a plain character and no quote (``a"b.nii.gz`` loads)."""
    end = 0
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True)
    try:
        for _ in reader:
            end = reader.line_num
    except csv.Error as err:
        # other strict-mode complaints ('"x"y': a character after a closing quote) pandas reads leniently
        return end + 1 if "unexpected end of data" in str(err) else None
    return None


def _check_layout(path: Path, text: str, sep: str) -> tuple[list[int], list[int]]:
    """Refuses header names that repeat (after stripping spaces), rows with more filled cells than
    the header, and columns without a name that hold values (``text`` is the content of ``path``):
    pandas renames a repeated name (``age.1``) and drops the extra cells of a row, so an unquoted
    delimiter inside a value would shift or lose cells without a word; and it names a column without
    a name ``Unnamed: 3``, which became a label.

    Returns:
        The file line (1-based) where each data row starts, in the order pandas reads them (blank
        lines, which pandas skips before the header as after it, are no rows); and the positions
        (0-based) of the header's empty names, whose columns are empty (a trailing delimiter).
    """
    def records(reader) -> Iterator[tuple[int, list[str]]]:
        end = 0
        for row in reader:
            start, end = end + 1, reader.line_num  # a quoted cell may span lines
            if len(row) > 1 or any(c.strip() for c in row):
                yield start, row

    line = _unclosed_quote(text, sep)
    if line is not None:
        # pandas' words were "EOF inside string", and the rows it swallowed read as cells left out
        raise ManifestError(f"{path}: line {line} opens a quoted value ('\"') that is never closed: it runs to the "
                            "end of the file and swallows every row after it; close the quote, or remove it")
    with io.StringIO(text, newline="") as fh:
        rows = records(csv.reader(fh, delimiter=sep))
        header = [h.strip() for h in next(rows, (0, []))[1]]
        if header and header[0].startswith("#"):
            raise ManifestError(f"{path}: the first line is a comment ({sep.join(header)[:40]!r}); the column names "
                                "must be the first line")
        repeated = sorted({h for h in header if h and header.count(h) > 1})
        if repeated:
            raise ManifestError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more than once "
                                "in the header (spaces around names are ignored); rename them")
        starts = []
        long_rows, short_rows = [], []
        unnamed = [i for i, h in enumerate(header) if not h]
        # cells a row must reach: up to the last named column (a trailing delimiter names nothing)
        needed = max((i + 1 for i, h in enumerate(header) if h), default=0)
        filled: dict[int, tuple[int, str]] = {}  # unnamed column -> its first value and the line
        for start, row in rows:
            starts.append(start)
            if any(c.strip() for c in row[len(header):]):
                long_rows.append(start)
            elif len(row) < needed and any(c.strip() for c in row):
                short_rows.append(start)
            for i in unnamed:
                if i not in filled and i < len(row) and row[i].strip():
                    filled[i] = (start, row[i].strip())
    if long_rows:
        lines = ", ".join(map(str, long_rows[:5])) + (" ..." if len(long_rows) > 5 else "")
        raise ManifestError(f"{path}: line(s) {lines} have more cells than the header's {len(header)} (a "
                            f"{'tab' if sep == chr(9) else repr(sep)} inside a value that is not quoted?); quote such "
                            "values or remove the extra cells")
    if short_rows:
        # a missing cell shifts the next values left: a path read as an age turned the age column into
        # an image column and failed every other subject
        lines = ", ".join(map(str, short_rows[:5])) + (" ..." if len(short_rows) > 5 else "")
        raise ManifestError(f"{path}: line(s) {lines} have fewer cells than the header's {needed} (a value left "
                            f"out shifts the next ones into the wrong columns); write an empty cell for a missing "
                            f"value ({sep * 2 if sep != chr(9) else 'two tabs'})")
    if filled:
        column, (line, cell) = min(filled.items())
        shown = cell if len(cell) <= 40 else cell[:40] + "..."
        raise ManifestError(f"{path}: column {column + 1} has no name in the header but holds values (row {line}: "
                            f"{shown!r}); name it in the header line")
    return starts, unnamed


#: cells read as missing whatever their case (pandas' defaults are case-sensitive: ``NAN``, ``Null``
#: and ``n/a `` with a space would become classes of a categorical label)
_MISSING_TOKENS = {"", "nan", "-nan", "na", "n/a", "#n/a", "#na", "null", "none", "<na>"}


def _clean_text_cells(table: pd.DataFrame, column: str) -> None:
    """Text cells of a label column without surrounding spaces, missing tokens in any case as missing,
    in place: ``M `` and ``M`` are one class (IDs and paths are stripped too)."""
    values = table[column]
    if values.dtype == bool or pd.api.types.is_numeric_dtype(values):
        return

    def clean(v: Any) -> Any:
        if not isinstance(v, str):
            return v
        v = v.strip()
        return None if v.lower() in _MISSING_TOKENS else v

    table[column] = values.map(clean).astype(object)


def _mostly_numbers(table: pd.DataFrame, column: str, id_column: str, path: Path) -> None:
    """A label column of numbers with a few cells that are not (``unknown``, ``1,234``) becomes numeric,
    those cells missing, with a warning naming them, in place: read as text, a continuous label would
    become a classification target with one class per value. Integer codes with few distinct values
    (a categorical label) are left as they are."""
    values = table[column]
    if values.dtype == bool or pd.api.types.is_numeric_dtype(values):
        return
    text = values.map(lambda v: None if pd.isna(v) else str(v).strip())
    present = text[text.notna() & (text != "")]
    numbers = pd.to_numeric(present, errors="coerce")
    bad = present[numbers.isna()]
    if present.empty or bad.empty:
        return
    if len(bad) > 0.2 * len(present):
        if len(bad) < len(present):  # numbers and text mixed: read as classes, which may not be meant
            distinct = list(dict.fromkeys(bad))
            examples = ", ".join(map(repr, distinct[:3])) + (", ..." if len(distinct) > 3 else "")
            log.warning("%s: label column %r mixes %d number(s) and %d text cell(s) (%s); read as categorical "
                        "with one class per distinct value: clean the column, or give label_types to choose",
                        path, column, len(present) - len(bad), len(bad), examples)
        return
    if infer_label_type(numbers.dropna()) != "continuous":
        return
    table[column] = pd.to_numeric(text.where(text != "", None), errors="coerce")
    examples = ", ".join(f"{table.at[i, id_column]}: {v!r}" for i, v in bad.head(3).items())
    log.warning("%s: label column %r holds numbers, but %d cell(s) are not numbers (%s%s); read as missing",
                path, column, len(bad), examples, ", ..." if len(bad) > 3 else "")


def sniff_delimiter(path: str | Path, encoding: str | None = None) -> str:
    """The delimiter of a CSV file, from its header line: ``,`` ``;`` ``\\t`` or ``|`` (default ``,``)."""
    with open(path, newline="", encoding=encoding or text_encoding(path)) as fh:
        return _sniff(next((line for line in fh if line.strip()), ""))


def _sniff(text: str) -> str:
    """The delimiter of the header line of ``text``, its first line that is not blank (pandas skips
    blank lines before the header; see :func:`sniff_delimiter`)."""
    head = next((line for line in text.splitlines() if line.strip()), "")
    if not head.strip():
        return ","
    try:
        return csv.Sniffer().sniff(head, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _build_cohort(table: pd.DataFrame, root: Path, source: str, id_column: str,
                  image_columns: list[str], seg_column: str | None, map_columns: list[str],
                  types: dict[str, LabelType], *, numbered: bool = True,
                  lines: dict[Any, int] | None = None, linked_root: Path | None = None) -> Cohort:
    """Subjects from a table of one row per subject (``numbered``: the rows are a file's lines after
    its header, so messages and :attr:`Subject.row` can give the line; ``lines``: the table's index ->
    the file line its row starts on, where blank lines or cells spanning lines make it not index + 2;
    ``linked_root``: the folder of the file a linked manifest points to, where relative paths not found
    under ``root`` (the link's folder, as a shell there reads them) are looked for; one found in both
    as different files is named in a warning: another scan was read without a word)."""
    failures: list[Failure] = []
    ambiguous: list[str] = []
    # not astype(str): with pandas' string dtype an empty cell stays NaN (a float) instead of "nan"
    written = table[id_column].map(lambda v: "" if pd.isna(v) else str(v).strip())
    # IDs are stored in NFC, the form most tools write: an accent typed on macOS (NFD: e + U+0301) must
    # name the same subject, in a store and in ID lists (read_id_list), as one typed elsewhere. Only
    # NFC: it changes no character, where NFKC (used to compare, below) would store 'x²' as 'x2'
    ids = written.map(lambda v: unicodedata.normalize("NFC", v))
    keys = written.map(_id_key)
    line_of = {i: (lines or {}).get(i, i + 2) for i in table.index}

    def rows_of(mask: pd.Series) -> str:
        found = [line_of[i] for i in mask.index[mask]]
        return f" (row{'s' if len(found) > 1 else ''} {', '.join(map(str, found))})" if numbered else ""

    duplicated = set(keys[keys.duplicated() & (keys != "")])
    for key in sorted(duplicated, key=lambda k: ids[keys == k].iloc[0]):
        group = written[keys == key]
        first = ids[keys == key].iloc[0]
        if group.nunique() == 1:
            failures.append(Failure(first, source, f"{source}: duplicate subject_id {first!r} ({len(group)} rows); "
                                                   "all left out"))
            continue
        # 's1' and 's1' + a zero-width space, or josé with its accent composed and decomposed, print
        # alike: two rows of one subject would sit on both sides of a split. Escaped, the IDs show
        # where they differ
        spellings = [f"'{_escaped(v)}'{rows_of(written == v)}" for v in dict.fromkeys(group)]
        failures.append(Failure(first, source, (
            f"{source}: duplicate subject_id: {', '.join(spellings[:-1])} and {spellings[-1]} look the same but are "
            "written with different characters (accents composed or not, zero-width or fullwidth characters); "
            "all left out")))
    _warn_case_only(source, ids[~keys.isin(duplicated) & (keys != "")], rows_of)

    def under_root(cell: str) -> Path:
        p = Path(cell).expanduser()
        return p if p.is_absolute() else root / p

    def resolve(value: Any) -> Path | None:
        if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
            return None
        cell = str(value)
        p = under_root(cell.strip())
        q = None
        if linked_root is not None and not Path(cell.strip()).expanduser().is_absolute():
            q = linked_root / cell.strip()
        if _exists(p):
            if q is not None and _exists(q) and not _same_file(p, q):
                ambiguous.append(cell.strip())
            return p
        if q is not None and _exists(q):
            return q
        # a file whose name starts or ends with a space: the cell as written names it
        tried = [cell] if cell != cell.strip() and not _control_characters(cell) else []
        # a name written in NFD (macOS: e + U+0301) for a file stored in NFC, or the reverse: the two
        # print alike, and "file not found" showed the very name that is there
        tried += [unicodedata.normalize(form, c) for c in [cell.strip(), *tried] for form in ("NFC", "NFD")]
        for text in dict.fromkeys(t for t in tried if t != cell.strip()):
            if _exists(other := under_root(text)):
                log.debug("%s: %r names %s (another Unicode form or spaces)", source, cell, other)
                return other
        return p

    subjects: list[Subject] = []
    infinite: list[str] = []  # label cells holding inf, read as missing
    for sid, key, (_, row) in zip(ids, keys, table.iterrows()):
        if key in duplicated:
            continue
        line = line_of[_]
        if key == "":  # empty, or only zero-width characters
            failures.append(Failure("?", source, f"{source}: row {line} has no subject_id; left out"))
            continue
        control = _control_characters(sid) + [c for c in sid if c in _BIDI_CONTROLS]
        if control:
            # a NUL cannot be stored in HDF5 names, a newline breaks every one-line message, and a
            # right-to-left override prints the ID (and the rest of its line) reversed
            shown = "".join(f"\\u{ord(c):04x}" if c in _BIDI_CONTROLS else c for c in printable_path(sid))
            first = control[0]
            named = f"\\u{ord(first):04x}" if first in _BIDI_CONTROLS else printable_path(first)
            failures.append(Failure(shown, source, f"{source}: row {line}: subject_id '{shown}' holds a control "
                                                   f"character ({named}); left out"))
            continue
        at = f"{source}: row {line} ({sid})" if numbered else f"{source}: {sid}"
        # a path with a newline or CR breaks (or overwrites) the one-line messages that name the file
        # later; a real file name with a tab is legal but vanishingly rare, and is refused the same way
        cells = {c: str(row[c]).strip() for c in [*image_columns, *([seg_column] if seg_column else []), *map_columns]
                 if isinstance(row[c], str)}
        bad_cell = next(((c, v) for c, v in cells.items() if _control_characters(v)), None)
        if bad_cell:
            column, cell = bad_cell
            failures.append(Failure(sid, source, f"{at}: {column} '{printable_path(cell)}' holds a control character "
                                                 f"({printable_path(_control_characters(cell)[0])}); left out"))
            continue
        images = {c: resolve(row[c]) for c in image_columns}
        seg = resolve(row[seg_column]) if seg_column else None
        maps = {c: p for c in map_columns if (p := resolve(row[c])) is not None}
        named = {**images, **({seg_column: seg} if seg_column and seg is not None else {}), **maps}
        odd = [f"{c} {str(row[c]).strip()!r}" for c, p in named.items() if p is not None and not _NIFTI.search(p.name)]
        if odd:
            failures.append(Failure(sid, source, f"{at}: not a NIfTI file name "
                                                 f"({_NIFTI_NAMES}): {', '.join(odd)}; left out"))
            continue
        named_files = [*images.items(), *([(seg_column, seg)] if seg is not None else []), *maps.items()]
        missing = [(c, p) for c, p in named_files if p is None or not _exists(p)]
        absent = [_absent(c, p) for c, p in missing]
        if absent:
            first = next((p for p in [*images.values(), seg] if p is not None), None)
            # the line starts with the missing file, or with the row when the first file is there (a
            # missing second modality): "b_t1.nii.gz: file not found: t2" read as if b_t1 were missing
            # (a URL folded by Path() is no file to name: the row is)
            where = first if first is not None and not _exists(first) and not _URL.search(str(first)) else None
            # a file that is there but cannot be read (permissions, a folder that may not be entered)
            # is no "file not found"
            heading = ("cannot read" if all(p is not None and (file_problem(p) or "").startswith("unreadable")
                                            for _, p in missing) else "file not found")
            failures.append(Failure(sid, str(where or source), f"{where or at}: {heading}: {', '.join(absent)}"))
            continue
        labels = {c: _clean(row[c], types[c]) for c in types}
        for c, v in labels.items():
            if isinstance(v, float) and not np.isfinite(v):
                # one unusable value costs that label only: the scan and its other labels still count
                infinite.append(f"{at}: {c} = {row[c]!r}")
                labels[c] = None
        subjects.append(Subject(sid, images, seg, maps, labels, row=line if numbered else None))
    if infinite:
        log.warning("%d label cell(s) are not finite numbers (%s%s); read as missing", len(infinite),
                    "; ".join(infinite[:3]), "; ..." if len(infinite) > 3 else "")
    # one scan under two subject IDs would sit on both sides of a subject-level split (a leak)
    owners: dict[Any, list[str]] = {}
    named_as: dict[Any, Path] = {}
    for subject in subjects:
        for image in {Path(p).resolve() for p in subject.images.values()}:
            try:  # a hard link is the same file under another path: the inode tells
                st = image.stat()
                key: Any = (st.st_dev, st.st_ino)
            except OSError:
                key = image
            named_as.setdefault(key, image)
            if subject.subject_id not in owners.setdefault(key, []):  # one subject's modalities may share a file
                owners[key].append(subject.subject_id)
    left_out: set[str] = set()
    for key, sids in owners.items():
        image = named_as[key]
        for sid in (s for s in sids if len(sids) > 1 and s not in left_out):
            others = ", ".join(repr(o) for o in sids if o != sid)
            failures.append(Failure(sid, str(image), f"{image}: the same image file as subject(s) {others}; "
                                                     "all left out"))
            left_out.add(sid)
    # a copy of a scan under another ID is the same leak as a hard link, one cp away
    distinct = {key: named_as[key] for key, sids in owners.items() if not left_out.intersection(sids)}
    for group in identical_files(list(distinct.values())):
        keys = [k for k, image in distinct.items() if image in group]
        if len({sid for k in keys for sid in owners[k]}) < 2:
            continue  # one subject's modalities as copies of one file: a slip, not a leak
        for key in keys:
            (sid,) = owners[key]  # files shared by two subjects were left out above
            if sid in left_out:
                continue  # one line per subject
            image = distinct[key]
            copies = "; ".join(f"{distinct[k]} ({owners[k][0]!r})" for k in keys if owners[k] != [sid])
            failures.append(Failure(sid, str(image), f"{image}: byte-identical to the image of another subject: "
                                                     f"{copies}; all left out"))
            left_out.add(sid)
    subjects = [s for s in subjects if s.subject_id not in left_out]
    if ambiguous:
        log.warning("%s: a link to %s; %d relative path(s) name different files next to the link (read) and next "
                    "to the linked manifest, e.g. %s: give absolute paths, or copy the manifest instead of linking it",
                    source, Path(source).resolve(), len(ambiguous), ambiguous[0])
    return Cohort(subjects, types, failures, source)


#: characters that print as nothing: zero-width space, non-joiner and joiner, word joiner, and the
#: byte-order mark (read inside a text as a zero-width no-break space)
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def _id_key(sid: str) -> str:
    """What a subject ID looks like to a reader, for the duplicate check: NFKC (fullwidth 'ｓ1' is 's1',
    an accent composed or not one letter) without zero-width characters."""
    return unicodedata.normalize("NFKC", sid.translate(_ZERO_WIDTH)).strip()


def _escaped(text: str) -> str:
    """``text`` with every character outside printable ASCII as its code point (``jos\\u00e9``), so that
    two IDs that print alike show where they differ."""
    return "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
                   for c in text)


def _warn_case_only(source: str, ids: pd.Series, rows_of: Callable[[pd.Series], str]) -> None:
    """One warning for subject IDs that differ only in case (``S1``, ``s1``): both stay, as IDs are
    case-sensitive (file names on Linux, store keys), but two such rows are most often one subject
    typed twice, which would sit on both sides of a split."""
    folded = ids.map(lambda v: _id_key(v).casefold())
    groups = [[f"'{_escaped(v)}'{rows_of(ids == v)}" for v in dict.fromkeys(ids[folded == f])]
              for f in dict.fromkeys(folded) if ids[folded == f].nunique() > 1]
    if groups:
        shown = "; ".join(f"{', '.join(g[:-1])} and {g[-1]}" for g in groups[:3]) + ("; ..." if len(groups) > 3 else "")
        log.warning("%s: subject_ids that differ only in case: %s; kept as different subjects (IDs are "
                    "case-sensitive), but such rows are most often one subject typed twice", source, shown)


#: Unicode bidirectional controls (embeddings, overrides, isolates, marks): they reorder what follows
#: them on screen
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _control_characters(text: str) -> list[str]:
    """The characters of ``text`` in \\x00-\\x1f or \\x7f, in order."""
    return [c for c in text if ord(c) < 32 or ord(c) == 127]


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def identical_files(paths: Sequence[Path], *, samples: int = 8, block: int = 4096) -> list[list[Path]]:
    """Groups of two or more files in ``paths`` with the same bytes (each path a distinct file).

    Reads as little as it can, as duplicate-file finders do: only files of equal size are compared,
    first by ``samples`` blocks of ``block`` bytes spread evenly over the file (which tells almost
    every pair of different scans apart: compressed streams differ throughout, and raw volumes of one
    grid differ in their voxels even where the headers agree), and only files that agree there are
    hashed whole (sha256). A file that cannot be read, or is empty, is skipped: the read that follows
    names it.

    Args:
        paths: (N,) files, each named once (hard links resolved by the caller).
        samples: blocks read per file before hashing it whole.
        block: bytes per block.

    Returns:
        Groups of identical files, each sorted by path; the groups sorted by their first path.
    """
    def by(key, group: list[Path]) -> list[list[Path]]:
        buckets: dict[Any, list[Path]] = {}
        for path in group:
            try:
                buckets.setdefault(key(path), []).append(path)
            except OSError:
                continue
        return [b for b in buckets.values() if len(b) > 1]

    def sampled(path: Path) -> bytes:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for i in range(samples):
                fh.seek(max(0, size - block) * i // max(1, samples - 1))
                digest.update(fh.read(block))
        return digest.digest()

    groups = []
    # empty files are all alike but are no scans: each fails its own read as an empty file
    for same_size in by(_size, [p for p in paths if _size(p)]):
        for same_samples in by(sampled, same_size):
            groups += [sorted(g) for g in by(file_sha256, same_samples)]
    return sorted(groups, key=lambda g: str(g[0]))


def _clean(value: Any, kind: LabelType) -> Any:
    if pd.isna(value):
        return None
    if kind == "continuous":
        return float(value)
    return value.item() if hasattr(value, "item") else value


def cohort_from_glob(
    root: str | Path,
    pattern: str = "sub-*/**/anat/*.nii*",
    *,
    id_regex: str = r"(sub-[A-Za-z0-9]+)",
    modality_regex: str = r"_([A-Za-z0-9]+)\.nii",
    participants: str | Path | None = None,
) -> Cohort:
    """Builds a cohort from files matching a glob (BIDS layout by default).

    The subject ID is the first match of ``id_regex`` in the path (default: BIDS ``sub-XX``; for a
    flat folder use ``id_regex=r"^([^.]+)"``); the modality is ``modality_regex`` on the file name
    (BIDS suffix such as ``T1w``). Labels come from ``participants.tsv`` under ``root`` (or the
    file given), if present.
    """
    root = Path(root)
    files = sorted(p for p in root.glob(pattern) if _NIFTI.search(p.name))
    if not files:
        raise ManifestError(f"{root}: no NIfTI file matches {pattern!r}")
    rows: dict[str, dict[str, str]] = {}
    failures: list[Failure] = []
    for f in files:
        rel = f.relative_to(root)
        m = re.search(id_regex, str(rel))
        # NFC, as _build_cohort stores IDs: a folder made on macOS (NFD) must still meet participants.tsv
        sid = unicodedata.normalize("NFC", m.group(1) if m else f.name.split(".nii")[0])
        mm = re.search(modality_regex, f.name)
        modality = mm.group(1) if mm else "image"
        row = rows.setdefault(sid, {"subject_id": sid})
        if modality in row:
            failures.append(Failure(sid, str(f), f"{f}: second {modality} image for {sid} "
                                                   f"(first: {row[modality]}); subject left out"))
            row["__dup__"] = "1"
        row[modality] = str(f)
    table = pd.DataFrame([r for r in rows.values() if "__dup__" not in r])
    labels: dict[str, LabelType] = {}
    part = Path(participants) if participants else root / "participants.tsv"
    if part.exists() and not table.empty:
        sep = "\t" if part.suffix == ".tsv" else ","
        try:
            info = pd.read_csv(part, sep=sep, dtype={"participant_id": str}, encoding=text_encoding(part))
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError) as err:
            raise ManifestError(f"{part}: cannot read the participants table ({' '.join(str(err).split())[:120]})"
                                ) from None
        key = "participant_id" if "participant_id" in info.columns else info.columns[0]
        info = info.rename(columns={key: "subject_id"})
        info["subject_id"] = info["subject_id"].map(lambda v: unicodedata.normalize("NFC", v) if isinstance(v, str)
                                                    else v)
        table = table.merge(info, on="subject_id", how="left")
        labels = {c: infer_label_type(info[c]) for c in info.columns if c != "subject_id"}
    image_cols = [c for c in table.columns if c != "subject_id" and c not in labels]
    cohort = _build_cohort(table, root, str(root), "subject_id", image_cols, None, [], labels, numbered=False)
    cohort.failures[:0] = failures
    return cohort
