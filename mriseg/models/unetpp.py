"""U-Net++: Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation",
DLMIA 2018.

Nodes ``X[i][j]``: level ``i`` (resolution 1/2^i), column ``j``. The backbone ``X[i][0]`` is a
U-Net encoder (two conv-BN-ReLU after a max-pool); a nested node is
``X[i][j] = block(cat(X[i][0], ..., X[i][j-1], up(X[i+1][j-1])))`` (dense skips), with a 2x2
transposed conv for ``up``. Widths ``features * (1, 2, 4, 8, 16)`` as the U-Net.
``(N, C_in, *S) -> (N, C_out, *S)``, ``S`` a multiple of 16; 2D and 3D.

Deep supervision (default on): a 1x1 head on each of ``X[0][1..4]``. In training mode the model
returns the list of the four head logits (shallowest first; the loss averages over them); in eval
mode one tensor, the mean of the heads (``eval_output="mean"``) or the deepest head only
(``"last"``, i.e. the full network). With ``deep_supervision=False`` there is one head on ``X[0][4]``.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from mriseg.errors import MrisegError
from mriseg.models.blocks import (DoubleConv, StagedNetwork, conv_layer, conv_transpose_layer, divisible_by,
                                  max_pool_layer)

DEPTH = 4  # poolings, so the backbone has DEPTH + 1 levels
EVAL_OUTPUTS = ("mean", "last")


def node_name(level: int, column: int) -> str:
    return f"x{level}{column}"


class BackboneNode(nn.Module):
    """``X[i][0] = block(pool(X[i-1][0]))`` (no pool for ``X[0][0]``, which reads the input)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.pool = max_pool_layer(spatial_dims)(2) if pool else None
        self.block = DoubleConv(spatial_dims, in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x) if self.pool is not None else x)


class NestedNode(nn.Module):
    """``X[i][j] = block(cat(X[i][0..j-1], up(X[i+1][j-1])))``: ``j`` same-level inputs of width ``w``."""

    def __init__(self, spatial_dims: int, width: int, lower_width: int, column: int):
        super().__init__()
        self.up = conv_transpose_layer(spatial_dims)(lower_width, width, kernel_size=2, stride=2)
        self.block = DoubleConv(spatial_dims, (column + 1) * width, width)

    def forward(self, same_level: list[torch.Tensor], lower: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([*same_level, self.up(lower)], dim=1))


class NestedStage(nn.Module):
    """Computes some nodes from the carried ones. The carry is the tuple of all nodes so far, in
    the order of ``in_names``; the stage appends its own. The last stage returns the output."""

    def __init__(self, in_names: list[str], nodes: dict[str, nn.Module], heads: nn.ModuleList | None = None,
                 deep_supervision: bool = True, eval_output: str = "mean"):
        super().__init__()
        self.in_names = in_names
        self.nodes = nn.ModuleDict(nodes)
        self.heads = heads
        self.deep_supervision = deep_supervision
        self.eval_output = eval_output

    def forward(self, carry: tuple) -> tuple:
        values = dict(zip(self.in_names, carry))
        for name, node in self.nodes.items():
            level, column = int(name[1]), int(name[2])
            if column == 0:
                values[name] = node(values[node_name(level - 1, 0)] if level > 0 else values["input"])
            else:
                same_level = [values[node_name(level, j)] for j in range(column)]
                values[name] = node(same_level, values[node_name(level + 1, column - 1)])
        if self.heads is None:
            return tuple(values[name] for name in [*self.in_names, *self.nodes] if name != "input")
        return (self.output(values),)

    def output(self, values: dict[str, torch.Tensor]) -> Union[torch.Tensor, list[torch.Tensor]]:
        if not self.deep_supervision:
            return self.heads[0](values[node_name(0, DEPTH)])
        logits = [head(values[node_name(0, column)]) for column, head in enumerate(self.heads, start=1)]
        if self.training:
            return logits
        return torch.stack(logits).mean(dim=0) if self.eval_output == "mean" else logits[-1]


class UNetPlusPlus(StagedNetwork):
    """Stages: ``enc0..enc3`` (backbone ``X[i][0]``), ``bottleneck`` (``X[4][0]``), ``dec1..dec4``
    (column ``j``: ``X[0..4-j][j]``; ``dec4`` adds the heads).

    The carry between stages is the tuple of every node computed so far. In training with deep
    supervision the last stage returns ``(list_of_head_logits,)``, matching ``model(x)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features: int = 32,
                 deep_supervision: bool = True, eval_output: str = "mean"):
        if eval_output not in EVAL_OUTPUTS:
            raise MrisegError(f"unetpp: eval_output must be one of {', '.join(EVAL_OUTPUTS)}, got {eval_output!r}")
        widths = [features * 2 ** level for level in range(DEPTH + 1)]
        plan: list[tuple[str, list[tuple[int, int]]]] = [(f"enc{i}", [(i, 0)]) for i in range(DEPTH)]
        plan.append(("bottleneck", [(DEPTH, 0)]))
        plan += [(f"dec{j}", [(i, j) for i in range(DEPTH + 1 - j)]) for j in range(1, DEPTH + 1)]
        stages: dict[str, nn.Module] = {}
        carried = ["input"]
        for stage_name, positions in plan:
            nodes: dict[str, nn.Module] = {}
            for level, column in positions:
                if column == 0:
                    source = in_channels if level == 0 else widths[level - 1]
                    nodes[node_name(level, column)] = BackboneNode(spatial_dims, source, widths[level], pool=level > 0)
                else:
                    nodes[node_name(level, column)] = NestedNode(spatial_dims, widths[level], widths[level + 1], column)
            heads = None
            if stage_name == f"dec{DEPTH}":
                head_count = DEPTH if deep_supervision else 1
                heads = nn.ModuleList(conv_layer(spatial_dims)(widths[0], out_channels, 1) for _ in range(head_count))
            stages[stage_name] = NestedStage(list(carried), nodes, heads, deep_supervision, eval_output)
            carried = [name for name in carried if name != "input"] + list(nodes)
        super().__init__("unetpp", spatial_dims, in_channels, stages, divisible_by(2 ** DEPTH))
