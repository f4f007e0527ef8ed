"""The contract's toy-world learning check for every LoRA-family algorithm (LoCon runs in
``test_method.TestLoraContract``): each teaches ``toyworld:`` a new object, a purple ring named
``sks`` (a shape and a colour its world lacks), from 8 pictures; kohya OFT and BOFT a new
colour (``NEW_COLOUR``), as neither draws the new shape reliably in a CI-sized run.

Each row is the options, steps and the rise of the concept score (share of 8 fixed-seed samples
of ``sks`` the scorer reads as a purple ring; OFT, BOFT: as purple) the algorithm declares; the scores
measured when they were chosen are in the comments (training seeds 1234 / 1 / 2, base 0.00 each).
The margin is the lowest seed's score less one sample (0.125). On the 2-core dev machine
(OMP_NUM_THREADS=2, 2026-12-01) each takes 5-11 s, DoRA the slowest, all nine 80 s (the five LyCORIS
rows ia3/full/glora/diag_oft/boft 37 s of it); up to ten times that while the machine is shared.
"""

from __future__ import annotations

import pytest
from sdcore.testing.contract import check_concept_learning
from sdcore.testing.toyworld.concepts import NEW_OBJECT, Concept
from sdplugin_lora.method import LoraMethod

CONV = {"rank": 8, "alpha": 8.0, "conv_rank": 8, "conv_alpha": 8.0}
CONCEPT_RUNS: dict[str, tuple[dict[str, object], int, float]] = {
    # algo: (options, steps, margin)
    # LoHa: 0.62 / 0.50 / 0.88 (lr 4e-3: 0.88 / 0.38 / 0.75)
    "loha": ({**CONV, "lr": 2e-3}, 150, 0.375),
    # LoKr: 0.62 / 0.50 / 0.62. The most square split (lokr_factor -1) gives 4x4 (x) 8x8 blocks on
    # this model's 32/64-wide layers, 20k parameters in all against LoCon's 146k: it needs a higher
    # lr and swings with the seed (lr 2e-2: 0.62 / 0.25 / 0.88); factor 2 (2x2 (x) 16x16) is steadier.
    "lokr": ({**CONV, "lokr_factor": 2, "lr": 1e-2}, 150, 0.375),
    # DoRA: 0.75 / 0.50 / 0.62 (lr 4e-3: 1.00 / 0.38 / 0.75); the slowest step of the family
    "dora": ({**CONV, "lr": 2e-3}, 150, 0.375),
    # OFT (rank = 4 blocks, no constraint) learns the new colour: 0.75 / 0.88 / 0.75; see NEW_COLOUR
    "oft": ({"rank": 4, "alpha": 0.0, "lr": 1e-2}, 150, 0.625),
    # LyCORIS (IA)^3 (one scale per output channel, 3x3 convs included via conv_rank): 0.50 / 0.38 / 0.50.
    # Rescaling the base's channels is enough to draw the ring, but only at 3x LyCORIS' suggested lr
    # (1e-2: 0.12 on seed 1234; 5e-2 x 100 steps: 0.12; 3e-2 x 100: 0.25).
    "ia3": ({"rank": 8, "conv_rank": 8, "lr": 3e-2}, 150, 0.25),
    # LyCORIS full (the whole weight change): 0.50 / 0.38 / 0.62; 150 steps: 1.00 / 0.38 / 1.00
    # (seed 1 stays at 0.38, so the cheaper run); lr 2e-3: 0.38 on seed 1234.
    "full": ({"rank": 8, "conv_rank": 8, "lr": 1e-3}, 100, 0.25),
    # LyCORIS GLoRA with the 3x3 convs (conv_rank, as a kohya run's preset adapts them): 1.00 / 0.50 / 0.88
    # (lr 2e-3: 0.88 / 0.38 / 0.75; on the transformer blocks alone it drew the ring 0.62 / 0.12 / 0.38)
    "glora": ({**CONV, "lr": 4e-3}, 150, 0.375),
    # LyCORIS diag-oft (blocks of 4) draws the ring when it also rotates the 3x3 convs (conv_rank):
    # 0.62 / 0.62 / 0.62 (100 steps: 0.62 / 0.38 / 0.50); without them, the colour: 0.62 on seed 1234.
    "diag_oft": ({"rank": 4, "conv_rank": 4, "lr": 1e-2}, 150, 0.5),
    # LyCORIS BOFT (butterfly blocks of 4, 3x3 convs too) learns the new colour in 50 steps: 0.88 / 0.75 /
    # 0.88 (150 steps: 1.00 / 0.75 / 0.75); without the convs 0.50 / 0.62 / 0.62 in 150 steps (blocks of
    # 8: 0.50 on seed 1234; lr 2e-2 x 100 steps: 0.38). The family's costliest run (150 steps: 21 s against
    # OFT's 8 s in one run, 50 steps: 9 s; its sampling rebuilds every level's rotation per forward), hence 50 steps.
    # See NEW_COLOUR for the ring.
    "boft": ({"rank": 4, "conv_rank": 4, "lr": 1e-2}, 50, 0.625),
}

NEW_COLOUR = Concept("sks", "purple", None)
"""The cheaper concept OFT is checked on: a colour the world lacks, any shape. kohya's OFT rotates the
output channels of the UNet's Linear and 1x1 layers only (no 3x3 convs), and like a plain LoRA on the
same layers it does not reliably draw a new shape: purple rings 0.50 (150 steps) and 0.62 / 0.25 / 0.50
(250 steps, lr 1e-2; 2e-2: 0.25); plain LoRA at lr 5e-3: 0.38 / 0.12, against LoCon's 0.75.
With the default constraint (alpha 1e-3) OFT barely moves at all (0.00 at lr 2e-3).

BOFT does not draw it even with the 3x3 convs rotated (``conv_rank`` 4): 0.12 at lr 1e-2
and at 3e-2 (150 steps, seed 1234), 0.25 at 300 steps, where diag-oft's blocks reach 0.62."""
CONCEPTS = {"oft": NEW_COLOUR, "boft": NEW_COLOUR}


@pytest.mark.parametrize("algo", sorted(CONCEPT_RUNS))
def test_algorithm_teaches_a_new_object(algo, tmp_path):
    options, steps, margin = CONCEPT_RUNS[algo]
    concept = CONCEPTS.get(algo, NEW_OBJECT)
    before, _ = check_concept_learning(
        LoraMethod, tmp_path, {"algo": algo, **options}, concept=concept, steps=steps, margin=margin
    )
    assert before == 0.0  # the base model never draws purple
