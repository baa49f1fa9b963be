"""bench/backbones: MeanFlow's step cost depends on how many rows of its draw have r != t (only
those take the JVP), so every timed repetition replays one draw with the paper's share."""

import torch

from bench.backbones import DEBUG_CASES, bench_case, representative_draw
from jumpflow.backbones import build_backbone
from jumpflow.generator import Generator
from jumpflow.objectives import MeanFlow


def test_the_timed_meanflow_draw_has_the_papers_share_of_jvp_rows():
    torch.manual_seed(0)
    batch = 16
    backbone = build_backbone("UNet1D-S", (16, 7), 46, down_dims=(32, 64, 128))
    gen = Generator(backbone, MeanFlow(), torch.nn.Identity(), shape=(16, 7))
    x, cond = torch.randn(batch, 16, 7), torch.randn(batch, 46)
    seed, rows = representative_draw(gen, x, cond)
    assert rows == 4                                            # round(0.25 * 16)
    torch.manual_seed(seed)                                     # the same seed replays the same draw
    with torch.no_grad():
        assert gen.compute_loss({"x": x, "cond": cond}).metrics["frac_r_neq_t"] == 4 / 16
    name, shape, condition, _, overrides = DEBUG_CASES[1]
    rows_out = bench_case(name, shape, condition, overrides, batch=8, repeats=1, warmup=0)
    by_objective = {r["objective"]: r for r in rows_out if r["case"] == "train_step"}
    assert set(by_objective) == {"flow_matching", "meanflow_jump", "meanflow_jvp_all", "meanflow_jump_functorch",
                                 "meanflow_jvp_all_functorch"}
    assert by_objective["meanflow_jump"]["jvp_rows"] == 2 and by_objective["meanflow_jvp_all"]["jvp_rows"] == 8
    assert by_objective["meanflow_jump_functorch"]["jvp_rows"] == 2
    assert by_objective["meanflow_jvp_all_functorch"]["jvp_rows"] == 8
    assert by_objective["meanflow_jump_functorch"]["jvp_backend"] == "functorch"
    assert by_objective["meanflow_jump"]["jvp_backend"] == "forward_ad"
    # 8 x 16 x 7 numbers: jvp_rows="auto" takes the whole-batch JVP, and only its forward_ad row is the default
    assert [o for o, r in by_objective.items() if r.get("default")] == ["meanflow_jvp_all"]
    assert by_objective["meanflow_jump"]["vs_flow_matching"] > 0 and by_objective["meanflow_jvp_all"]["vs_flow_matching"] > 0
    assert "vs_flow_matching" not in by_objective["flow_matching"]
