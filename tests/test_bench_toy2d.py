"""bench/toy2d: a variant (``--override`` + ``--variant``) is refused without its label before
any run, and its rows sit beside the shipped config's rows instead of replacing them."""

import json

import pytest

from bench.toy2d import main


def test_toy2d_variant_rows_are_kept_apart_and_an_unlabelled_override_is_refused(tmp_path, capsys):
    out = tmp_path / "toy2d.json"
    with pytest.raises(SystemExit):
        main(["--objectives", "flow_matching", "--override", "optim.lr=1e-4", "--out", str(out)])
    assert "--override needs --variant" in capsys.readouterr().err and not out.exists()
    tiny = ["--objectives", "sct", "--steps", "4", "--batch", "32", "--out", str(out)]
    main(tiny)
    main([*tiny, "--override", "objective.tangent_warmup_steps=0", "--variant", "warmup0"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["objective"], r.get("variant", ""), r["nfe"]) for r in rows] == [("sct", "", 1), ("sct", "warmup0", 1)]
    assert rows[1]["variant_overrides"] == ["objective.tangent_warmup_steps=0"]
    # the shipped config's 10k-step warm-up in a 4-step run is named; the variant's is not
    err = capsys.readouterr().err
    assert err.count("objective.tangent_warmup_steps = 10000 but the run trains 4 steps") == 1
    main(tiny)                                     # a re-run replaces its own row only
    assert len(json.loads(out.read_text())["rows"]) == 2
