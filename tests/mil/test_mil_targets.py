"""Target specifications and the labels CSV."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.errors import LabelsError
from wsi_pipeline.mil.targets import load_labels, parse_targets, targets_from_config


def test_parse_targets_cli_string():
    specs = parse_targets("response:binary, immune_phenotype:multiclass,til:regression(til_fraction),"
                          "os:survival(os_months,os_event)")
    assert [(s.name, s.kind) for s in specs] == [
        ("response", "binary"), ("immune_phenotype", "multiclass"), ("til", "regression"), ("os", "survival")]
    assert specs[2].column == "til_fraction"
    assert (specs[3].time, specs[3].event) == ("os_months", "os_event")


@pytest.mark.parametrize("bad", ["response", "response:ordinal", "os:survival(t)", "a:binary,a:binary", ""])
def test_parse_targets_rejects(bad):
    with pytest.raises(LabelsError):
        parse_targets(bad)


def test_targets_from_yaml_forms():
    a = targets_from_config([{"name": "os", "kind": "survival", "time": "t", "event": "e"}, "r:binary"])
    b = targets_from_config({"os": {"kind": "survival", "time": "t", "event": "e"}, "r": "binary"})
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]


def test_labels_encoding_classes_and_missing(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "slide_id,patient_id,response,phen,til,t,e\n"
        "s1,p1,yes,inflamed,0.5,10,1\n"
        "s2,p1,yes,desert,,12,0\n"
        "s3,p2,no,,0.1,,\n"
        "s4,p3,,excluded,0.2,3,1\n"
    )
    specs = parse_targets("response:binary,phen:multiclass,til:regression,os:survival(t,e)")
    lab = load_labels(csv, specs)
    assert specs[0].classes == ["no", "yes"] and specs[1].classes == ["desert", "excluded", "inflamed"]
    np.testing.assert_array_equal(lab.values["response"], [1, 1, 0, np.nan])
    np.testing.assert_array_equal(lab.values["phen"], [2, 0, np.nan, 1])
    assert np.isnan(lab.values["til"][1]) and np.isnan(lab.values["os"][2]) and np.isnan(lab.events["os"][2])
    assert lab.patient_ids == ["p1", "p1", "p2", "p3"]


def test_labels_errors_name_the_file(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,response\ns1,maybe\ns2,no\ns3,yes\n")
    with pytest.raises(LabelsError, match=r"labels\.csv"):
        load_labels(csv, parse_targets("response:binary"))
    with pytest.raises(LabelsError, match=r"needs column\(s\) \['x'\]; the columns are"):
        load_labels(csv, parse_targets("x:regression"))
    with pytest.raises(LabelsError, match="did you mean 'response'"):  # a typo gets the closest column
        load_labels(csv, parse_targets("respons:binary"))
    with pytest.raises(LabelsError, match="unknown kind 'binar' \\(did you mean 'binary'\\?\\)"):
        parse_targets("response:binar")
    (tmp_path / "nos.csv").write_text("patient_id,response\np,1\n")
    with pytest.raises(LabelsError, match="slide_id"):
        load_labels(tmp_path / "nos.csv", parse_targets("response:binary"))


def test_regression_bounds_are_declared_or_detected(tmp_path):
    specs = parse_targets("til_fraction:regression[0,1],count:regression(n)[0,],z:regression[,],y:regression")
    assert [s.bounds for s in specs] == [(0.0, 1.0), (0.0, None), (None, None), None]
    assert specs[1].column == "n"
    assert specs[0].to_dict()["bounds"] == [0.0, 1.0]
    assert targets_from_config([{"name": "t", "kind": "regression", "bounds": [0, 1]}])[0].bounds == (0.0, 1.0)
    np.testing.assert_array_equal(specs[0].clamp(np.array([-0.08, 0.5, 1.2])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(specs[1].clamp(np.array([-1.0, 7.0])), [0.0, 7.0])
    for bad in ("r:binary[0,1]", "t:regression[1,0]", "t:regression[a,1]", "t:regression[0]"):
        with pytest.raises(LabelsError):
            parse_targets(bad)

    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,frac,score,declared\na,0.0,-2.5,0.2\nb,0.31,4.0,0.4\nc,,1.0,0.3\n")
    lab = load_labels(csv, parse_targets("frac:regression,score:regression,declared:regression[,]"))
    assert [t.bounds for t in lab.targets] == [(0.0, 1.0), (None, None), (None, None)]
