"""Subject-conditioned low-rank adapters (optimizers.md §11): one adapter per subject, trained
jointly on mixed-subject batches through the server's per-row multi-LoRA ops."""

from lorafold.training.subject.layer import (
    SubjectAdapter,
    SubjectLoRALinear,
    inject_subject_lora,
    subject_batch,
    subject_layers,
    subject_pairs,
    subject_params,
)

__all__ = [
    "SubjectAdapter",
    "SubjectLoRALinear",
    "inject_subject_lora",
    "subject_batch",
    "subject_layers",
    "subject_pairs",
    "subject_params",
]
