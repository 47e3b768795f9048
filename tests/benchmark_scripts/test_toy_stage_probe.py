"""benchmarks/toy_stage_probe.py: how far each parameter group moved, in exact numbers."""

import torch


def test_stage_probe_measures_relative_change_per_parameter_group():
    from benchmarks import toy_stage_probe as probe

    before = {"embedding": torch.tensor([[3.0, 4.0]]), "unet.up.attn2.to_k.weight": torch.ones(2, 2),
              "unet.conv.weight": torch.ones(4)}
    after = {"embedding": torch.tensor([[3.0, 9.0]]), "unet.up.attn2.to_k.weight": torch.ones(2, 2),
             "unet.conv.weight": torch.full((4,), 1.5)}
    assert probe.relative_change(before, after) == {"embedding": 1.0, "unet attn2": 0.0, "unet other": 0.5}
    assert probe.group_of("encoder.layers.1.self_attn.prefix_value") == "prefix_value"
