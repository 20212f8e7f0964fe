"""Manifests and globs: relative paths, label types, duplicate IDs, missing files, BIDS."""

from __future__ import annotations

from pathlib import Path

import pytest

from slice2vol.data import ManifestError, VolumeError, cohort_from_glob, load_manifest, load_volume
from slice2vol.data.manifest import infer_label_type
from tests.conftest import blob_volume, fail_subject, write_nifti

import pandas as pd


def _files(tmp_path, names):
    return [write_nifti(tmp_path / "img" / n, blob_volume(seed=i)) for i, n in enumerate(names)]


def test_relative_paths_labels_and_modalities(tmp_path):
    _files(tmp_path, ["a_t1.nii.gz", "a_t2.nii.gz", "b_t1.nii.gz", "b_t2.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,t2,dx,score\n"
                   "a,img/a_t1.nii.gz,img/a_t2.nii.gz,AD,1.5\n"
                   "b,img/b_t1.nii.gz,img/b_t2.nii.gz,CN,2.25\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and cohort.modalities == ["t1", "t2"]
    assert cohort.label_types == {"dx": "categorical", "score": "continuous"}
    assert cohort.subjects[0].images["t1"] == tmp_path / "img" / "a_t1.nii.gz"
    volumes = list(cohort.iter_volumes())
    assert volumes[0].data.shape[0] == 2
    assert cohort.labels().loc["b", "score"] == 2.25


def test_duplicate_ids_reported_and_others_load(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\nx,img/a.nii.gz\ny,img/b.nii.gz\nx,img/c.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["y"]
    assert len(cohort.failures) == 1 and "duplicate subject_id 'x' (2 rows)" in cohort.failures[0].message
    assert str(csv) in cohort.failures[0].message
    assert [v.subject_id for v in cohort.iter_volumes()] == ["y"]


def test_rows_without_subject_id_reported_and_others_load(tmp_path):
    """Empty ID cells used to become a float NaN subject ID (pandas' string dtype keeps NaN), which
    crashed the caching job when it wrote the IDs into the store."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\n,img/a.nii.gz\ny,img/b.nii.gz\n  ,img/c.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["y"] and all(isinstance(i, str) for i in cohort.ids)
    assert [f.message for f in cohort.failures] == [f"{csv}: row 2 has no subject_id; left out",
                                                     f"{csv}: row 4 has no subject_id; left out"]


def test_one_image_under_two_ids_reported_and_others_load(tmp_path):
    """The same scan under two IDs would land on both sides of a subject-level split."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\nx,img/a.nii.gz\ny,img/b.nii.gz\nz,./img/../img/a.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["y"]
    messages = {f.subject_id: f.message for f in cohort.failures}
    assert set(messages) == {"x", "z"}
    assert "a.nii.gz: the same image file as subject(s) 'z'; all left out" in messages["x"]
    assert "the same image file as subject(s) 'x'" in messages["z"]


def test_path_cells_with_spaces_around_them(tmp_path):
    _files(tmp_path, ["a.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\n a , img/a.nii.gz \n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"] and cohort.subjects[0].images["t1"] == tmp_path / "img" / "a.nii.gz"


def test_missing_file_reported_and_others_load(tmp_path):
    _files(tmp_path, ["a.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii.gz\nb,img/gone.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"]
    assert "gone.nii.gz" in cohort.failures[0].message and "file not found" in cohort.failures[0].message


@pytest.mark.parametrize("types, message", [
    ({"sex": "ordinal"}, "label type 'ordinal' of 'sex' is not 'categorical' or 'continuous'"),
    ({"sex": "continuous"}, "label 'sex' is given as continuous, but 2 cell(s) are not numbers (e.g. 'M'); make it "
                            "categorical or clean the column"),
    ({"height": "continuous"}, "a label type is given for 'height', which is not a label column ('sex', 'age')"),
])
def test_label_types_are_checked_against_the_manifest(tmp_path, types, message):
    """Fuzz round 12: a typo'd type was accepted and ended in float()'s message inside the splits."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,sex,age\na,img/a.nii.gz,M,30\nb,img/b.nii.gz,F,40\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(csv, label_types=types)
    assert str(err.value) == f"{csv}: {message}"
    assert load_manifest(csv, label_types={"age": "categorical"}).label_types["age"] == "categorical"


def test_a_url_or_windows_path_in_a_manifest_says_so(tmp_path):
    """Fuzz round 11: 'https://host/x.nii.gz' was folded to '<manifest folder>/https:/host/x.nii.gz' and
    'sub\\a.nii.gz' reported missing beside an existing 'sub/a.nii.gz', both as plain 'file not found'."""
    _files(tmp_path, ["a.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii.gz\nb,https://example.org/b.nii.gz\nc,img\\a.nii.gz\n"
                   "d,file:///data/d.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"]
    messages = {f.subject_id: f.message for f in cohort.failures}
    # the URL as written (Path() folded its '//'), and the row named, not a folded path (fuzz round 23)
    assert messages["b"] == (f"{csv}: row 3 (b): file not found: t1 (https://example.org/b.nii.gz: a URL, not a path: "
                             "the manifest takes local paths; download the file and give its local path)")
    assert messages["d"].endswith("t1 (file:///data/d.nii.gz: a URL, not a path: the manifest takes local paths; "
                                  "drop file:// and give the path)")
    assert messages["c"].endswith("img\\a.nii.gz: Windows '\\' separators; write the path with '/')")


def test_a_dangling_link_in_a_manifest_names_its_target(tmp_path):
    """``ls`` lists a dangling link, so 'file not found' alone read as a lie (fuzz round 10); the
    message says what `slice2vol info` says for the same file."""
    _files(tmp_path, ["a.nii.gz"])
    (tmp_path / "img" / "b.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii.gz\nb,img/b.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"]
    assert cohort.failures[0].message.endswith(
        f"file not found: t1 ({tmp_path / 'img' / 'b.nii.gz'}: a symbolic link to {tmp_path / 'elsewhere.nii.gz'}, "
        "which does not exist)")


@pytest.mark.parametrize("values, expected", [
    (["M", "F", "M"], "categorical"),
    ([0, 1, 1, 0], "categorical"),
    ([23.4, 50.1, 70.0], "continuous"),
    (list(range(30)), "continuous"),
    ([True, False], "categorical"),
    # fuzz round 14: whole-year ages of a small cohort (10 distinct of 10) were 10 classes of one subject
    ([23, 51, 26, 38, 44, 61, 70, 29, 33, 57], "continuous"),
    ([1, 2, 2, 1, 1, 2, 2, 1, 2, 1], "categorical"),  # sex coded 1/2
    ([1, 2, 3, 1, 2, 3], "categorical"),  # a site number: 3 values of 6 repeat
    ([20, 20, 30, 45, 60, 70], "continuous"),  # 5 of 6 distinct: no code repeats like that
])
def test_label_type_inference(values, expected):
    assert infer_label_type(pd.Series(values)) == expected


@pytest.mark.parametrize("sep", [",", "\t"])
def test_quoted_decimal_commas_in_a_comma_or_tab_file_are_numbers(tmp_path, sep):
    """Fuzz round 14: `"23,35"` in a ',' file was text, and age became one class per subject; ';' files
    were read this way already."""
    for i in range(3):
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume(seed=i))
    rows = [f's{i}{sep}s{i}.nii.gz{sep}"{20 + i},5"' for i in range(3)]
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id{sep}t1{sep}age\n" + "\n".join(rows) + "\n")
    cohort = load_manifest(csv)
    assert cohort.label_types["age"] == "continuous"
    assert [s.labels["age"] for s in cohort.subjects] == [20.5, 21.5, 22.5]


def test_a_label_column_named_seg_is_refused_in_one_line(tmp_path):
    """Fuzz round 14: a 'seg' column of M/F failed every row with its own line ('not a NIfTI file name')."""
    for i in range(3):
        write_nifti(tmp_path / f"s{i}.nii.gz", blob_volume(seed=i))
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,seg\n" + "".join(f"s{i},s{i}.nii.gz,{'MF'[i % 2]}\n" for i in range(3)))
    with pytest.raises(ManifestError) as err:
        load_manifest(csv)
    assert str(err.value) == (f"{csv}: column 'seg' is read as segmentation files by its name, but none of its cells "
                              "names a file (e.g. 'M'); rename the column to use it as a label")
    csv.write_text("subject_id,t1,seg\n" + "".join(f"s{i},s{i}.nii.gz,\n" for i in range(3)))
    assert load_manifest(csv).subjects[0].seg is None  # an empty seg column is no segmentation, not an error


def test_unreadable_manifest_and_missing_id_column(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")
    csv = tmp_path / "m.csv"
    csv.write_text("id,t1\na,a.nii.gz\n")
    with pytest.raises(ManifestError, match="no 'subject_id' column"):
        load_manifest(csv)


def test_bids_glob_with_participants(tmp_path):
    for seed, sid in enumerate(("sub-01", "sub-02")):  # two scans, not one under two IDs
        for suffix in ("T1w", "FLAIR"):
            write_nifti(tmp_path / sid / "anat" / f"{sid}_{suffix}.nii.gz", blob_volume(seed=seed))
    (tmp_path / "participants.tsv").write_text("participant_id\tage\tgroup\nsub-01\t30.5\tA\nsub-02\t41.2\tB\n")
    cohort = cohort_from_glob(tmp_path)
    assert cohort.ids == ["sub-01", "sub-02"]
    assert sorted(cohort.modalities) == ["FLAIR", "T1w"]
    assert cohort.label_types == {"age": "continuous", "group": "categorical"}
    assert next(cohort.iter_volumes()).data.shape[0] == 2


@pytest.mark.ixi
def test_ixi_manifest_loads_as_is(ixi_manifest):
    cohort = load_manifest(ixi_manifest)
    assert len(cohort) == 48 and cohort.modalities == ["t1"]
    assert all(s.seg is not None and s.seg.exists() for s in cohort.subjects)
    assert set(cohort.labels()["sex"]) == {"F", "M"}


@pytest.mark.parametrize("sep", [";", "\t", "|"])
def test_delimiter_is_sniffed(tmp_path, sep):
    """Spreadsheets in many locales save CSV with ';' (issue 14 point 7)."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("\ufeff" + sep.join(["subject_id", "t1", "age"]) + "\n"
                   + sep.join(["a", "img/a.nii.gz", "31.5"]) + "\n" + sep.join(["b", "img/b.nii.gz", "40.25"]) + "\n",
                   encoding="utf-8")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and cohort.modalities == ["t1"]
    assert cohort.label_types == {"age": "continuous"} and not cohort.failures


def test_header_only_manifest_says_so(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age\n")
    with pytest.raises(ManifestError, match=r"m\.csv: the manifest has a header \(subject_id, t1, age\) but no subject rows"):
        load_manifest(csv)


def test_no_image_column_names_the_rule(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age\na,a.png,3\n")
    with pytest.raises(ManifestError, match=r"no image column: no column other than 'subject_id' holds mostly paths "
                                            r"ending in \.nii, \.nii\.gz, \.nii\.bz2 or \.nii\.zst"):
        load_manifest(csv)


@pytest.mark.parametrize("where", ["ssl_bank", "finetune_bank", "info"])
def test_batch_loops_record_an_unexpected_error_and_go_on(tmp_path, monkeypatch, capsys, where):
    """Every per-subject loop (SSL volume bank, fine-tuning slice bank, slice2vol info) records any
    exception one subject's files raise as that subject's failure, with the error type, and goes on."""
    import importlib

    from slice2vol.data.slicing import SliceConfig

    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii.gz\nb,img/b.nii.gz\nc,img/c.nii.gz\n")
    module = importlib.import_module({"ssl_bank": "slice2vol.ssl.data", "finetune_bank": "slice2vol.finetune.data",
                                      "info": "slice2vol.commands.info"}[where])
    import slice2vol.data.manifest as manifest_module

    # info imports load_subject inside its run(); the banks at module level
    fail_subject(monkeypatch, manifest_module if where == "info" else module, "b", TypeError("boom"))
    cohort = load_manifest(csv)
    if where == "ssl_bank":
        bank = module.VolumeBank.from_cohort(cohort, volume_size=(16, 16, 16), progress=False)
        ids, failures = bank.ids, bank.failures
    elif where == "finetune_bank":
        bank = module.SliceBank.from_cohort(cohort, SliceConfig(size=16, stride=4), progress=False)
        ids, failures = sorted(set(bank.ids)), bank.failures
    else:
        from slice2vol.cli import main

        assert main(["info", str(csv), "--no-progress"]) == 1
        out = capsys.readouterr().out
        assert "subject: a" in out and "subject: c" in out
        assert "1 subject(s) failed:" in out and "b.nii.gz: TypeError: boom" in out
        return
    assert list(ids) == ["a", "c"]
    assert [f.subject_id for f in failures] == ["b"] and failures[0].message.endswith("b.nii.gz: TypeError: boom")


def test_a_broken_cell_fails_its_row_and_keeps_the_modality(tmp_path):
    """One typo in an image column used to turn the whole column into a label column: the modality
    (or, for the only image column, every subject) disappeared without a word."""
    _files(tmp_path, ["a_t1.nii.gz", "a_t2.nii.gz", "b_t1.nii.gz", "b_t2.nii.gz", "c_t1.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,t2,age\n"
                   "a,img/a_t1.nii.gz,img/a_t2.nii.gz,30\n"
                   "b,img/b_t1.nii.gz,img/b_t2.nii.gz,40\n"
                   "c,img/c_t1.nii.gz,img/c_t2.nii.g,50\n")
    cohort = load_manifest(csv)
    assert cohort.modalities == ["t1", "t2"]
    assert cohort.ids == ["a", "b"]
    assert list(cohort.subjects[0].images) == ["t1", "t2"] and "t2" not in cohort.label_types
    (failure,) = cohort.failures
    assert failure.subject_id == "c"
    assert failure.message == f"{csv}: row 4 (c): not a NIfTI file name (.nii, .nii.gz, .nii.bz2 or .nii.zst): t2 'img/c_t2.nii.g'; left out"


def test_bz2_and_zst_paths_are_image_columns(tmp_path):
    import bz2

    plain = _files(tmp_path, ["a.nii"])[0]
    (tmp_path / "img" / "b.nii.bz2").write_bytes(bz2.compress(plain.read_bytes()))
    (tmp_path / "img" / "c.NII.ZST").write_bytes(b"")
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii\nb,img/b.nii.bz2\nc,img/c.NII.ZST\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b", "c"] and not cohort.label_types
    assert cohort.subjects[1].images["t1"].name == "b.nii.bz2"


def test_a_column_of_mostly_other_values_stays_a_label(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,note\na,img/a.nii.gz,ok\nb,img/b.nii.gz,see old.nii\nc,img/c.nii.gz,ok\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b", "c"] and "note" in cohort.label_types


def test_a_modality_given_for_few_subjects_stays_a_modality(tmp_path):
    """t2 for one of three subjects, the others 'missing' or empty: the column is still images (its
    other rows fail, each with a line), not a label holding file names."""
    _files(tmp_path, ["a_t1.nii.gz", "a_t2.nii.gz", "b_t1.nii.gz", "c_t1.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,t2\na,img/a_t1.nii.gz,img/a_t2.nii.gz\nb,img/b_t1.nii.gz,missing\n"
                   "c,img/c_t1.nii.gz,\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"] and cohort.modalities == ["t1", "t2"] and not cohort.label_types
    messages = {f.subject_id: f.message for f in cohort.failures}
    assert "not a NIfTI file name (.nii, .nii.gz, .nii.bz2 or .nii.zst): t2 'missing'" in messages["b"]
    # the row, not c_t1.nii.gz (which is there), starts the line
    assert messages["c"] == f"{csv}: row 4 (c): file not found: t2 (empty)"


def test_ids_that_pandas_reads_as_missing_are_ids(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\nNA,img/a.nii.gz\nNone,img/b.nii.gz\nnan,img/c.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["NA", "None", "nan"] and not cohort.failures


def test_a_trailing_delimiter_does_not_shift_the_columns(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age\na,img/a.nii.gz,30.5,\nb,img/b.nii.gz,40.5\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and cohort.modalities == ["t1"]
    assert [s.labels["age"] for s in cohort.subjects] == [30.5, 40.5]


def test_decimal_commas_in_a_semicolon_manifest_are_numbers(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id;t1;age;site\n1,5;img/a.nii.gz;31,5;x,y\nb;img/b.nii.gz;42;x\nc;img/c.nii.gz;;y\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["1,5", "b", "c"]  # IDs stay as written
    assert [s.labels["age"] for s in cohort.subjects] == [31.5, 42.0, None]
    assert cohort.label_types["age"] == "continuous"
    assert [s.labels["site"] for s in cohort.subjects] == ["x,y", "x", "y"]  # not numbers: left as they are


def test_an_infinite_label_is_missing_for_that_label_only(tmp_path, caplog):
    """inf in one label cell makes that label missing for that subject (as an empty cell), with a
    warning naming the row: the scan and its other labels stay in the cohort."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age,sex\na,img/a.nii.gz,30.5,F\nb,img/b.nii.gz,inf,M\nc,img/c.nii.gz,-inf,F\n")
    with caplog.at_level("WARNING"):
        cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b", "c"] and not cohort.failures
    assert [s.labels["age"] for s in cohort.subjects] == [30.5, None, None]
    assert [s.labels["sex"] for s in cohort.subjects] == ["F", "M", "F"]
    assert cohort.label_types["age"] == "continuous"
    assert (f"2 label cell(s) are not finite numbers ({csv}: row 3 (b): age = inf; {csv}: row 4 (c): age = -inf); "
            "read as missing") in caplog.text


def test_a_label_column_naming_nifti_files_is_flagged(tmp_path, caplog):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,note\na,img/a.nii.gz,ok\nb,img/b.nii.gz,see old.nii\nc,img/c.nii.gz,ok\n")
    with caplog.at_level("WARNING"):
        load_manifest(csv)
    assert "column 'note' is read as a label although 1 of its cells name NIfTI files" in caplog.text


def test_segmentation_like_columns_are_maps_not_channels(tmp_path):
    """A column named aseg or seg_path used to become a second image channel (label values read as
    intensities, without a word)."""
    _files(tmp_path, ["a.nii.gz", "a_aseg.nii.gz", "a_parc.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,aseg,aparc_path\na,img/a.nii.gz,img/a_aseg.nii.gz,img/a_parc.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.modalities == ["t1"]
    assert sorted(cohort.subjects[0].maps) == ["aparc_path", "aseg"]


def test_an_empty_label_column_loads(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,allnan\na,img/a.nii.gz,\nb,img/b.nii.gz,\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and [s.labels["allnan"] for s in cohort.subjects] == [None, None]


@pytest.mark.parametrize("header", ["subject_id,t1,age,age ", "subject_id,t1,age,age", "subject_id, t1,t1,age"])
def test_a_column_name_given_twice_is_refused_in_one_line(tmp_path, header):
    """Names differing only by spaces gave an AttributeError traceback; exact repeats were renamed
    ``age.1`` by pandas and read as a second label without a word."""
    _files(tmp_path, ["a.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text(f"{header}\na,img/a.nii.gz,img/a.nii.gz,30.5\n" if header.count("t1") == 2
                   else f"{header}\na,img/a.nii.gz,30.5,31.5\n")
    name = "t1" if header.count("t1") == 2 else "age"
    with pytest.raises(ManifestError, match=rf"^{csv}: column name\(s\) '{name}' appear more than once in the "
                                            r"header \(spaces around names are ignored\); rename them$"):
        load_manifest(csv)


def test_a_row_with_fewer_cells_than_the_header_is_refused(tmp_path):
    """A value left out shifted the next ones left: the image path landed in 'age', which then counted
    as an image column and failed the complete rows (fuzz round 22). Empty cells, a trailing empty
    column, and blank lines stay fine."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,age,t1\na,30.5,img/a.nii.gz\nb,img/b.nii.gz\nc,40.5,img/c.nii.gz\n")
    with pytest.raises(ManifestError, match=rf"^{csv}: line\(s\) 3 have fewer cells than the header's 3 \(a value "
                                            r"left out shifts the next ones into the wrong columns\); write an empty "
                                            r"cell for a missing value \(,,\)$"):
        load_manifest(csv)
    csv.write_text("subject_id,t1,age,\na,img/a.nii.gz,,\n\nb,img/b.nii.gz,40.5\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and not cohort.failures


def test_a_row_with_more_cells_than_the_header_is_refused(tmp_path):
    """pandas dropped the extra cells (with a two-line ParserWarning naming neither file nor row): an
    unquoted comma inside a value shifted or lost cells silently. A trailing empty cell stays fine."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age\na,img/a.nii.gz,30.5,\nb,img/b.nii.gz,Smith, John\nc,img/c.nii.gz,40.5\n")
    with pytest.raises(ManifestError, match=rf"^{csv}: line\(s\) 3 have more cells than the header's 3 \(a ',' inside "
                                            r"a value that is not quoted\?\); quote such values or remove the extra"):
        load_manifest(csv)
    csv.write_text("# cohort of 2026\nsubject_id,t1,age\na,img/a.nii.gz,30.5\n")
    with pytest.raises(ManifestError, match="the first line is a comment .*; the column names must be the first line"):
        load_manifest(csv)


def test_a_numeric_label_with_a_few_words_stays_numeric_and_says_so(tmp_path, caplog):
    """One 'unknown' among ages turned age into a categorical label (one class per age) without a word."""
    _files(tmp_path, [f"{c}.nii.gz" for c in "abcdef"])
    csv = tmp_path / "m.csv"
    rows = [("a", "31.5", "1"), ("b", "unknown", "2"), ("c", "44.25", "1"), ("d", "55.75", "x"), ("e", "61.5", "2"),
            ("f", "70.5", "1")]
    csv.write_text("subject_id,t1,age,site\n" + "".join(f"{s},img/{s}.nii.gz,{a},{k}\n" for s, a, k in rows))
    with caplog.at_level("WARNING"):
        cohort = load_manifest(csv)
    assert cohort.label_types == {"age": "continuous", "site": "categorical"}  # site: codes and a word, as written
    assert [s.labels["age"] for s in cohort.subjects] == [31.5, None, 44.25, 55.75, 61.5, 70.5]
    assert [s.labels["site"] for s in cohort.subjects] == ["1", "2", "1", "x", "2", "1"]
    assert (f"{csv}: label column 'age' holds numbers, but 1 cell(s) are not numbers (b: 'unknown'); read as "
            "missing") in caplog.text


def test_a_utf16_manifest_is_read(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id\tt1\tage\na\timg/a.nii.gz\t30.5\nb\timg/b.nii.gz\t40.5\n", encoding="utf-16")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and [s.labels["age"] for s in cohort.subjects] == [30.5, 40.5]


def test_a_row_with_every_image_cell_empty_names_its_row(tmp_path):
    _files(tmp_path, ["b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age\na,,30.5\nb,img/b.nii.gz,40.5\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["b"] and cohort.failures[0].message == f"{csv}: row 2 (a): file not found: t1 (empty)"


def test_a_participants_table_that_cannot_be_parsed_names_the_file(tmp_path):
    write_nifti(tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz", blob_volume(seed=0))
    (tmp_path / "participants.tsv").write_text('participant_id\tage\nsub-01\t"30\n')
    with pytest.raises(ManifestError, match=rf"^{tmp_path / 'participants.tsv'}: cannot read the participants table"):
        cohort_from_glob(tmp_path)


def test_rows_with_every_cell_empty_are_not_subjects(tmp_path):
    """A spreadsheet's ';;;' padding rows failed as "row N has no subject_id" (exit 1 for the job)."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id;t1;age\na;img/a.nii.gz;30,5\n;;\n ; ; \nb;img/b.nii.gz;40\n;;\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and cohort.failures == []
    assert [s.labels["age"] for s in cohort.subjects] == [30.5, 40.0]
    csv.write_text("subject_id,t1,age\na,img/a.nii.gz,30.5\n,,41\n")  # a row with a value is still reported
    assert [f.message for f in load_manifest(csv).failures] == [f"{csv}: row 3 has no subject_id; left out"]


def test_label_cells_are_stripped_and_missing_tokens_read_in_any_case(tmp_path):
    """'M ' and 'M' are one class; NAN, Null and ' n/a ' are missing, as pandas reads nan, NULL and N/A."""
    _files(tmp_path, [f"{c}.nii.gz" for c in "abcdef"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,sex\na,img/a.nii.gz,M \nb,img/b.nii.gz,F\nc,img/c.nii.gz,M\n"
                   "d,img/d.nii.gz,NAN\ne,img/e.nii.gz,Null\nf,img/f.nii.gz, n/a \n")
    cohort = load_manifest(csv)
    assert [s.labels["sex"] for s in cohort.subjects] == ["M", "F", "M", None, None, None]
    assert cohort.label_types["sex"] == "categorical"


def test_a_label_column_mixing_numbers_and_much_text_is_warned(tmp_path, caplog):
    _files(tmp_path, [f"{c}.nii.gz" for c in "abcd"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,age\na,img/a.nii.gz,31\nb,img/b.nii.gz,unknown\nc,img/c.nii.gz,unknown\n"
                   "d,img/d.nii.gz,?\n")
    with caplog.at_level("WARNING"):
        cohort = load_manifest(csv)
    assert cohort.label_types["age"] == "categorical"
    assert (f"{csv}: label column 'age' mixes 1 number(s) and 3 text cell(s) ('unknown', '?'); read as categorical"
            in caplog.text)


@pytest.mark.parametrize("sid, shown", [("bad\0x", "bad\\x00x"), ("x\ty", "x\\ty"),
                                        ("Müller\tß", "Müller\\tß"),  # letters stay letters
                                        # a right-to-left override printed the ID, and the rest of the line, reversed
                                        ("abc\u202edef", "abc\\u202edef")])
def test_a_subject_id_with_a_control_character_fails_its_row(sid, shown, tmp_path):
    """A NUL cannot be written as an HDF5 string (the caching job used to stop at its first commit);
    a newline or tab breaks one-line messages: the row fails, the others stay."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_bytes(f"subject_id,t1\na,img/a.nii.gz\n{sid},img/b.nii.gz\n".encode())
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"]
    message = cohort.failures[0].message
    assert message.startswith(f"{csv}: row 3: subject_id '{shown}' holds a control character") and "\n" not in message


def test_a_hard_link_is_the_same_image(tmp_path):
    import os

    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    os.link(tmp_path / "img" / "a.nii.gz", tmp_path / "img" / "a_link.nii.gz")
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii.gz\nb,img/b.nii.gz\nc,img/a_link.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["b"]
    assert {f.subject_id for f in cohort.failures} == {"a", "c"}
    assert "the same image file as subject(s) 'c'; all left out" in cohort.failures[0].message


def test_a_byte_identical_copy_under_another_id(tmp_path):
    """``cp a.nii.gz d.nii.gz`` is the same scan under two IDs, as a hard link is: both left out. Scans
    of one grid (raw .nii files of equal size and header) and one subject's modalities that are copies
    of one file are not a leak and stay."""
    import shutil

    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    shutil.copy(tmp_path / "img" / "a.nii.gz", tmp_path / "img" / "d.nii.gz")
    write_nifti(tmp_path / "img" / "e.nii", blob_volume(seed=5))
    write_nifti(tmp_path / "img" / "f.nii", blob_volume(seed=6))
    shutil.copy(tmp_path / "img" / "b.nii.gz", tmp_path / "img" / "b_t2.nii.gz")
    assert (tmp_path / "img" / "e.nii").stat().st_size == (tmp_path / "img" / "f.nii").stat().st_size
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,t2\n"
                   "a,img/a.nii.gz,img/e.nii\nb,img/b.nii.gz,img/b_t2.nii.gz\nd,img/d.nii.gz,img/f.nii\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["b"]
    messages = {f.subject_id: f.message for f in cohort.failures}
    assert set(messages) == {"a", "d"}
    a, d = tmp_path / "img" / "a.nii.gz", tmp_path / "img" / "d.nii.gz"
    assert messages["a"] == f"{a}: byte-identical to the image of another subject: {d} ('d'); all left out"
    assert messages["d"] == f"{d}: byte-identical to the image of another subject: {a} ('a'); all left out"
    assert [f.path for f in cohort.failures] == [str(a), str(d)]


def test_identical_files_against_whole_file_hashes(tmp_path):
    """Groups equal to grouping every file by its whole sha256, on files built to fool the shortcuts:
    equal sizes, equal sampled blocks with a difference between them, one byte changed at the end."""
    import hashlib

    import numpy as np

    from slice2vol.data.manifest import identical_files

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, 100_000, dtype=np.uint8)
    contents = {"base": base, "copy": base.copy(), "copy2": base.copy()}
    middle = base.copy()
    middle[20_000] ^= 1  # between two sampled blocks (8 blocks of 4 KiB over 100 kB)
    contents |= {"middle": middle, "middle_copy": middle.copy()}
    last = base.copy()
    last[-1] ^= 1
    contents |= {"last": last, "shorter": base[:-1], "other": rng.integers(0, 256, 100_000, dtype=np.uint8),
                 "tiny": base[:10], "tiny_copy": base[:10].copy(), "empty": base[:0], "empty2": base[:0]}
    paths = []
    for name, data in contents.items():
        (path := tmp_path / name).write_bytes(data.tobytes())
        paths.append(path)
    reference: dict[str, list] = {}
    for path in paths:
        reference.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(path)
    expected = sorted((sorted(g) for g in reference.values() if len(g) > 1 and g[0].stat().st_size),
                      key=lambda g: str(g[0]))  # empty files are no scans: their reads say so
    assert identical_files(paths) == expected
    assert [[p.name for p in g] for g in expected] == [["base", "copy", "copy2"], ["middle", "middle_copy"],
                                                       ["tiny", "tiny_copy"]]
    assert identical_files(paths + [tmp_path / "missing"]) == expected  # unreadable: left to the read


def test_two_empty_image_files_are_not_called_copies(tmp_path):
    """Fuzz round 6: two zero-byte images were left out as byte-identical copies of each other, hiding
    what is wrong with them; they now stay for their reads to fail as empty files."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "img" / "b.nii.gz").write_bytes(b"")
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\na,img/a.nii.gz\nb,img/b.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and cohort.failures == []
    volumes = list(cohort.iter_volumes())
    assert volumes == [] and [f.subject_id for f in cohort.failures] == ["a", "b"]
    assert all("empty file" in f.message for f in cohort.failures)


@pytest.mark.parametrize("cell, shown, char", [
    ('"img/bad\nname.nii.gz"', "img/bad\\nname.nii.gz", "\\n"),
    ('"img/bad\rname.nii.gz"', "img/bad\\rname.nii.gz", "\\r"),
    ("img/bad\tname.nii.gz", "img/bad\\tname.nii.gz", "\\t"),
])
def test_a_path_with_a_control_character_fails_its_row(cell, shown, char, tmp_path):
    """A newline in a path cell (a real file of that name loaded) made every later message about the
    file two lines, a CR overwrote the terminal line: the row fails as one with such an ID does."""
    _files(tmp_path, ["a.nii.gz", "bad\nname.nii.gz", "bad\rname.nii.gz", "bad\tname.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_bytes(f"subject_id,t1\na,img/a.nii.gz\nb,{cell}\n".encode())
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"] and [f.subject_id for f in cohort.failures] == ["b"]
    assert cohort.failures[0].message == (f"{csv}: row 3 (b): t1 '{shown}' holds a control character ({char}); "
                                          "left out")


def test_blank_lines_before_the_header_are_skipped_and_rows_keep_their_file_lines(tmp_path):
    """Leading blank lines were read as a header of no columns: "line(s) 3, 4 have more cells than the
    header's 0". pandas skips blank lines anywhere; messages still name the file's own lines."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text('\n\nsubject_id;t1;age\na;img/a.nii.gz;30\n\n"b";"img/b\n.nii.gz";31\n;img/c.nii.gz;32\n')
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"] and [s.row for s in cohort.subjects] == [4]
    assert [s.labels["age"] for s in cohort.subjects] == [30]
    assert [f.message for f in cohort.failures] == [
        f"{csv}: row 6 (b): t1 'img/b\\n.nii.gz' holds a control character (\\n); left out",
        f"{csv}: row 8 has no subject_id; left out"]
    csv.write_text("\n \nsubject_id,t1,age\na,img/a.nii.gz,30,x\n")  # the layout check names the real line too
    with pytest.raises(ManifestError, match=rf"^{csv}: line\(s\) 4 have more cells than the header's 3 "):
        load_manifest(csv)


@pytest.mark.parametrize("cell", [" lead.nii.gz", '" lead.nii.gz"'])
def test_a_file_name_starting_with_a_space_is_found(cell, tmp_path):
    """The cell was stripped before the lookup: "lead.nii.gz: file not found" for a file that is there."""
    path = write_nifti(tmp_path / " lead.nii.gz", blob_volume(seed=0))
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\nx,{cell}\n")
    cohort = load_manifest(csv)
    assert cohort.failures == [] and cohort.subjects[0].images["t1"] == path


def test_a_symbolic_link_loop_or_an_overlong_name_in_a_manifest_says_so(tmp_path):
    """Fuzz round 17b: a loop was called "a symbolic link to loopB.nii.gz, which does not exist" for a
    loopB that is there (it links back); a name over the system's limit ended the manifest in an
    OSError traceback. Both fail their row in the words a file given alone gets (io.file_problem)."""
    _files(tmp_path, ["a.nii.gz"])
    (tmp_path / "img" / "loopA.nii.gz").symlink_to("loopB.nii.gz")
    (tmp_path / "img" / "loopB.nii.gz").symlink_to("loopA.nii.gz")
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\na,img/a.nii.gz\nb,img/loopA.nii.gz\nc,img/{'x' * 300}.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"]
    messages = {f.subject_id: f.message for f in cohort.failures}
    loop = tmp_path / "img" / "loopA.nii.gz"
    assert messages["b"] == (f"{loop}: file not found: t1 ({loop}: a symbolic link loop (the link points back at "
                             "itself))")
    assert messages["c"].endswith(".nii.gz: unreadable (File name too long))")


LOOKALIKES = [("jos\u00e9", "jose\u0301", "'jos\\u00e9' (row 2) and 'jose\\u0301' (row 4)"),  # NFC, NFD
              ("s1", "s1\u200b", "'s1' (row 2) and 's1\\u200b' (row 4)"),  # zero-width space
              ("s1", "s\u200d1", "'s1' (row 2) and 's\\u200d1' (row 4)"),  # zero-width joiner
              ("s1", "s\ufeff1", "'s1' (row 2) and 's\\ufeff1' (row 4)"),  # a byte-order mark inside
              ("s1", "\uff531", "'s1' (row 2) and '\\uff531' (row 4)")]  # fullwidth s


@pytest.mark.parametrize("first, second, shown", LOOKALIKES)
def test_subject_ids_that_only_look_alike_are_duplicates(tmp_path, first, second, shown):
    """Fuzz round 17b: such IDs were two subjects, who would sit on both sides of a split and print
    alike in every table; now refused as duplicates are, with the spellings escaped to show how they
    differ."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\n{first},img/a.nii.gz\nb,img/b.nii.gz\n{second},img/c.nii.gz\n",
                   encoding="utf-8")
    cohort = load_manifest(csv)
    assert cohort.ids == ["b"]
    assert [f.message for f in cohort.failures] == [
        f"{csv}: duplicate subject_id: {shown} look the same but are written with different characters (accents "
        "composed or not, zero-width or fullwidth characters); all left out"]


def test_subject_ids_are_stored_in_nfc(tmp_path):
    """An ID typed on macOS (NFD) names the same subject, in a store and in an ID list, as one typed
    elsewhere (NFC); an ID of zero-width characters only is no ID."""
    import unicodedata

    from slice2vol.data.manifest import read_id_list

    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\njose\u0301,img/a.nii.gz\nb,img/b.nii.gz\n\u200b,img/c.nii.gz\n", encoding="utf-8")
    cohort = load_manifest(csv)
    assert cohort.ids == ["jos\u00e9", "b"]
    assert [f.message for f in cohort.failures] == [f"{csv}: row 4 has no subject_id; left out"]
    ids = tmp_path / "ids.txt"
    ids.write_text(unicodedata.normalize("NFD", "jos\u00e9\nM\u00fcller\n"), encoding="utf-8")
    assert read_id_list(ids, "--subjects") == ["jos\u00e9", "M\u00fcller"]


def test_subject_ids_that_differ_only_in_case_are_kept_with_a_warning(tmp_path, caplog):
    """IDs are case-sensitive (file names on Linux), so S1 and s1 stay two subjects, but such rows are
    most often one subject typed twice: one warning names the manifest and the IDs."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1\nS1,img/a.nii.gz\nb,img/b.nii.gz\ns1,img/c.nii.gz\n")
    with caplog.at_level("WARNING"):
        cohort = load_manifest(csv)
    assert cohort.ids == ["S1", "b", "s1"] and not cohort.failures
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{csv}: subject_ids that differ only in case: 'S1' (row 2) and 's1' (row 4); kept as "
                        "different subjects (IDs are case-sensitive), but such rows are most often one subject "
                        "typed twice"]


@pytest.mark.parametrize("header, rows", [
    ("subject_id,t1,age,", ["a,img/a.nii.gz,30.5,", "b,img/b.nii.gz,40.5"]),  # a trailing delimiter
    ("subject_id,t1, ,age", ["a,img/a.nii.gz,,30.5", "b,img/b.nii.gz, ,40.5"]),  # an empty name
])
def test_a_header_cell_without_a_name_over_an_empty_column_is_no_label(tmp_path, header, rows):
    """Fuzz round 17b: pandas named the column 'Unnamed: 3', which became a categorical label."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and cohort.label_types == {"age": "continuous"} and not cohort.failures
    assert [s.labels for s in cohort.subjects] == [{"age": 30.5}, {"age": 40.5}]


def test_a_column_without_a_name_that_holds_values_is_refused_in_one_line(tmp_path):
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text("subject_id,t1,,age\na,img/a.nii.gz,,30.5\nb,img/b.nii.gz,x,40.5\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(csv)
    assert str(err.value) == f"{csv}: column 3 has no name in the header but holds values (row 3: 'x'); name it in " \
                             "the header line"


@pytest.mark.parametrize("stored, written", [("NFC", "NFD"), ("NFD", "NFC")])
def test_a_path_in_another_unicode_form_than_its_file_is_found(tmp_path, stored, written):
    """Fuzz round 17b: a path typed on macOS (NFD) for a file stored in NFC, or the reverse, was
    "file not found" with a message showing a name that is there."""
    import unicodedata

    name = "caf\u00e9 M\u00fcller.nii.gz"
    path = write_nifti(tmp_path / "img" / unicodedata.normalize(stored, name), blob_volume(seed=0))
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\na,img/{unicodedata.normalize(written, name)}\nb,img/gone\u00e9.nii.gz\n",
                   encoding="utf-8")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a"] and cohort.subjects[0].images["t1"] == path
    assert [f.subject_id for f in cohort.failures] == ["b"]
    assert "file not found" in cohort.failures[0].message  # no form of it exists: as before


@pytest.mark.parametrize("file_form, table_form", [("NFD", "NFC"), ("NFC", "NFD")])
def test_a_glob_cohort_meets_its_participants_table_across_unicode_forms(tmp_path, file_form, table_form):
    """IDs are stored in NFC: a file named on macOS (NFD) still gets the labels of participants.tsv (NFC)."""
    import unicodedata

    write_nifti(tmp_path / unicodedata.normalize(file_form, "jos\u00e9_T1w.nii.gz"), blob_volume(seed=0))
    table = unicodedata.normalize(table_form, "participant_id\tage\njos\u00e9\t30.5\n")
    (tmp_path / "participants.tsv").write_text(table, encoding="utf-8")
    cohort = cohort_from_glob(tmp_path, "*.nii.gz", id_regex=r"^([^_]+)_")
    assert cohort.ids == ["jos\u00e9"] and cohort.subjects[0].labels == {"age": 30.5}


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_a_utf16_manifest_without_a_byte_order_mark_is_read(tmp_path, encoding):
    """``iconv -t UTF-16LE`` writes no mark: read as UTF-8 the NUL bytes stayed inside the column names
    ("no 'subject_id' column (columns: ['s\\x00u\\x00b\\x00...'])", fuzz round 22). UTF-32, with its mark
    (which starts like UTF-16's) or without, read as rows of the wrong length (fuzz round 23)."""
    _files(tmp_path, ["a.nii.gz", "b.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_bytes("subject_id,t1,age\na,img/a.nii.gz,30.5\nb,img/b.nii.gz,40.5\n".encode(encoding))
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"] and [s.labels["age"] for s in cohort.subjects] == [30.5, 40.5]


def test_an_unclosed_quote_is_named_with_its_line(tmp_path):
    """Fuzz round 23: a '"' that is never closed swallowed the rest of the file into one cell, and the
    row was blamed on a value left out. A '"' inside an unquoted value is a plain character, and a
    quoted value over two lines, closed, loads."""
    _files(tmp_path, ['a".nii.gz', "b.nii.gz", "c.nii.gz"])
    csv = tmp_path / "m.csv"
    csv.write_text('subject_id,t1,age\na,img/a".nii.gz,30\nb,"img/b.nii.gz,40\nc,img/c.nii.gz,50\n')
    with pytest.raises(ManifestError, match=rf"^{csv}: line 3 opens a quoted value \('\"'\) that is never closed: it "
                                            r"runs to the end of the file and swallows every row after it; close the "
                                            r"quote, or remove it$"):
        load_manifest(csv)
    csv.write_text('subject_id,t1,age,note\na,img/a".nii.gz,30,"two\nlines"\nb,"img/b.nii.gz",40,\n')
    assert load_manifest(csv).ids == ["a", "b"]


def test_a_latin1_manifest_is_refused_with_the_byte_and_what_to_do(tmp_path):
    _files(tmp_path, ["a.nii.gz"])
    csv = tmp_path / "m.csv"
    text = "subject_id,t1,site\na,img/a.nii.gz,München\n"
    csv.write_bytes(text.encode("latin-1"))
    at = text.index("ü")  # one byte per character in Latin-1
    with pytest.raises(ManifestError, match=rf"^{csv}: cannot read the manifest: byte 0xfc at position {at} is not "
                                            r"UTF-8 text \(a Latin-1 or Windows-1252 export\?\); save the file as UTF-8$"):
        load_manifest(csv)


def test_a_binary_file_given_as_the_manifest_is_named_for_what_it_is(tmp_path):
    """Fuzz round 23: a gzipped CSV, a NIfTI image or a feature store given as --manifest was called
    "byte 0x8b at position 1 is not UTF-8 text (a Latin-1 or Windows-1252 export?)"."""
    import gzip

    import h5py
    import numpy as np

    from slice2vol.data.manifest import read_id_list

    text = "subject_id,t1\na,img/a.nii.gz\n"
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(text.encode()))
    image = _files(tmp_path, ["a.nii.gz"])[0]
    plain = write_nifti(tmp_path / "plain.nii", blob_volume())
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["x"] = np.zeros(2)
    (tmp_path / "nul.csv").write_bytes(b"subject_id\x00\x01,t1\na,a\n")
    expected = {"m.csv.gz": "gzip-compressed data (decompress it first: gunzip)",
                str(image.relative_to(tmp_path)): "a NIfTI image (gzip-compressed)", "plain.nii": "a NIfTI image",
                "s.h5": "an HDF5 file (a feature store?)", "nul.csv": "binary data (NUL bytes)"}
    for name, what in expected.items():
        with pytest.raises(ManifestError) as err:
            load_manifest(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name}: {what}, not a text table; the manifest is a CSV/TSV file of "
                                  "subject IDs, image paths and labels")
    with pytest.raises(ValueError, match=r"m\.csv\.gz: gzip-compressed data \(decompress it first: gunzip\), not a "
                                         r"text file; the --subjects file holds one subject ID per line$"):
        read_id_list(tmp_path / "m.csv.gz", "--subjects")
    # UTF-16 text has NUL bytes and is text
    (tmp_path / "u16.csv").write_bytes(text.replace("img/a.nii.gz", str(image)).encode("utf-16-le"))
    assert load_manifest(tmp_path / "u16.csv").ids == ["a"]


def test_a_file_that_cannot_be_read_is_not_called_missing(tmp_path, monkeypatch):
    """Fuzz round 23: a scan without read permission was "not a NIfTI image (Could not read file)" in
    `info`, and a path the system refuses (a name over 255 bytes, a folder that may not be entered)
    was listed under "file not found"."""
    import os

    import slice2vol.data.io as io_mod

    good, locked = _files(tmp_path, ["a.nii.gz", "locked.nii.gz"])
    real_access = os.access
    # (root reads a mode-000 file anyway: the permission is taken away where it is asked)
    monkeypatch.setattr(io_mod.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(VolumeError, match=r"locked\.nii\.gz: unreadable \(Permission denied\)$"):
        load_volume(locked)
    long = "x" * 300 + ".nii.gz"
    csv = tmp_path / "m.csv"
    csv.write_text(f"subject_id,t1\na,img/a.nii.gz\nb,img/locked.nii.gz\nc,img/{long}\nd,img/gone.nii.gz\n")
    cohort = load_manifest(csv)
    assert cohort.ids == ["a", "b"]  # b is there: reading it fails, and the cohort goes on
    assert [v.subject_id for v in cohort.iter_volumes()] == ["a"]
    messages = {f.subject_id: f.message for f in cohort.failures}
    assert messages["b"].endswith("locked.nii.gz: unreadable (Permission denied)")
    assert f": cannot read: t1 ({tmp_path / 'img' / long}: unreadable (File name too long))" in messages["c"]
    assert messages["d"].endswith(f"file not found: t1 ({tmp_path / 'img' / 'gone.nii.gz'})")


def test_a_linked_manifest_finds_files_next_to_its_target_and_warns_of_two_readings(tmp_path, caplog):
    """Fuzz round 23: a manifest reached through a link read its relative paths against the link's
    folder only: a file next to the real manifest was "not found", and a different scan under the same
    relative name next to the link was read without a word."""
    import logging

    (tmp_path / "A" / "img").mkdir(parents=True)
    (tmp_path / "B" / "img").mkdir(parents=True)
    write_nifti(tmp_path / "A" / "img" / "x.nii.gz", blob_volume(seed=1))
    write_nifti(tmp_path / "A" / "img" / "y.nii.gz", blob_volume(seed=2))
    write_nifti(tmp_path / "B" / "img" / "x.nii.gz", blob_volume(seed=3))  # another scan, same name
    (tmp_path / "A" / "m.csv").write_text("subject_id,t1\nx,img/x.nii.gz\ny,img/y.nii.gz\n")
    (tmp_path / "B" / "link.csv").symlink_to(Path("..") / "A" / "m.csv")
    with caplog.at_level(logging.WARNING, logger="slice2vol.data.manifest"):
        cohort = load_manifest(tmp_path / "B" / "link.csv")
    images = {s.subject_id: s.images["t1"] for s in cohort.subjects}
    assert images == {"x": tmp_path / "B" / "img" / "x.nii.gz", "y": tmp_path / "A" / "img" / "y.nii.gz"}
    warned = [r.getMessage() for r in caplog.records if "a link to" in r.getMessage()]
    assert warned == [f"{tmp_path / 'B' / 'link.csv'}: a link to {(tmp_path / 'A' / 'm.csv').resolve()}; 1 relative path(s) "
                      "name different files next to the link (read) and next to the linked manifest, e.g. "
                      "img/x.nii.gz: give absolute paths, or copy the manifest instead of linking it"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slice2vol.data.manifest"):
        assert load_manifest(tmp_path / "A" / "m.csv").ids == ["x", "y"]  # the file itself: no warning
    assert not [r for r in caplog.records if "a link to" in r.getMessage()]
