"""The contract's toy-world learning check for every LoRA-family algorithm (LoCon runs in
``test_method.TestLoraContract``): each teaches ``toyworld:`` a new object, a purple ring named
``sks`` (a shape and a colour its world lacks), from 8 pictures.

Each row is the options, steps and the rise of the concept score (share of 8 fixed-seed samples
of ``sks`` the scorer reads as a purple ring) the algorithm declares; the numbers measured when
they were chosen are in the comments (training seeds 1234, 1, 2).
"""

from __future__ import annotations

import pytest
from sdcore.testing.contract import check_concept_learning
from sdcore.testing.toyworld.concepts import NEW_OBJECT
from sdplugin_lora.method import LoraMethod

CONCEPT_RUNS = {
    # algo: (options, steps, margin)
}


@pytest.mark.parametrize("algo", sorted(CONCEPT_RUNS))
def test_algorithm_teaches_a_new_object(algo, tmp_path):
    options, steps, margin = CONCEPT_RUNS[algo]
    before, _ = check_concept_learning(
        LoraMethod, tmp_path, {"algo": algo, **options}, concept=NEW_OBJECT, steps=steps, margin=margin
    )
    assert before == 0.0  # the base model never draws a purple ring
