"""The key layout of the authors' CondInst checkpoints (AdelaiDet model zoo).

Almost every module keeps the authors' name. The controller sits beside the FCOS head in their code
and inside it here; their dynamic mask head keeps an iteration counter (`_iter`, also in BoxInst
checkpoints) and the relative-coordinate normalisers (`sizes_of_interest`) as buffers, which here do
not exist or come from the config.
"""

from .rename import Derived, KeyFormat

__all__ = ["AUTHORS"]

AUTHORS = KeyFormat(
    name="authors",
    description="the authors' CondInst (AdelaiDet)",
    signature=r"controller\..+|mask_head\.(_iter|sizes_of_interest)",
    rules=(
        (r"controller\.(.+)", r"proposal_generator.fcos_head.controller.\1"),
        (r"mask_head\.(_iter|sizes_of_interest)", None),
        (r"(backbone|proposal_generator|mask_branch)\..+", r"\g<0>"),
    ),
    derived=(
        Derived(
            key="mask_head.sizes_of_interest",
            attribute="mask_head.sizes_of_interest",
            source="MODEL.FCOS.SIZES_OF_INTEREST + twice its last value",
        ),
    ),
)
