"""The CSV formats (wsi_pipeline.formats.tables): the labels CSV's one parsing rule, and the round trips and
refusals of predictions.csv, patient_predictions.csv, tme.csv, oof_predictions.csv and slides.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_pipeline.errors import FormatError, LabelsError
from wsi_pipeline.formats import api as F

PADDED = (
    " slide_id , patient_id ,response, til_fraction ,arm\n"
    "  001 ,  P1 , 1 , 0.25 , drug \n"
    "002,P1,0,NA,control\n"
    " 003 ,, yes ,  , drug\n"
)


def _write(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- labels CSV
def test_labels_strip_headers_and_cells_and_keep_ids_as_text(tmp_path: Path) -> None:
    df = F.read_labels_csv(_write(tmp_path, PADDED))
    assert list(df.columns) == ["slide_id", "patient_id", "response", "til_fraction", "arm"]
    assert list(df["slide_id"]) == ["001", "002", "003"]  # stripped, leading zeros kept
    assert list(df["patient_id"]) == ["P1", "P1", "003"]  # an empty patient_id defaults to the slide_id
    assert list(df["response"]) == ["1", "0", "yes"]  # text form: what `wsi train` encodes targets from
    assert df["til_fraction"].tolist()[0] == "0.25" and df["til_fraction"].isna().tolist() == [False, True, True]
    assert list(df["arm"]) == ["drug", "control", "drug"]
    assert df.attrs["path"] == str(tmp_path / "labels.csv")


def test_labels_numeric_form_converts_only_all_numeric_columns(tmp_path: Path) -> None:
    df = F.read_labels_csv(_write(tmp_path, PADDED), numeric=True)
    assert df["til_fraction"].dtype == np.float64 and df["til_fraction"].iloc[0] == pytest.approx(0.25)
    assert df["response"].dtype == object  # "yes" among 0/1: stays text
    assert df["slide_id"].tolist() == ["001", "002", "003"]  # ids never become numbers
    ints = F.read_labels_csv(_write(tmp_path, "slide_id,age\na,61\nb,70\n"), numeric=True)
    assert ints["age"].dtype == np.int64 and ints["age"].tolist() == [61, 70]


def test_missing_cell_tokens_are_recognised_after_stripping(tmp_path: Path) -> None:
    cells = ["", " NA ", "N/A", "nan", "NaN", "null", "None", "<NA>", "#N/A", "NULL", "n/a"]
    text = "slide_id,x\n" + "".join(f"s{i},{c}\n" for i, c in enumerate(cells)) + "last,NAx\n"
    df = F.read_labels_csv(_write(tmp_path, text))
    assert df["x"].isna().tolist() == [True] * len(cells) + [False]


def test_train_and_predictive_read_padded_labels_alike(tmp_path: Path) -> None:
    """`wsi train` (mil.targets) and `wsi predictive` (analysis.tables) go through the one reader, so they
    see the same slide ids and patients, and both match the ids of predictions.csv."""
    from wsi_pipeline.analysis.tables import Sources, read_labels, resolve_column, slide_frame
    from wsi_pipeline.mil.targets import load_labels, parse_targets, read_labels_table

    path = _write(tmp_path, PADDED)
    train = read_labels_table(path)
    predictive = read_labels(path)
    assert list(train.index) == list(predictive["slide_id"]) == ["001", "002", "003"]
    assert list(train["patient_id"]) == list(predictive["patient_id"])
    encoded = load_labels(path, parse_targets("response:binary"))
    assert encoded.slide_ids == ["001", "002", "003"] and encoded.patient_ids == ["P1", "P1", "003"]
    preds = pd.DataFrame({"slide_id": ["001", "002", "003"], "patient_id": ["P1", "P1", "003"],
                          "response_prob": [0.9, 0.2, 0.7]})
    run = tmp_path / "RUN"
    F.write_predictions_csv(run / F.PREDICTIONS_CSV, preds)
    src = Sources.load(run, path)
    frame = slide_frame(src, {"b": resolve_column("response_prob", src)})
    assert frame["b"].tolist() == [0.9, 0.2, 0.7]  # every padded label row found its prediction


@pytest.mark.parametrize(("text", "match"), [
    ("patient_id,response\np,1\n", r"no 'slide_id' column .*add one"),
    ("slide_id,response\na,1\n  ,0\nb,1\n", r"empty slide_id on line\(s\) 3; fill in"),
    ("slide_id,response\na,1\nb,0\n a ,1\n", r"slide_id 'a' appears twice \(lines 2, 4\); one row per slide"),
    ("slide_id, x ,x\na,1,2\n", r"column\(s\) \['x'\] appear twice"),
    ("slide_id;response;til\na;1;0,12\n", r"separated by ';' \(Excel in a European locale .*CSV UTF-8.*decimal point"),
    ("slide_id\tresponse\na\t1\n", r"separated by tabs .*; save it as comma-separated UTF-8"),
])
def test_labels_errors_name_the_file_the_rows_and_the_fix(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text, "my_labels.csv")
    with pytest.raises(LabelsError, match=match) as exc:
        F.read_labels_csv(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_labels_not_found_or_not_csv(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match=r"nothere\.csv: labels CSV not found; pass --labels"):
        F.read_labels_csv(tmp_path / "nothere.csv")
    bad = tmp_path / "bin.csv"
    bad.write_bytes(b"slide_id,x\n\xff\xfe\x00,1\n")
    with pytest.raises(LabelsError, match=r"bin\.csv: cannot parse .*UTF-8"):
        F.read_labels_csv(bad)
    utf16 = tmp_path / "unicode.csv"  # Excel's "Unicode Text": UTF-16 with a byte-order mark
    utf16.write_text("slide_id,response\na,1\n", encoding="utf-16")
    with pytest.raises(LabelsError, match=r"unicode\.csv: it is UTF-16 text .*save it as comma-separated UTF-8"):
        F.read_labels_csv(utf16)


def test_labels_writer_round_trips_and_refuses_duplicates(tmp_path: Path) -> None:
    df = pd.DataFrame({"slide_id": ["001", "002"], "patient_id": ["p", "p"], "os_months": [12.5, np.nan]})
    path = F.write_labels_csv(tmp_path / "labels.csv", df)
    back = F.read_labels_csv(path, numeric=True)
    pd.testing.assert_frame_equal(back, df, check_like=False)
    with pytest.raises(LabelsError, match=r"out\.csv: slide_id 'a' appears twice"):
        F.write_labels_csv(tmp_path / "out.csv", pd.DataFrame({"slide_id": ["a", "a"]}))
    assert not (tmp_path / "out.csv").exists()


# ---------------------------------------------------------------- RUN tables
def test_predictions_round_trip_ids_as_text(tmp_path: Path) -> None:
    df = pd.DataFrame({"slide_id": ["001", "010"], "patient_id": ["7", "7"], "response_prob": [0.25, 0.75],
                       "response_pred": ["0", "1"]})
    path = F.write_predictions_csv(tmp_path / F.PREDICTIONS_CSV, df)
    back = F.read_predictions_csv(path)
    assert back["slide_id"].tolist() == ["001", "010"] and back["patient_id"].tolist() == ["7", "7"]
    assert back["response_prob"].tolist() == [0.25, 0.75]
    text = F.read_predictions_csv(path, text=True)
    assert text.to_dict("records")[0] == {"slide_id": "001", "patient_id": "7", "response_prob": "0.25",
                                         "response_pred": "0"}


def test_run_tables_refuse_files_without_their_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, "slide,response_prob\na,0.5\n", "predictions.csv")
    with pytest.raises(FormatError, match=r"predictions\.csv: no column\(s\) \['slide_id', 'patient_id'\].*"
                                          r"re-run `wsi predict`"):
        F.read_predictions_csv(p)
    with pytest.raises(FormatError, match=r"tme\.csv: no tme\.csv; run `wsi tme RUN` first"):
        F.read_tme_csv(tmp_path / "tme.csv")
    with pytest.raises(ValueError, match="needs the columns"):
        F.write_predictions_csv(tmp_path / "p.csv", pd.DataFrame({"slide_id": ["a"]}))
    with pytest.raises(ValueError, match="needs the columns"):
        F.write_patient_predictions_csv(tmp_path / "pp.csv", pd.DataFrame({"patient_id": ["a"]}))


def test_patient_and_oof_predictions_round_trip(tmp_path: Path) -> None:
    pp = pd.DataFrame({"patient_id": ["01", "02"], "n_slides": [2, 1], "til_fraction_pred": [0.1, 0.2]})
    back = F.read_patient_predictions_csv(F.write_patient_predictions_csv(tmp_path / "pp.csv", pp))
    pd.testing.assert_frame_equal(back, pp)
    oof = pd.DataFrame({"model": ["abmil", "abmil"], "patient_id": ["01", "02"], "fold": [0, 1]})
    back = F.read_oof_predictions_csv(F.write_oof_predictions_csv(tmp_path / "oof.csv", oof))
    pd.testing.assert_frame_equal(back, oof)


def test_tme_csv_orders_columns_and_rows_and_keeps_unchanged_files(tmp_path: Path) -> None:
    rows = [{"n_tiles": 9, "slide_id": "b", "til_fraction": 0.123456789, "immune_phenotype": "desert"},
            {"n_tiles": 4, "slide_id": "a", "til_fraction": 0.5, "immune_phenotype": "inflamed"}]
    path = tmp_path / F.TME_CSV
    F.write_tme_csv(path, rows, leading=("immune_phenotype", "til_fraction"))
    lines = path.read_text().splitlines()
    assert lines[0] == "slide_id,immune_phenotype,til_fraction,n_tiles"
    assert lines[1].startswith("a,") and lines[2] == "b,desert,0.123457,9"
    before = path.stat().st_mtime_ns
    F.write_tme_csv(path, list(reversed(rows)), leading=("immune_phenotype", "til_fraction"))
    assert path.stat().st_mtime_ns == before  # same content: not rewritten
    back = F.read_tme_csv(path)
    assert back["slide_id"].tolist() == ["a", "b"] and back["n_tiles"].tolist() == [4, 9]


def test_slides_csv_round_trip_legacy_upgrade_and_refusal(tmp_path: Path) -> None:
    path = tmp_path / F.SLIDES_CSV
    rows = [F.SlideStatus("001", "tile", n_tiles=3, slide_mpp=0.25),
            F.SlideStatus("001", "extract", component="uni", status=F.STATUS_FAILED, error="boom, with comma")]
    F.write_slides_csv(path, rows)
    assert path.read_text().splitlines()[0] == ",".join(F.SLIDES_COLUMNS)
    back = F.read_slides_csv(path)
    assert [(r.slide_id, r.stage, r.component, r.n_tiles, r.error) for r in back] == [
        ("001", "tile", "", "3", ""), ("001", "extract", "uni", "", "boom, with comma")]
    legacy = _write(tmp_path, "slide_id,stage,path,status,error,error_type,n_tiles,slide_mpp,seconds,updated\n"
                              "a,tile,/x.svs,done,,,3,0.5,1.0,2026-01-01T00:00:00\n", "legacy.csv")
    (row,) = F.read_slides_csv(legacy)  # version 1 (no component column) reads as component ''
    assert (row.slide_id, row.component, row.path) == ("a", "", "/x.svs")
    assert F.read_slides_csv(tmp_path / "none.csv") == []
    bad = _write(tmp_path, "slide_id,response\na,1\n", "bad.csv")
    with pytest.raises(FormatError, match=r"bad\.csv: not a status table"):
        F.read_slides_csv(bad)
