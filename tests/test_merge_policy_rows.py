"""bench.merge_policy_rows: side lanes' policy.json rows folded into one file by row key."""

from __future__ import annotations

import json

import pytest


def _row(task="can_lowdim_mh", objective="ddpm", sampler="ddpm", nfe=100, seed=0, variant="dp", success=0.3):
    row = {"task": task, "objective": objective, "sampler": sampler, "nfe": nfe, "seed": seed, "success_rate": success,
           "train_steps": 3000}
    if variant is not None:
        row["variant"] = variant
    return row


def _write(path, rows, bench="policy"):
    path.write_text(json.dumps({"bench": bench, "machine": {"cores": 2}, "config": {"episodes": 50}, "rows": rows}))
    return path


def test_side_rows_replace_their_key_or_are_added_and_the_rest_stays(tmp_path):
    from bench.merge_policy_rows import main

    into = _write(tmp_path / "policy.json", [_row(seed=0, success=0.1), _row(objective="meanflow", sampler="meanflow",
                                                                              nfe=1, success=0.9)])
    lane_a = _write(tmp_path / "a.json", [_row(seed=0, success=0.3), _row(seed=1, success=0.26)])
    lane_b = _write(tmp_path / "b.json", [_row(seed=1, success=0.28), _row(objective="meanflow", sampler="meanflow",
                                                                            nfe=1, success=0.9)])
    counts = main([str(lane_a), str(lane_b), "--into", str(into)])
    assert counts == {"added": 1, "replaced": 1, "unchanged": 1}
    doc = json.loads(into.read_text())
    by_key = {(r["objective"], r["seed"]): r["success_rate"] for r in doc["rows"]}
    # the later lane wins seed 1; seed 0 replaced in place; the meanflow row untouched
    assert by_key == {("ddpm", 0): 0.3, ("meanflow", 0): 0.9, ("ddpm", 1): 0.28}
    assert [r["objective"] for r in doc["rows"]] == ["ddpm", "meanflow", "ddpm"]
    assert doc["config"] == {"episodes": 50} and doc["bench"] == "policy"
    assert "| can_lowdim_mh | ddpm | ddpm | 100 |" in (tmp_path / "policy.md").read_text()


def test_select_keeps_only_the_named_rows_with_wildcards_and_the_none_variant(tmp_path):
    from bench.merge_policy_rows import main

    into = _write(tmp_path / "policy.json", [])
    side = _write(tmp_path / "side.json", [_row(seed=0), _row(seed=1), _row(seed=2, variant=None),
                                           _row(task="lift_lowdim_mh", seed=0)])
    main([str(side), "--into", str(into), "--select", "can_lowdim_mh:ddpm:dp:1", "--select", "*:ddpm:none"])
    rows = json.loads(into.read_text())["rows"]
    assert sorted((r["task"], r.get("variant", "-"), r["seed"]) for r in rows) == [
        ("can_lowdim_mh", "-", 2), ("can_lowdim_mh", "dp", 1)]


def test_dry_run_and_nothing_new_write_nothing(tmp_path):
    from bench.merge_policy_rows import main

    into = _write(tmp_path / "policy.json", [_row()])
    before = into.read_bytes()
    side = _write(tmp_path / "side.json", [_row(seed=5)])
    assert main([str(side), "--into", str(into), "--dry-run"]) == {"added": 1, "replaced": 0, "unchanged": 0}
    assert main([str(into), "--into", str(into)]) == {"added": 0, "replaced": 0, "unchanged": 1}
    assert into.read_bytes() == before and not (tmp_path / "policy.md").exists()


@pytest.mark.parametrize("bad, message", [
    ("missing", "no such file"),
    ("notjson", "not JSON"),
    ("images", "bench is 'images', not 'policy'"),
    ("noseed", "row 1 has no 'seed'"),
    ("nosteps", "row 1 has no 'train_steps'"),
])
def test_bad_side_files_stop_with_one_line_before_anything_is_written(tmp_path, bad, message):
    from bench.merge_policy_rows import main

    into = _write(tmp_path / "policy.json", [_row()])
    before = into.read_bytes()
    good = _write(tmp_path / "good.json", [_row(seed=7)])
    path = tmp_path / f"{bad}.json"
    if bad == "notjson":
        path.write_text("{rows: ")
    elif bad == "images":
        _write(path, [_row()], bench="images")
    elif bad in ("noseed", "nosteps"):
        rows = [_row(seed=3), _row(seed=4)]
        del rows[1]["seed" if bad == "noseed" else "train_steps"]
        _write(path, rows)
    with pytest.raises(SystemExit) as err:
        main([str(good), str(path), "--into", str(into)])    # the good file first: still nothing written
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    assert "\n" not in str(err.value)
    assert into.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["policy.json", "good.json"] + ([path.name] if bad != "missing" else []))


def test_a_malformed_select_is_refused(tmp_path):
    from bench.merge_policy_rows import main

    side = _write(tmp_path / "side.json", [_row()])
    for spec in ("can_lowdim_mh", "a:b:c:d:e", "a::c", "a:b:c:one"):
        with pytest.raises(SystemExit, match="--select"):
            main([str(side), "--into", str(tmp_path / "policy.json"), "--select", spec])
    assert not (tmp_path / "policy.json").exists()
