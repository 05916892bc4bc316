"""How a LightningModule's networks were divided for quantization, and what became of each part.

QAT prepares the module's forward as one graph where it can, else each network, else their children, else swaps
their layers (``module_swap``); each attempt is a ``QuantizedPart``. The parts are the plan that conversion, the
checkpoint (what to rebuild before the weights load) and the report's table read, apart from the callback that
schedules them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuantizedPart:
    """One submodule of the LightningModule (``""``: its forward, as one graph) and what became of it.

    ``quantized`` says it was prepared for QAT, as one graph or, where ``swapped_layers`` lists layers, by
    module swap; after conversion, ``int8_layers`` and ``float_layers`` are read back from the converted
    model, so the table never lists a float layer as quantized.
    """

    name: str
    quantized: bool
    reason: str = ""
    swapped_layers: list[str] = field(default_factory=list)
    int8_layers: int | None = None
    float_layers: list[str] = field(default_factory=list)
