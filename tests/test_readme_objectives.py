"""The README's objective table: one row for every objective config, and every bench row it
claims exists in the committed result files (so the table cannot drift from the benchmarks)."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
POLICY_TASKS = {"Lift": "lift_lowdim", "Can": "can_lowdim", "Lift image": "lift_image", "Lift mh": "lift_lowdim_mh",
                "Reach Around": "reach_around_lowdim", "Block Push": "block_push_lowdim",
                "MetaWorld": "metaworld"}          # any task of the MetaWorld family
TOY_DATASETS = {"both": {"checkerboard", "gaussian_mixture"}, "checkerboard": {"checkerboard"}}


def objective_table() -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Objectives"):]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().removeprefix("| ").removesuffix(" |").split(" | ")]
        if cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_every_objective_config_has_a_row_with_its_nfe_and_bench_rows():
    table = objective_table()
    configs = {p.stem for p in (REPO / "configs" / "objective").glob("*.yaml")}
    assert set(table) == configs
    for name, cells in table.items():
        assert len(cells) == 5 and re.match(r"^\d", cells[3]) and cells[4], (name, cells)


def test_the_bench_rows_the_table_claims_exist():
    table = objective_table()
    policy = json.loads((RESULTS / "policy.json").read_text())["rows"]
    toy = json.loads((RESULTS / "toy2d.json").read_text())["rows"]
    for name, cells in table.items():
        for part in (p.strip() for p in cells[4].split(";")):
            if part.startswith("policy:"):
                for label in (t.strip() for t in part.removeprefix("policy:").split(",")):
                    assert any(r["objective"] == name and POLICY_TASKS[label] in (r["task"], r.get("family"))
                               for r in policy), \
                        f"{name}: no policy row on {label}"
            elif part.startswith("toy2d"):
                want = TOY_DATASETS[re.search(r"\((.*)\)", part).group(1)]
                assert want <= {r["dataset"] for r in toy if r["objective"] == name}, name
            else:
                for bench in (b.strip() for b in part.split(",")):
                    rows = json.loads((RESULTS / f"{bench}.json").read_text())["rows"]
                    assert any(r["objective"] == name for r in rows), f"{name}: no row in {bench}.json"
